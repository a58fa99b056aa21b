"""Device check: the memory plan against torch.cuda.max_memory_allocated, per phase, on both FSDP2 front ends.

A ~1.1B-parameter Llama (TinyLlama-1.1B's dimensions, bench/plan_configs/llama_1b.json; random init, no weights)
trains three phases (head + final norm for 2 epochs with the frozen-prefix cache; + the top quarter of the layers;
+ everything) with AdamW, bf16 mixed precision (FSDP2 ``mp_policy``, float32 master weights), one FSDP2 unit per
decoder layer, the embedding and the head:

1. through Lightning: ``ModelParallelStrategy`` on one device with ``FinetuningScheduler``;
2. through the plain strategy: ``phasetune.FSDP2Strategy`` + ``ScheduledFinetuning`` in a hand-written loop;
3. phase 0 alone, unsharded (the frozen-prefix cache refuses sharded models), with the prefix cache: its first epoch
   fills the cache, its second is served from it.

Before either run, :func:`phasetune.plan.plan_memory` plans the same run. Per phase and front end it reports the
planned peak, the measured ``torch.cuda.max_memory_allocated`` (reset per phase) and their ratio, the median step
time, and the prefix cache's speed-up (run 3: the second epoch's step time against the first's). One JSON file and
one table. Under 5 minutes on one H100.

    python bench/gpu_check.py [--out bench/results/gpu_check.json]
    python bench/gpu_check.py --cpu     # tiny sizes on CPU (one process): exercises every path, measures no GPU

Each thaw under mixed precision is followed by ``phasetune.sharding.plan.refresh_unit_dtypes``: torch 2.13 fixes
an FSDP2 unit's gradient dtypes at its first forward, so a unit frozen then would fail its first backward (the
front ends do not call it yet; the JSON records that this script does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
#: ``steps`` per epoch of the FSDP2 runs, ``cache_steps`` per epoch of the prefix-cache run
BIG = {"config": ROOT / "bench" / "plan_configs" / "llama_1b.json", "seq_len": 1024, "micro_batch": 4, "steps": 8,
       "cache_steps": 8}
TINY = {"config": ROOT / "tests" / "data" / "plan" / "tiny_llama.json", "seq_len": 16, "micro_batch": 2, "steps": 1,
        "cache_steps": 4}
MP = {"param_dtype": "bfloat16", "reduce_dtype": "float32"}


def load_config(path: Path) -> Any:
    from transformers import AutoConfig

    raw = json.loads(path.read_text())
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def phase_schedule(n_layers: int, prefix: str = "") -> dict[int, dict[str, Any]]:
    p = prefix.replace(".", r"\.")
    top = n_layers - max(1, n_layers // 4)
    upper = "|".join(str(i) for i in range(top, n_layers))
    lower = "|".join(str(i) for i in range(top))
    return {
        0: {"params": [f"{p}lm_head.weight", f"{p}model.norm.weight"], "max_transition_epoch": 2},
        1: {"params": [rf"{p}model\.layers\.({upper})\..*"], "lr": 1e-4, "max_transition_epoch": 3},
        2: {"params": [rf"{p}model\.layers\.({lower})\..*", f"{p}model.embed_tokens.weight"], "lr": 5e-5,
            "max_transition_epoch": 4},
    }


def data(config: Any, size: dict[str, Any]) -> torch.Tensor:
    n = size["micro_batch"] * size["steps"]
    return torch.randint(0, config.vocab_size, (n, size["seq_len"]), generator=torch.Generator().manual_seed(0))


class Clock:
    """Peak device memory and step times of each epoch (= phase part) of a run."""

    def __init__(self, device: torch.device) -> None:
        from phasetune.features.peak_memory import PeakMemory

        self.peak, self.device = PeakMemory(device), device
        self.epochs: list[dict[str, Any]] = []
        self._times: list[float] = []
        self._t = 0.0

    def epoch_start(self) -> None:
        self._times = []
        self.peak.reset()

    def step_start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def step_end(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._times.append(time.perf_counter() - self._t)

    def epoch_end(self, phase: int) -> None:
        times = self._times[1:] or self._times
        self.epochs.append({"phase": phase, "peak": self.peak.read() if self.peak.kind == "cuda_max_allocated" else None,
                            "step_ms": 1000 * statistics.median(times) if times else None})


def per_phase(epochs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for e in epochs:
        row = out.setdefault(e["phase"], {"phase": e["phase"], "peak": None, "step_ms": []})
        if e["peak"] is not None:
            row["peak"] = max(row["peak"] or 0, e["peak"])
        row["step_ms"].append(e["step_ms"])
    return [dict(r, step_ms=statistics.median(r["step_ms"])) for r in out.values()]


# ------------------------------------------------------------------------------------------------ Lightning


def run_lightning(config: Any, size: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import LlamaForCausalLM

    from phasetune import FinetuningScheduler
    from phasetune.sharding.plan import refresh_unit_dtypes

    ids = data(config, size)
    clock = Clock(device)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            with torch.device(device):
                self.model = LlamaForCausalLM(config)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", self.model(input_ids=batch[0], labels=batch[0]).loss)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4,
                                     foreach=device.type == "cuda")

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(ids), batch_size=size["micro_batch"])

        def val_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(ids[: size["micro_batch"]]), batch_size=size["micro_batch"])

    class Meter(Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            refresh_unit_dtypes(pl_module)  # after the scheduler (listed first) thawed: see the module docstring
            clock.epoch_start()

        def on_train_batch_start(self, *args: Any) -> None:
            clock.step_start()

        def on_train_batch_end(self, *args: Any) -> None:
            clock.step_end()

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            clock.epoch_end(fts.curr_depth)

    plan = {r"model\.model\.layers\.\d+": {}, "model.model.embed_tokens": {}, "model.lm_head": {}}
    fts = FinetuningScheduler(ft_schedule=phase_schedule(config.num_hidden_layers, "model."), epoch_transitions_only=True,
                              strategy_adapter_cfg={"fsdp_plan": plan, "fsdp_default_kwargs": {"mp_policy": MP}})
    trainer = pl.Trainer(
        accelerator=device.type if device.type == "cuda" else "cpu", devices=1, max_epochs=4,
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), callbacks=[fts, Meter()],
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, default_root_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_check_lightning"),
    )
    trainer.fit(Module())
    return clock.epochs


# ------------------------------------------------------------------------------------------------ plain strategy


def run_plain(config: Any, size: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from phasetune import FSDP2Strategy, ScheduledFinetuning
    from phasetune.sharding.plan import refresh_unit_dtypes

    ids = data(config, size)
    strategy = FSDP2Strategy(seed=0, micro_batch_size=size["micro_batch"], global_batch_size=size["micro_batch"],
                             bf16=True, device=device)
    with strategy.init_model_context():
        model = LlamaForCausalLM(config)
    model = strategy.prepare_model(model)
    optimizer = strategy.create_optimizer(model, lr=1e-4, foreach=device.type == "cuda")
    ft = ScheduledFinetuning(phase_schedule(config.num_hidden_layers), model, optimizer, epoch_transitions_only=True)
    clock = Clock(device)
    for epoch in range(4):
        phase = ft.run.depth
        clock.epoch_start()
        model.train()
        for i in range(0, len(ids), size["micro_batch"]):
            x = ids[i : i + size["micro_batch"]].to(device)
            clock.step_start()
            loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1).float(), x.flatten())
            strategy.backward(loss, model)
            strategy.optimizer_step(ft.optimizer, model)
            clock.step_end()
        clock.epoch_end(phase)
        model.eval()
        with torch.no_grad():
            x = ids[: size["micro_batch"]].to(device)
            val = strategy.all_reduce(model(input_ids=x, labels=x).loss)
        if ft.step(epoch, metric=val) is not None:
            refresh_unit_dtypes(model)  # see the module docstring
        if ft.done:
            break
    strategy.teardown()
    return clock.epochs


def run_prefix_cache(config: Any, size: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Phase 0 (2 epochs) on the unsharded model with the frozen-prefix cache: the first epoch fills it, the second
    is served from it. The cache refuses sharded models (it replaces the forward that FSDP2 units gather in), so
    this run holds the model whole on the device, in float32 (a bfloat16 norm weight would not move at lr 1e-4, and
    phasetune's audit would stop the run)."""
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from phasetune import ScheduledFinetuning
    from phasetune.features.prefix_cache.cache import IndexedDataset

    ids = data(config, {**size, "steps": size["cache_steps"]})
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dataset = IndexedDataset([{"input_ids": row} for row in ids])
    ft = ScheduledFinetuning(phase_schedule(config.num_hidden_layers), model, optimizer, epoch_transitions_only=True,
                             prefix_cache={0: True}, train_dataset=dataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=size["micro_batch"])
    clock = Clock(device)
    for _ in range(2):
        clock.epoch_start()
        for batch in loader:
            x = ft.before_batch(batch)["input_ids"].to(device)
            clock.step_start()
            loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1).float(), x.flatten())
            loss.backward()
            ft.optimizer.step()
            ft.optimizer.zero_grad()
            clock.step_end()
        clock.epoch_end(0)
    ft.close()
    fill, served = clock.epochs[0]["step_ms"], clock.epochs[1]["step_ms"]
    return {"fill_step_ms": fill, "served_step_ms": served, "speedup": fill / served if served else None,
            "setting": "unsharded float32 model, phase 0 (head + final norm train), 2 epochs"}


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on CPU: every path runs, no GPU is measured")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or pass --cpu for the tiny CPU check")
    size = TINY if args.cpu else BIG
    device = torch.device("cpu" if args.cpu else "cuda")
    config = load_config(size["config"])
    start = time.perf_counter()

    from phasetune.plan import plan_memory  # before any process group: the plan plays its ranks on a fake one

    device_gib = None if args.cpu else torch.cuda.get_device_properties(0).total_memory / 2**30
    plan = plan_memory(phase_schedule(config.num_hidden_layers), str(size["config"]), world_size=1,
                       mixed_precision="bf16", seq_len=size["seq_len"], micro_batch=size["micro_batch"],
                       optimizer_impl="foreach" if device.type == "cuda" else "single_tensor",
                       device_gib=device_gib, search_micro_batch=False)
    measured = {"lightning": per_phase(run_lightning(config, size, device))}
    measured["plain"] = per_phase(run_plain(config, size, device))
    cache = run_prefix_cache(config, size, device)
    rows = []
    for front, phases in measured.items():
        for m in phases:
            p = plan.phases[m["phase"]]
            rows.append({"front_end": front, "phase": m["phase"], "planned_peak": p.peak, "measured_peak": m["peak"],
                         "ratio": m["peak"] / p.peak if m["peak"] else None, "step_ms": m["step_ms"],
                         "planned_at": p.peak_at})
    result = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (no peak measured)",
        "model": plan.model, "n_params": plan.n_params, "seq_len": size["seq_len"], "micro_batch": size["micro_batch"],
        "steps_per_epoch": size["steps"], "rows": rows, "prefix_cache": cache, "plan": plan.to_dict(),
        "notes": ["refresh_unit_dtypes is called after each thaw (torch 2.13 FSDP2 mixed-precision thaw)"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}: {plan.model}, {plan.n_params / 1e6:,.1f}M parameters, micro-batch "
          f"{size['micro_batch']} x {size['seq_len']} tokens, bf16 mixed precision, AdamW, one rank")
    print(f"{'front end':10} {'phase':>5} | {'planned GiB':>11} {'measured GiB':>12} {'ratio':>6} | {'step ms':>8} | planned peak at")
    for r in rows:
        meas = "-" if r["measured_peak"] is None else f"{r['measured_peak'] / 2**30:12.3f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:6.3f}"
        print(f"{r['front_end']:10} {r['phase']:>5} | {r['planned_peak'] / 2**30:11.3f} {meas:>12} {ratio:>6} | "
              f"{r['step_ms']:8.1f} | {r['planned_at']}")
    speed = cache.get("speedup")
    print(f"prefix cache ({cache['setting']}): fill epoch {cache['fill_step_ms']:.1f} ms/step, served epoch "
          f"{cache['served_step_ms']:.1f} ms/step" + (f", {speed:.2f}x faster" if speed else ""))
    print(f"wrote {args.out} ({result['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
