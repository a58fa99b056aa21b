"""Per-rank memory of a 3-phase schedule under ModelParallelStrategy (FSDP2) against the theory.

A transformer-shaped model (embed, N MLP blocks, final norm, head) is sharded by an ``fsdp_plan`` (each
block, the norm and the head; the root last) and trained with Adam through a 3-phase schedule (head + norm;
+ the top half of the blocks; + the rest and the embedding), one epoch per phase. At the last step of each
phase every rank measures the bytes it holds of

- parameters (its shards): theory = all parameter bytes / world size, whatever the phase;
- gradients: theory = trainable parameter bytes / world size (frozen parameters get none);
- optimizer state (Adam ``exp_avg`` + ``exp_avg_sq``): theory = 2 x trainable bytes / world size, plus a
  4-byte ``step`` per trainable tensor;
- the restore-best snapshot (CPU, taken at the phase's validation): this rank's shards of the trainable
  parameters and of their optimizer state (Adam: ``step`` scalars included).

On CUDA it also reports ``torch.cuda.max_memory_allocated`` per phase and the mean step time of each phase
against the same model trained without phasetune (everything trainable from the start).

    python bench/fsdp2_memory.py [--width 256] [--layers 6] [--ranks 2] [--steps 4]

It starts itself under ``torch.distributed.run`` (gloo on CPU, nccl when there are enough GPUs).
"""

from __future__ import annotations

import argparse
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
        return DataLoader(data, batch_size=16, sampler=DistributedSampler(data, shuffle=False))

    def val_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(32, 64, generator=g), torch.randint(0, 16, (32,), generator=g))
        return DataLoader(data, batch_size=16, sampler=DistributedSampler(data, shuffle=False))


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
        world = trainer.world_size
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
            "params_theory": full / world,
            "grads": sum(local_bytes(p.grad) for p in params.values()),
            "grads_theory": full_trainable / world,
            "optim": sum(local_bytes(v) for v in state),
            "optim_theory": 2 * full_trainable / world + 4 * len(trainable),
            "snapshot": 0,  # filled in after the epoch's validation took it
            "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "step_ms": 1000 * statistics.median(self._times[1:] or self._times),
        })


    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        snap = self.fts.snapshot if self.fts is not None else None
        if self.rows and snap is not None:
            self.rows[-1]["snapshot"] = snap.nbytes


def fit(args: argparse.Namespace, with_phasetune: bool, root: str) -> list[dict[str, Any]]:
    pl.seed_everything(0)
    module = Module(args.width, args.layers, args.steps, shard_self=not with_phasetune)
    fts = None
    callbacks: list[Callback] = []
    if with_phasetune:
        fts = FinetuningScheduler(ft_schedule=schedule(args.layers), epoch_transitions_only=True,
                                  strategy_adapter_cfg={"fsdp_plan": PLAN})
        callbacks.append(fts)
    meter = Meter(fts)
    callbacks.append(meter)
    cuda = torch.cuda.is_available()
    t = pl.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=args.ranks, max_epochs=3 if with_phasetune else 1,
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
    with tempfile.TemporaryDirectory() as root:
        rows = fit(args, True, root)
        base = fit(args, False, root)
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (rows, base))
    if torch.distributed.get_rank() == 0:
        n_params = sum(p.numel() for p in Net(args.width, args.layers).parameters())
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (gloo)"
        print(f"\nFSDP2 memory per rank: {n_params:,} float32 parameters, {args.layers} blocks of width {args.width}, "
              f"world size {args.ranks}, Adam, {args.steps} steps per phase, {device}")
        print("MiB; (theory) = sharded bytes / world size; grads and optimizer state only for trainable parameters\n")
        head = (f"{'phase':>5} {'train':>6} {'rank':>4} | {'params':>8} {'(theory)':>8} | {'grads':>8} {'(theory)':>8} | "
                f"{'optim':>8} {'(theory)':>8} | {'snapshot':>8} | {'cuda peak':>9} | {'step ms':>7}")
        print(head)
        print("-" * len(head))
        for i in range(len(rows)):
            for rank, (r_rows, _) in enumerate(gathered):
                r = r_rows[i]
                print(f"{r['phase']:>5} {r['trainable']:>6} {rank:>4} | {mib(r['params'])} {mib(r['params_theory'])} | "
                      f"{mib(r['grads'])} {mib(r['grads_theory'])} | {mib(r['optim'])} {mib(r['optim_theory'])} | "
                      f"{mib(r['snapshot'])} | {mib(r['cuda_peak']):>9} | {r['step_ms']:7.1f}")
        for rank, (_, b_rows) in enumerate(gathered):
            b = b_rows[0]
            print(f"{'none':>5} {b['trainable']:>6} {rank:>4} | {mib(b['params'])} {mib(b['params_theory'])} | "
                  f"{mib(b['grads'])} {mib(b['grads_theory'])} | {mib(b['optim'])} {mib(b['optim_theory'])} | "
                  f"{'-':>8} | {mib(b['cuda_peak']):>9} | {b['step_ms']:7.1f}")
        print("\nphase 'none': the same sharded model trained without phasetune (all parameters trainable), for step time"
              " and peak memory.")
        if not torch.cuda.is_available():
            print("no CUDA here: no cuda peak; step times are CPU times of 1 thread per rank and only indicative.")
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per phase")
    parser.add_argument("--ranks", type=int, default=None, help="ranks (default: the GPUs if 2 or more, else 2 CPU ranks)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    gpus = torch.cuda.device_count()
    nproc = args.ranks or (gpus if gpus >= 2 else 2)
    if torch.cuda.is_available() and gpus < nproc:
        sys.exit(f"{nproc} ranks need {nproc} GPUs, found {gpus}; pass --ranks {gpus} or hide the GPUs")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           "--worker", "--ranks", str(nproc), "--width", str(args.width), "--layers", str(args.layers),
           "--steps", str(args.steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sys.exit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    main()
