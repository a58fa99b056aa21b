"""Restore-best snapshots cost what can change, not the model.

A ~34M-parameter model is fine-tuned in three phases (head; +2 of 8 blocks; everything) with Adam. At the end of
each phase, one restore-best snapshot (trainable parameters, their optimizer state, scheduler state, buffers) is
timed and measured, in memory and written to disk atomically, against a full Lightning checkpoint of the same
model at the same moment (``trainer.save_checkpoint``). Printed in one run: bytes and seconds of each and their ratio.

A second table shows what restore-best adds to the checkpoints of a run with ``restore_best=True`` (snapshots
kept in memory and saved in checkpoints): per phase, the plain checkpoint (the same file without the snapshot),
what phasetune 0.1 wrote (a snapshot in every phase, the final one included, where it is never restored), and
what it writes now (no snapshot in the final phase: equal to the plain checkpoint).

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
from phasetune.features.snapshots import take_snapshot
from phasetune.util.files import atomic_torch_save


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

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        opt = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-4)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.9)}


class Measure(pl.Callback):
    def __init__(self, fts: FinetuningScheduler, workdir: str) -> None:
        self.fts, self.workdir, self.rows, self.ckpt_rows = fts, workdir, [], []

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
        # the same checkpoint without restore-best's snapshot: what a run with restore_best=False writes
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("FinetuningScheduler"))
        had_snapshot = state.pop("snapshot", None) is not None
        plain_path = os.path.join(self.workdir, "plain.ckpt")
        torch.save(ckpt, plain_path)
        plain, now = os.path.getsize(plain_path), os.path.getsize(ckpt_path)
        # phasetune 0.1 kept a snapshot in every phase: where none is kept now, add the one it would have held
        before = now if had_snapshot else plain + os.path.getsize(snap_path)
        self.ckpt_rows.append((fts.curr_depth, fts.is_final_phase, plain, before, now))
        for path in (snap_path, ckpt_path, plain_path):
            os.remove(path)


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
        fts = FinetuningScheduler(schedule, epoch_transitions_only=True, restore_best=True)
        measure = Measure(fts, workdir)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=3, callbacks=[fts, measure], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, default_root_dir=workdir)
        trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=16))

    mb = 1 / 2**20
    print(f"model: {measure.rows[0][2]:,} parameters (float32), Adam, StepLR; one snapshot vs one full checkpoint")
    print(f"{'phase':>5} {'trainable':>17} | {'snapshot MiB':>12} {'copy s':>7} {'file MiB':>9} {'write s':>8} | "
          f"{'full ckpt MiB':>13} {'write s':>8} | {'bytes ratio':>11} {'time ratio':>10}")
    for depth, trainable, total, nbytes, fbytes, t_mem, t_disk, cbytes, t_ckpt in measure.rows:
        print(f"{depth:>5} {trainable:>10,} {100 * trainable / total:5.1f}% | {nbytes * mb:12.1f} {t_mem:7.3f} "
              f"{fbytes * mb:9.1f} {t_disk:8.3f} | {cbytes * mb:13.1f} {t_ckpt:8.3f} | "
              f"{fbytes / cbytes:11.4f} {t_disk / t_ckpt:10.3f}")
    print("bytes ratio = snapshot file / full checkpoint; time ratio = snapshot write / checkpoint write")
    print()
    print("checkpoint bytes with restore_best=True (in-memory snapshots saved in checkpoints), at the end of each phase")
    print(f"{'phase':>5} {'plain MiB':>10} {'0.1 MiB':>10} {'now MiB':>10} | {'0.1/plain':>9} {'now/plain':>9}")
    for depth, final, plain, before, now in measure.ckpt_rows:
        print(f"{depth:>5} {plain * mb:10.1f} {before * mb:10.1f} {now * mb:10.1f} | {before / plain:9.3f} "
              f"{now / plain:9.3f}{'  (final phase)' if final else ''}")
    print("plain: the same checkpoint without the snapshot; 0.1: phasetune 0.1 kept a snapshot in every phase")


if __name__ == "__main__":
    main()
