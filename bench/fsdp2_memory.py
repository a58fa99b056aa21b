"""Per-rank memory of a 3-phase schedule under ModelParallelStrategy (FSDP2): measured, and planned by phasetune.plan.

A transformer-shaped model (embed, N MLP blocks, final norm, head) is sharded by an ``fsdp_plan`` (each
block, the norm and the head; the root last) and trained with Adam through a 3-phase schedule (head + norm;
+ the top half of the blocks; + the rest and the embedding), one epoch per phase, under four settings:
float32 or bf16 mixed precision (``mp_policy``), ``reshard_after_forward`` True or False. At the last step of
each phase every rank measures the bytes it holds of

- parameters (its shards), gradients (only trainable parameters have them), optimizer state (Adam
  ``exp_avg`` + ``exp_avg_sq`` + a ``step`` per trainable tensor),
- the restore-best snapshot (CPU, taken at the phase's validation): its shards of the trainable parameters and
  of their optimizer state,

and the same script, before launching the ranks, asks :func:`phasetune.plan.plan_memory` for the same run (same
model, schedule, ``fsdp_plan``, defaults, world size) without running it. Printed: measured/planned per rank, phase
and setting (exact means 1.000000). On CUDA it also prints ``torch.cuda.max_memory_allocated`` per phase against
the planned peak, the same ratio for full fine-tuning of the model (every parameter trainable from the start, no
phasetune), and the mean step time of each phase.

    python bench/fsdp2_memory.py [--width 256] [--layers 6] [--ranks 2] [--steps 4] [--quick]

It starts itself under ``torch.distributed.run`` (gloo on CPU, nccl when there are enough GPUs). ``--quick``:
the float32 / reshard setting only, 2 steps per phase.

Under bf16 mixed precision the run calls ``phasetune.sharding.plan.refresh_unit_dtypes`` after each transition
(see :class:`RefreshUnitDtypes`): torch 2.13 fixes an FSDP2 unit's gradient dtypes at the first forward, so a
unit frozen then fails its first backward after the thaw; the front ends do not call it yet.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from phasetune import FinetuningScheduler
from phasetune.sharding import apply_plan, logical_name
from phasetune.sharding.plan import refresh_unit_dtypes

MiB = 2**20


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, width: int, n_layers: int) -> None:
        super().__init__()
        self.embed = nn.Linear(64, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(n_layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


PLAN = {r"model\.layers\.\d+": {}, "model.norm": {}, "model.head": {}}
#: setting -> fsdp_default_kwargs
SETTINGS = {
    "fp32 reshard": {"reshard_after_forward": True},
    "fp32 keep": {"reshard_after_forward": False},
    "bf16 reshard": {"reshard_after_forward": True, "mp_policy": {"param_dtype": "bfloat16", "reduce_dtype": "float32"}},
    "bf16 keep": {"reshard_after_forward": False, "mp_policy": {"param_dtype": "bfloat16", "reduce_dtype": "float32"}},
}
BATCH = 16


def schedule(n_layers: int) -> dict[int, dict[str, Any]]:
    top = "|".join(str(i) for i in range(n_layers // 2, n_layers))
    low = "|".join(str(i) for i in range(n_layers // 2))
    return {
        0: {"params": ["model.head.*", "model.norm.*"], "max_transition_epoch": 1},
        1: {"params": [rf"model\.layers\.({top})\..*"], "lr": 1e-4, "max_transition_epoch": 2},
        2: {"params": [rf"model\.layers\.({low})\..*", "model.embed.*"], "lr": 1e-4, "max_transition_epoch": 3},
    }


class Module(pl.LightningModule):
    def __init__(self, width: int, n_layers: int, steps: int, shard_self: bool) -> None:
        super().__init__()
        self.model = Net(width, n_layers)
        self.steps, self.shard_self = steps, shard_self

    def configure_model(self) -> None:
        if self.shard_self:  # the run without phasetune shards with the same plan itself
            apply_plan(self, PLAN, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.model(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        n = 16 * self.steps * int(os.environ.get("WORLD_SIZE", "1"))
        data = TensorDataset(torch.randn(n, 64, generator=g), torch.randint(0, 16, (n,), generator=g))
        return DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data, shuffle=False))

    def val_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(32, 64, generator=g), torch.randint(0, 16, (32,), generator=g))
        return DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data, shuffle=False))


class RefreshUnitDtypes(Callback):
    """After FinetuningScheduler thawed a phase (it runs first): re-derive the FSDP2 units' gradient dtypes."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refresh_unit_dtypes(pl_module)


def local_bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


class Meter(Callback):
    """At the last step of each epoch (= phase): bytes held by this rank, peak CUDA memory, step times."""

    def __init__(self, fts: FinetuningScheduler | None) -> None:
        self.fts = fts
        self.rows: list[dict[str, Any]] = []
        self._t0 = 0.0
        self._times: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._times = []
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, *args: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._times.append(time.perf_counter() - self._t0)
        if batch_idx != trainer.num_training_batches - 1:
            return
        params = dict((logical_name(n), p) for n, p in pl_module.named_parameters())
        trainable = [p for p in params.values() if p.requires_grad]
        opt = trainer.optimizers[0]
        state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
        full = sum(p.numel() * p.element_size() for p in params.values())
        full_trainable = sum(p.numel() * p.element_size() for p in trainable)
        self.rows.append({
            "phase": self.fts.curr_depth if self.fts is not None else "-",
            "trainable": f"{100 * full_trainable / full:.1f}%",
            "params": sum(local_bytes(p) for p in params.values()),
            "grads": sum(local_bytes(p.grad) for p in params.values()),
            "optim": sum(local_bytes(v) for v in state),
            "snapshot": 0,  # filled in after the epoch's validation took it
            "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "step_ms": 1000 * statistics.median(self._times[1:] or self._times),
        })

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        snap = self.fts.snapshot if self.fts is not None else None
        if self.rows and snap is not None:
            self.rows[-1]["snapshot"] = snap.nbytes


def fit(args: argparse.Namespace, setting: str | None, root: str) -> list[dict[str, Any]]:
    """Train with phasetune under ``setting`` (None: full fine-tuning without phasetune, one epoch)."""
    pl.seed_everything(0)
    module = Module(args.width, args.layers, args.steps, shard_self=setting is None)
    fts = None
    callbacks: list[Callback] = []
    if setting is not None:
        fts = FinetuningScheduler(ft_schedule=schedule(args.layers), epoch_transitions_only=True,
                                  strategy_adapter_cfg={"fsdp_plan": PLAN, "fsdp_default_kwargs": SETTINGS[setting]})
        callbacks += [fts, RefreshUnitDtypes()]
    meter = Meter(fts)
    callbacks.append(meter)
    cuda = torch.cuda.is_available()
    t = pl.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=args.ranks, max_epochs=3 if setting is not None else 1,
        strategy=ModelParallelStrategy(data_parallel_size=args.ranks, tensor_parallel_size=1), callbacks=callbacks,
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=root,
    )
    t.fit(module)
    return meter.rows


def mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MiB:8.3f}"


def worker(args: argparse.Namespace) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as root:
        for setting in args.settings:
            out[setting] = fit(args, setting, root)
        if torch.cuda.is_available():
            out["full"] = fit(args, None, root)
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, out)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    torch.distributed.destroy_process_group()


def plans(args: argparse.Namespace, settings: list[str]) -> dict[str, Any]:
    """phasetune.plan's plan of each setting (and of full fine-tuning), made before any rank starts."""
    from phasetune.plan import plan_memory

    cuda = torch.cuda.is_available()
    common = {"world_size": args.ranks, "micro_batch": BATCH, "seq_len": 1, "name_prefix": "model", "optimizer": "adam",
              "optimizer_kwargs": {"lr": 1e-3}, "optimizer_impl": "foreach" if cuda else "single_tensor",
              "fsdp_plan": PLAN, "inputs": lambda b, s: (torch.randn(b, 64),),
              "loss": lambda out: nn.functional.cross_entropy(out, torch.zeros(out.shape[0], dtype=torch.long))}
    factory = functools.partial(Net, args.width, args.layers)
    out = {s: plan_memory(schedule(args.layers), factory, fsdp_default_kwargs=SETTINGS[s], **common) for s in settings}
    out["full"] = plan_memory({0: {"params": ["model.*"]}}, factory, fsdp_default_kwargs=SETTINGS["fp32 reshard"], **common)
    return out


def report(args: argparse.Namespace, planned: dict[str, Any], measured: list[dict[str, Any]]) -> None:
    n_params = sum(p.numel() for p in Net(args.width, args.layers).parameters())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (gloo)"
    print(f"\nFSDP2 memory per rank: {n_params:,} float32 parameters, {args.layers} blocks of width {args.width}, "
          f"world size {args.ranks}, Adam, {args.steps} steps per phase, {device}")
    print("measured bytes / planned bytes (phasetune.plan, made before the run); exact = 1.000000\n")
    head = (f"{'setting':13} {'phase':>5} {'rank':>4} | {'params':>8} {'ratio':>8} | {'grads':>8} {'ratio':>8} | "
            f"{'optim':>8} {'ratio':>8} | {'snapshot':>8} {'ratio':>8} | {'cuda peak':>9} {'/plan':>6} | {'step ms':>7}")
    print(head)
    print("-" * len(head))
    exact = total = 0
    for setting, plan in planned.items():
        if setting == "full":
            continue
        for k, phase in enumerate(plan.phases):
            for rank, ranks_out in enumerate(measured):
                m = ranks_out[setting][k]
                p = phase.ranks[rank]
                # a snapshot holds the trainable shards and their state (no buffers here); the final phase keeps none
                snapshot = p["grads"] + p["optimizer"] if phase.host.snapshot else 0
                want = {"params": p["params"], "grads": p["grads"], "optim": p["optimizer"], "snapshot": snapshot}
                ratios = {key: m[key] / want[key] if want[key] else float(m[key] == 0) for key in want}
                exact += sum(m[key] == want[key] for key in want)
                total += len(want)
                peak = m["cuda_peak"]
                print(f"{setting:13} {k:>5} {rank:>4} | {mib(m['params'])} {ratios['params']:8.6f} | {mib(m['grads'])} "
                      f"{ratios['grads']:8.6f} | {mib(m['optim'])} {ratios['optim']:8.6f} | {mib(m['snapshot'])} "
                      f"{ratios['snapshot']:8.6f} | {mib(peak):>9} {f'{peak / phase.peak:6.3f}' if peak else '-':>6} | "
                      f"{m['step_ms']:7.1f}")
    print(f"\n{exact} of {total} planned model-state figures equal the measured bytes exactly "
          "(params, grads, optimizer state, snapshot; MiB columns are the measured values)")
    if "full" in measured[0]:
        full_m = measured[0]["full"][0]["cuda_peak"]
        full_p = planned["full"].phases[0].peak
        first = planned[next(iter(s for s in planned if s != "full"))]
        for k, phase in enumerate(first.phases):
            meas = measured[0][next(iter(measured[0]))][k]["cuda_peak"]
            print(f"phase {k} peak / full fine-tuning peak: measured {meas / full_m:.3f}, planned {phase.peak / full_p:.3f}")
    else:
        print("no CUDA here: no measured peaks; the planned peak / full fine-tuning peak per phase is "
              + ", ".join(f"{p.peak / planned['full'].phases[0].peak:.3f}" for p in planned[args.settings[0]].phases))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per phase")
    parser.add_argument("--ranks", type=int, default=None, help="ranks (default: the GPUs if 2 or more, else 2 CPU ranks)")
    parser.add_argument("--quick", action="store_true", help="the fp32/reshard setting only, 2 steps per phase")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--settings", nargs="*", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    gpus = torch.cuda.device_count()
    nproc = args.ranks or (gpus if gpus >= 2 else 2)
    if torch.cuda.is_available() and gpus < nproc:
        sys.exit(f"{nproc} ranks need {nproc} GPUs, found {gpus}; pass --ranks {gpus} or hide the GPUs")
    args.ranks = nproc
    settings = ["fp32 reshard"] if args.quick else list(SETTINGS)
    steps = 2 if args.quick else args.steps
    args.steps = steps
    planned = plans(args, settings)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "measured.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
               "--worker", "--ranks", str(nproc), "--width", str(args.width), "--layers", str(args.layers),
               "--steps", str(steps), "--out", out, "--settings", *settings]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        code = subprocess.call(cmd, env=env)
        if code:
            sys.exit(code)
        with open(out) as f:
            measured = json.load(f)
    args.settings = settings
    report(args, planned, measured)


if __name__ == "__main__":
    main()
