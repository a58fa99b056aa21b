"""2-process DDP runs of a step-capped schedule (run by tests/test_steps.py under torchrun): a fit whose phases
end mid-epoch, and a resume from an epoch-end checkpoint in the middle of phase 1."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Subset

from helpers import ToyModule, dataset
from launch import digest, write_report
from loop_runs import STEP_VAL_LOSSES, STEPS
from phasetune import FinetuningScheduler, FTSCheckpoint, FTSEarlyStopping

warnings.simplefilter("ignore")
torch.set_num_threads(1)
OUT = Path(sys.argv[1])


class Interleaved(ToyModule):
    """Rank r trains on samples r, r+2, ... in order: each step's 2 x 8 samples are one process's batch of 16."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Subset(dataset(64, 0), range(self.global_rank, 64, 2)), batch_size=8, shuffle=False)


def fit(name: str, ckpt: Path | None = None) -> tuple[dict, int]:
    torch.manual_seed(0)
    # 2 ranks x 8 samples a step: the same 16 samples per step as one process with batches of 16
    module = Interleaved(val_losses=STEP_VAL_LOSSES, lr=0.1)
    fts = FinetuningScheduler(ft_schedule=STEPS)
    callbacks = [fts, FTSEarlyStopping(monitor="val_loss", patience=2),
                 FTSCheckpoint(monitor="val_loss", save_top_k=-1, dirpath=str(OUT / name), filename="{epoch}")]
    t = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=4, callbacks=callbacks, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
                   use_distributed_sampler=False, default_root_dir=str(OUT / name))
    t.fit(module, ckpt_path=ckpt)
    rows = [[r.depth, r.start_epoch, r.start_step, r.end_step, r.end_reason, r.restored_best] for r in fts.history]
    return {"global_step": t.global_step, "phases": rows, "params": digest(module)}, t.global_rank


report = {}
report["run"], rank = fit("run")
report["resumed"], _ = fit("resumed", OUT / "run" / "epoch=1.ckpt")  # after step 8, in phase 1 (cap: step 11)
write_report(str(OUT), rank, report)
