"""Per-step overhead of FinetuningScheduler against Lightning's own BaseFinetuning.

The same model, data, seed and phase trajectory (head; +top two blocks at epoch 1; +the rest at epoch 2) is
trained (a) with a ``BaseFinetuning`` callback unfreezing at those epochs and (b) with ``FinetuningScheduler``
running the equivalent schedule with ``epoch_transitions_only``. Repetitions alternate (a)/(b) in one process
so machine noise hits both alike. A step is timed by wall clock and by the thread's CPU time (steadier when
other processes share the machine). Printed: per-step medians of each, the median of the per-repetition
(a)/(b) pair ratios (the headline), the whole-fit ratio, and the largest parameter difference between the
two runs (0 means the trajectories are identical).

    python bench/overhead.py [--reps 7] [--width 256] [--epochs 3] [--threads 1]
    python bench/overhead.py --instructions     # deterministic: instructions per step under valgrind (~15 min)

On a shared or virtual machine step times can swing by 10% between runs. ``--instructions`` counts the
instructions each variant executes under ``valgrind --tool=callgrind`` with two step counts; the difference
divided by the extra steps is the per-step cost, free of start-up and of machine noise.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from phasetune import FinetuningScheduler


class Net(nn.Module):
    def __init__(self, width: int, n_layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(32, width)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width)) for _ in range(n_layers))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = h + torch.relu(layer(h))
        return self.head(h)


class Module(pl.LightningModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.model = Net(width)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


LRS = {1: 0.02, 2: 0.01}


class Unfreeze(BaseFinetuning):
    """Lightning's way: the same phases by hand."""

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.model)
        self.make_trainable(pl_module.model.head)

    def finetune_function(self, pl_module, current_epoch, optimizer):
        m = pl_module.model
        if current_epoch == 1:
            self.unfreeze_and_add_param_group([m.layers[2], m.layers[3]], optimizer, lr=LRS[1], train_bn=True)
        elif current_epoch == 2:
            self.unfreeze_and_add_param_group([m.embed, m.layers[0], m.layers[1]], optimizer, lr=LRS[2], train_bn=True)


SCHEDULE = {
    0: {"params": [r"model\.head\..*"], "max_transition_epoch": 1},
    1: {"params": [r"model\.layers\.[23]\..*"], "lr": LRS[1], "max_transition_epoch": 2},
    2: {"params": [r"model\.embed\..*", r"model\.layers\.[01]\..*"], "lr": LRS[2], "max_transition_epoch": 3},
}


class StepTimer(pl.Callback):
    """Wall and thread-CPU time between consecutive batch starts within an epoch (a whole step, hooks included)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._last: tuple[float, float] | None = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._last = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = (time.perf_counter(), time.thread_time())
        if self._last is not None:
            self.wall.append(now[0] - self._last[0])
            self.cpu.append(now[1] - self._last[1])
        self._last = now


def run(kind: str, width: int, epochs: int, loader: DataLoader) -> tuple[float, float, float, dict[str, torch.Tensor]]:
    pl.seed_everything(0, verbose=False)
    module = Module(width)
    timer = StepTimer()
    # the final phase's max_transition_epoch is the run's length (a larger one would raise max_epochs to it)
    schedule = {**SCHEDULE, 2: {**SCHEDULE[2], "max_transition_epoch": epochs}}
    finetune = Unfreeze() if kind == "base" else FinetuningScheduler(schedule, epoch_transitions_only=True, restore_best=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, callbacks=[timer, finetune], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=tempfile.mkdtemp(prefix="phasetune-bench-"),
    )
    start = time.perf_counter()
    trainer.fit(module, loader)
    total = time.perf_counter() - start
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    return statistics.median(timer.wall), statistics.median(timer.cpu), total, params


def make_loader(batches: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = 64 * batches
    data = TensorDataset(torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=64)


def count_instructions(width: int, epochs: int) -> None:
    """Per-step instructions of each variant: callgrind runs with ``short`` and ``long`` steps per epoch."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (e.g. apt-get install valgrind)")
    short, long_ = 20, 60
    counts: dict[tuple[str, int], int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = {}
        for kind in ("base", "fts"):
            for batches in (short, long_):
                cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/{kind}.{batches}", sys.executable,
                       __file__, "--one", kind, "--batches", str(batches), "--width", str(width), "--epochs", str(epochs)]
                jobs[(kind, batches)] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                print(f"started callgrind: {kind}, {batches} steps per epoch", flush=True)
        for key, job in jobs.items():
            _, err = job.communicate()
            found = re.search(r"I\s+refs:\s+([\d,]+)", err)
            if job.returncode != 0 or not found:
                raise SystemExit(f"callgrind run {key} failed:\n{err[-2000:]}")
            counts[key] = int(found.group(1).replace(",", ""))
    extra = (long_ - short) * epochs
    per_step = {k: (counts[(k, long_)] - counts[(k, short)]) / extra for k in ("base", "fts")}
    print(f"instructions per step: BaseFinetuning {per_step['base'] / 1e6:.3f} M, "
          f"FinetuningScheduler {per_step['fts'] / 1e6:.3f} M")
    print(f"per-step instruction ratio (FinetuningScheduler / BaseFinetuning): {per_step['fts'] / per_step['base']:.4f}"
          "  (target <= 1.02)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batches", type=int, default=300, help="steps per epoch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--instructions", action="store_true", help="count instructions per step under valgrind")
    ap.add_argument("--one", choices=("base", "fts"), help=argparse.SUPPRESS)  # a single run (used by --instructions)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("phasetune").setLevel(logging.ERROR)

    if args.instructions:
        count_instructions(args.width, args.epochs)
        return
    loader = make_loader(args.batches)
    if args.one:
        run(args.one, args.width, args.epochs, loader)
        return

    run("base", args.width, args.epochs, loader)  # warm-up (imports, allocator); the schedule needs every epoch
    run("fts", args.width, 1, loader)
    results: dict[str, list[tuple[float, float, float]]] = {"base": [], "fts": []}
    params = {}
    for rep in range(args.reps):
        for kind in (("base", "fts") if rep % 2 == 0 else ("fts", "base")):
            wall, cpu, total, params[kind] = run(kind, args.width, args.epochs, loader)
            results[kind].append((wall, cpu, total))
            print(f"rep {rep} {kind:>4}: median step {wall * 1e3:.3f} ms wall, {cpu * 1e3:.3f} ms cpu; fit {total:.2f} s",
                  flush=True)

    def med(kind: str, i: int) -> float:
        return statistics.median(r[i] for r in results[kind])

    def paired(i: int) -> float:
        return statistics.median(f[i] / b[i] for b, f in zip(results["base"], results["fts"]))

    diff = max((params["base"][k] - params["fts"][k]).abs().max().item() for k in params["base"])
    print()
    print(f"model: width {args.width}, {sum(p.numel() for p in params['base'].values()):,} params; "
          f"{args.epochs} epochs x {args.batches} steps; {args.reps} repetitions; {args.threads} thread(s)")
    print(f"BaseFinetuning       median step {med('base', 0) * 1e3:.3f} ms wall, {med('base', 1) * 1e3:.3f} ms cpu; "
          f"fit {med('base', 2):.2f} s")
    print(f"FinetuningScheduler  median step {med('fts', 0) * 1e3:.3f} ms wall, {med('fts', 1) * 1e3:.3f} ms cpu; "
          f"fit {med('fts', 2):.2f} s")
    print(f"per-step time ratio (FinetuningScheduler / BaseFinetuning), median of paired repetitions: "
          f"cpu {paired(1):.3f}, wall {paired(0):.3f}  (target <= 1.02)")
    print(f"whole-fit time ratio (paired):                                                        {paired(2):.3f}")
    print(f"max |param difference| between the two runs: {diff:.3g}  (0: same trajectory)")


if __name__ == "__main__":
    main()
