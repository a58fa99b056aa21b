"""Per-step overhead of FinetuningScheduler against Lightning's own BaseFinetuning.

The same model, data, seed and phase trajectory (head; +top two blocks at epoch 1; +the rest at epoch 2) is
trained (a) with a ``BaseFinetuning`` callback unfreezing at those epochs and (b) with ``FinetuningScheduler``
running the equivalent schedule with ``epoch_transitions_only``. Repetitions alternate (a)/(b) in one process
so machine noise hits both alike. Printed: median per-step time of each, their ratio, whole-fit time ratio,
and the largest parameter difference between the two runs (0 means the trajectories are identical).

    python bench/overhead.py [--reps 7] [--width 256] [--epochs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
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
    2: {"params": [r"model\.embed\..*", r"model\.layers\.[01]\..*"], "lr": LRS[2], "max_transition_epoch": 99},
}


class StepTimer(pl.Callback):
    """Wall time between consecutive batch starts within an epoch (a whole step, hooks included)."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self._last: float | None = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._last = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._last is not None:
            self.steps.append(now - self._last)
        self._last = now


def run(kind: str, width: int, epochs: int, loader: DataLoader) -> tuple[float, float, dict[str, torch.Tensor]]:
    pl.seed_everything(0, verbose=False)
    module = Module(width)
    timer = StepTimer()
    finetune = Unfreeze() if kind == "base" else FinetuningScheduler(SCHEDULE, epoch_transitions_only=True, restore_best=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, callbacks=[timer, finetune], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=tempfile.mkdtemp(prefix="phasetune-bench-"),
    )
    start = time.perf_counter()
    trainer.fit(module, loader)
    total = time.perf_counter() - start
    return statistics.median(timer.steps), total, {n: p.detach().clone() for n, p in module.named_parameters()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batches", type=int, default=300, help="steps per epoch")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("phasetune").setLevel(logging.ERROR)

    g = torch.Generator().manual_seed(0)
    n = 64 * args.batches
    data = TensorDataset(torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    loader = DataLoader(data, batch_size=64)

    run("base", args.width, 1, loader)  # warm-up (imports, allocator)
    results: dict[str, list[tuple[float, float]]] = {"base": [], "fts": []}
    params = {}
    for rep in range(args.reps):
        for kind in (("base", "fts") if rep % 2 == 0 else ("fts", "base")):
            step, total, params[kind] = run(kind, args.width, args.epochs, loader)
            results[kind].append((step, total))
            print(f"rep {rep} {kind:>4}: median step {step * 1e3:.3f} ms, fit {total:.2f} s", flush=True)

    step_base = statistics.median(s for s, _ in results["base"])
    step_fts = statistics.median(s for s, _ in results["fts"])
    fit_base = statistics.median(t for _, t in results["base"])
    fit_fts = statistics.median(t for _, t in results["fts"])
    diff = max((params["base"][k] - params["fts"][k]).abs().max().item() for k in params["base"])
    print()
    print(f"model: width {args.width}, {sum(p.numel() for p in params['base'].values()):,} params; "
          f"{args.epochs} epochs x {args.batches} steps; {args.reps} repetitions; {args.threads} thread(s)")
    print(f"BaseFinetuning       median step {step_base * 1e3:.3f} ms   fit {fit_base:.2f} s")
    print(f"FinetuningScheduler  median step {step_fts * 1e3:.3f} ms   fit {fit_fts:.2f} s")
    print(f"per-step time ratio (FinetuningScheduler / BaseFinetuning): {step_fts / step_base:.3f}  (target <= 1.02)")
    print(f"whole-fit time ratio:                                      {fit_fts / fit_base:.3f}")
    print(f"max |param difference| between the two runs: {diff:.3g}  (0: same trajectory)")


if __name__ == "__main__":
    main()
