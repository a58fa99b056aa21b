"""2-process DDP scenarios (run by tests/test_ddp.py under torchrun): one launch, several fits."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from fts_reference.scenarios import scenario, thawed_per_epoch
from helpers import DropoutToyModule, PrefixModule, PrefixSpills, ToyModule
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
        # epoch-driven runs end at the final phase's max_transition_epoch (6) by max_epochs, as in FTS
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=20 if es else 6, callbacks=callbacks, logger=False,
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

# FTS's reference scenarios (tests/fts_reference): the thawed set of every epoch, as on one process
report["fts_thawed"] = {
    name: thawed_per_epoch(scenario(name), FinetuningScheduler, FTSEarlyStopping, FTSCheckpoint, OUT / f"fts_{name}",
                           devices=2, strategy="ddp")
    for name in ("es_restore_best", "epoch_only_123")
}


class Unsynced(ToyModule):
    """Each rank logs its own val_loss without sync_dist: rank 0's keeps falling, rank 1's stops improving."""

    CURVES = ([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0])

    def validation_step(self, batch, batch_idx):
        curve = self.CURVES[self.global_rank]
        self.log("val_loss", torch.tensor(curve[min(self.current_epoch, len(curve) - 1)]))


pl.seed_everything(3)
unsynced_es = FTSEarlyStopping(monitor="val_loss", patience=1)
unsynced_fts = FinetuningScheduler(ft_schedule=es_schedule)
t = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=8, callbacks=[unsynced_fts, unsynced_es],
               logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
               deterministic=True, default_root_dir=str(OUT / "unsynced"))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    t.fit(Unsynced(batch_size=8))
report["unsynced"] = {
    "reduce_transition_decisions": unsynced_es.reduce_transition_decisions,
    "phases": [[r.start_epoch, r.end_epoch, r.end_reason] for r in unsynced_fts.history],
    "epoch": t.current_epoch,
    "warnings": [str(w.message) for w in caught if "differs across ranks" in str(w.message)],
}


# exact resume with randomness: Dropout, data noise from Python's random.gauss and NumPy, and a different
# random stream on each rank (a resume that swapped or dropped ranks' states would not be bit-equal)
def random_fit(name: str, ckpt=None):
    pl.seed_everything(3)
    module = DropoutToyModule(val_losses=LOSSES, batch_size=8)
    pl.seed_everything(100 + int(os.environ["RANK"]))  # the same weights, each rank's own random stream
    fts = FinetuningScheduler(ft_schedule=es_schedule)
    ck = FTSCheckpoint(monitor="val_loss", save_top_k=-1, dirpath=str(OUT / name), filename="{epoch}")
    t = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=20, logger=False,
                   callbacks=[fts, ck, FTSEarlyStopping(monitor="val_loss", patience=2)], enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
                   default_root_dir=str(OUT / name))
    t.fit(module, ckpt_path=ckpt)
    return {"params": digest(module), "phases": [[r.start_epoch, r.end_epoch, r.restored_best] for r in fts.history]}


report["random_run"] = random_fit("random_run")
for epoch in (3, 8):  # just before the restore-best transition of phase 0; the final phase
    report[f"random_resumed_{epoch}"] = random_fit(f"random_resumed_{epoch}", OUT / "random_run" / f"epoch={epoch}.ckpt")


# The frozen-prefix cache under DDP, set by the schedule key and run by the callback's controller. Phase 0
# (epochs 0-3) trains the head, with a Dropout above the boundary, on a frozen body; Lightning's DistributedSampler
# gives each rank another half of the data every epoch, so each rank's cache, keyed by dataset index, fills in over
# the epochs and serves a batch once the rank has seen all its samples. The reference is the same fit without the
# cache whose body is in eval mode in phase 0, as the cache puts it.
PREFIX_SCHEDULE = {0: {"params": [r"head\..*"], "max_transition_epoch": 4},
                   1: {"params": [r"body\..*"], "lr": 0.05, "max_transition_epoch": 6}}


class SeenModule(PrefixModule):
    """Records each training batch's sample indices by epoch: the test replays the cache's decisions from them."""

    def __init__(self, eval_body) -> None:
        super().__init__(eval_body, dropout="head", batch_size=4)  # 6 batches a rank an epoch, some all seen before
        self.seen: list[list[list[int]]] = []

    def training_step(self, batch, batch_idx):
        while len(self.seen) <= self.current_epoch:
            self.seen.append([])
        self.seen[self.current_epoch].append(batch[1].tolist())
        return super().training_step(batch, batch_idx)


def prefix_fit(name: str, cached: bool) -> dict:
    pl.seed_everything(3)
    # limit_mb 0 and PrefixSpills' tiny chunks send the entries to spill files, which must not outlive the phase
    schedule = {0: {**PREFIX_SCHEDULE[0], "prefix_cache": {"limit_mb": 0}}, 1: PREFIX_SCHEDULE[1]} if cached \
        else PREFIX_SCHEDULE
    fts = FinetuningScheduler(ft_schedule=schedule, restore_best=False, epoch_transitions_only=True)
    module = SeenModule(None if cached else lambda: fts.curr_depth == 0)
    spills = PrefixSpills(fts, at_epoch=3) if cached else None
    t = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=6, callbacks=[fts, spills] if spills else [fts],
                   logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, deterministic=True, default_root_dir=str(OUT / name))
    t.fit(module)
    return {
        "params": digest(module),
        "seen": module.seen,
        "phases": [[r.start_epoch, r.end_epoch] for r in fts.history],
        "cache_lines": [r.prefix_cache for r in fts.history],
        "spill_files": spills.files if spills else None,
        "spill_folders_left": len(list((OUT / name).rglob(f"prefix-cache-rank{t.global_rank}-*"))),
        "hooks_left": fts.caches is not None or "on_train_batch_start" in vars(fts),
        "all_in_train_mode": all(m.training for m in module.modules()),
    }


report["prefix_plain"] = prefix_fit("prefix_plain", cached=False)
report["prefix_cached"] = prefix_fit("prefix_cached", cached=True)

write_report(str(OUT), rank, report)
