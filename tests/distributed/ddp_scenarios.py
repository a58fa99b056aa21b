"""2-process DDP scenarios (run by tests/test_ddp.py under torchrun): one launch, several fits."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from helpers import ToyModule
from launch import digest, write_report
from phasetune import FinetuningScheduler, FTSCheckpoint, FTSEarlyStopping

warnings.simplefilter("ignore")
torch.set_num_threads(1)
OUT = Path(sys.argv[1])

EPOCH_SCHEDULE = {
    0: {"params": ["model.head.*"], "max_transition_epoch": 2},
    1: {"params": [r"model\.layers\.[23]\..*"], "lr": 0.05, "max_transition_epoch": 4},
    2: {"params": [r"model\.layers\.[01]\..*", "model.embed.*"], "lr": 0.02, "max_transition_epoch": 6},
}
LOSSES = [1.0, 0.9, 0.95, 0.96, 0.8, 0.85, 0.86, 0.87, 0.5, 0.6, 0.7, 0.8]


def fit(name: str, schedule, ckpt=None, es=None, **fts_kwargs):
    pl.seed_everything(3)
    module = ToyModule(val_losses=LOSSES if es else None, optimizer="adam", lr=0.01, scheduler="step", batch_size=8)
    fts = FinetuningScheduler(ft_schedule=schedule, **fts_kwargs)
    ck = FTSCheckpoint(monitor="val_loss", save_top_k=-1, dirpath=str(OUT / name), filename="{epoch}")
    callbacks = [fts, ck] + ([es] if es else [])
    t = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=20, callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
        default_root_dir=str(OUT / name),
    )
    t.fit(module, ckpt_path=ckpt)
    return {
        "depth": fts.curr_depth,
        "epoch": t.current_epoch,
        "phases": [[r.start_epoch, r.end_epoch, r.end_reason, r.restored_best] for r in fts.history],
        "params": digest(module),
        "groups": [[g["lr"], len(g["params"])] for g in t.optimizers[0].param_groups],
    }, t.global_rank


report = {}
report["epoch_run"], rank = fit("epoch_run", EPOCH_SCHEDULE, epoch_transitions_only=True)
report["resumed_phase0"], _ = fit("resumed_phase0", EPOCH_SCHEDULE, ckpt=OUT / "epoch_run" / "epoch=1.ckpt",
                                  epoch_transitions_only=True)
report["resumed_phase1"], _ = fit("resumed_phase1", EPOCH_SCHEDULE, ckpt=OUT / "epoch_run" / "epoch=3.ckpt",
                                  epoch_transitions_only=True)
es_schedule = {k: {kk: vv for kk, vv in v.items() if kk != "max_transition_epoch"} for k, v in EPOCH_SCHEDULE.items()}
report["es_run"], _ = fit("es_run", es_schedule, es=FTSEarlyStopping(monitor="val_loss", patience=2))
report["es_resumed"], _ = fit("es_resumed", es_schedule, ckpt=OUT / "es_run" / "epoch=3.ckpt",
                              es=FTSEarlyStopping(monitor="val_loss", patience=2))
write_report(str(OUT), rank, report)
