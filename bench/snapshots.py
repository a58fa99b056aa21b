"""Restore-best snapshots cost what can change, not the model.

A ~34M-parameter model is fine-tuned in three phases (head; +2 of 8 blocks; everything) with Adam. At the end of
each phase, one restore-best snapshot (trainable parameters, their optimizer state, scheduler state, buffers) is
timed and measured, in memory and written to disk atomically, against a full Lightning checkpoint of the same
model at the same moment (``trainer.save_checkpoint``). Printed in one run: bytes and seconds of each and their ratio.

    python bench/snapshots.py [--width 2048] [--layers 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from phasetune import FinetuningScheduler
from phasetune.io import atomic_torch_save
from phasetune.snapshots import take_snapshot


class Module(pl.LightningModule):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Linear(64, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width)) for _ in range(layers))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = h + torch.relu(b(h))
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-4)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.9)}


class Measure(pl.Callback):
    def __init__(self, fts: FinetuningScheduler, workdir: str) -> None:
        self.fts, self.workdir, self.rows = fts, workdir, []

    def on_train_epoch_end(self, trainer, pl_module):
        fts = self.fts
        total = sum(p.numel() for p in pl_module.parameters())
        trainable = sum(p.numel() for p in fts.engine.trainable().values())
        t0 = time.perf_counter()
        snap = take_snapshot(
            depth=fts.curr_depth, epoch=trainer.current_epoch, step=trainer.global_step, value=0.0,
            params=fts.engine.trainable(), buffers=dict(pl_module.named_buffers()), optimizer=trainer.optimizers[0],
            schedulers=[c.scheduler for c in trainer.lr_scheduler_configs],
        )
        t_mem = time.perf_counter() - t0
        snap_path = os.path.join(self.workdir, f"snap{fts.curr_depth}.pt")
        t0 = time.perf_counter()
        atomic_torch_save(snap.to_state(), snap_path)
        t_disk = time.perf_counter() - t0
        ckpt_path = os.path.join(self.workdir, f"full{fts.curr_depth}.ckpt")
        t0 = time.perf_counter()
        trainer.save_checkpoint(ckpt_path)
        t_ckpt = time.perf_counter() - t0
        self.rows.append((fts.curr_depth, trainable, total, snap.nbytes, os.path.getsize(snap_path), t_mem, t_disk,
                          os.path.getsize(ckpt_path), t_ckpt))
        os.remove(snap_path)
        os.remove(ckpt_path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("phasetune").setLevel(logging.ERROR)

    last = args.layers - 1
    schedule = {
        0: {"params": [r"head\..*"], "max_transition_epoch": 1},
        1: {"params": [rf"blocks\.({last}|{last - 1})\..*"], "lr": 1e-4, "max_transition_epoch": 2},
        2: {"params": [rf"blocks\.[0-{last - 2}]\..*", r"embed\..*"], "lr": 1e-5, "max_transition_epoch": 3},
    }
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g))
    with tempfile.TemporaryDirectory() as workdir:
        module = Module(args.width, args.layers)
        fts = FinetuningScheduler(schedule, epoch_transitions_only=True, restore_best=False)
        measure = Measure(fts, workdir)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=3, callbacks=[fts, measure], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, default_root_dir=workdir)
        trainer.fit(module, DataLoader(data, batch_size=8))

    mb = 1 / 2**20
    print(f"model: {measure.rows[0][2]:,} parameters (float32), Adam, StepLR; one snapshot vs one full checkpoint")
    print(f"{'phase':>5} {'trainable':>17} | {'snapshot MiB':>12} {'copy s':>7} {'file MiB':>9} {'write s':>8} | "
          f"{'full ckpt MiB':>13} {'write s':>8} | {'bytes ratio':>11} {'time ratio':>10}")
    for depth, trainable, total, nbytes, fbytes, t_mem, t_disk, cbytes, t_ckpt in measure.rows:
        print(f"{depth:>5} {trainable:>10,} {100 * trainable / total:5.1f}% | {nbytes * mb:12.1f} {t_mem:7.3f} "
              f"{fbytes * mb:9.1f} {t_disk:8.3f} | {cbytes * mb:13.1f} {t_ckpt:8.3f} | "
              f"{fbytes / cbytes:11.4f} {t_disk / t_ckpt:10.3f}")
    print("bytes ratio = snapshot file / full checkpoint; time ratio = snapshot write / checkpoint write")


if __name__ == "__main__":
    main()
