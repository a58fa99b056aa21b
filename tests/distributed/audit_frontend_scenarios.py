"""The thaw audit under Lightning on 2 processes (run by tests/test_audit_frontends.py under torchrun): one launch.

DDP (fresh, resumed in a phase, and with a callback that re-freezes a layer after each transition), FSDP1
(``use_orig_params=True``) and FSDP2 (``ModelParallelStrategy``) normal runs with the audit on (``audit="raise"``).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from fsdp2_models import PLAN, LMModule
from fsdp_cpu import OVERRIDES, CPUFSDPStrategy
from helpers import Block, ToyModule
from launch import write_report
from phasetune import AuditError, FinetuningScheduler, FTSCheckpoint

warnings.simplefilter("ignore")
torch.set_num_threads(1)
OUT = Path(sys.argv[1])

#: phase 1 lasts 2 epochs, so a resume from the end of epoch 1 trains a step of phase 1 again
DDP_SCHEDULE = {
    0: {"params": ["model.head.*"], "max_transition_epoch": 1},
    1: {"params": [r"model\.layers\.[23]\..*"], "lr": 0.05, "max_transition_epoch": 3},
    2: {"params": [r"model\.layers\.[01]\..*", "model.embed.*"], "lr": 0.02, "max_transition_epoch": 4},
}
FSDP1_SCHEDULE = {
    0: {"params": ["model.head.*"], "max_transition_epoch": 1},
    1: {"params": [r"model\.layers\.[4-7]\..*"], "lr": 0.05, "max_transition_epoch": 2},
    2: {"params": [r"model\.layers\.[0-3]\..*", "model.embed.*"], "lr": 0.02, "max_transition_epoch": 3},
}
FSDP2_SCHEDULE = {
    0: {"params": ["model.head.*", "model.norm.*"], "max_transition_epoch": 1},
    1: {"params": [r"model\.layers\.[23]\..*"], "lr": 0.05, "max_transition_epoch": 2},
    2: {"params": [r"model\.layers\.[01]\..*", "model.embed.*"], "lr": 0.02, "max_transition_epoch": 3},
}


class Refreeze(pl.Callback):
    """Listed after FinetuningScheduler: freezes ``model.layers.3`` again at every epoch start."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for p in pl_module.model.layers[3].parameters():
            p.requires_grad_(False)


def verdict(line: str | None) -> str | None:
    return "passed" if line is not None and "all trained" in line else line


def fit(name: str, module: pl.LightningModule, schedule: dict, strategy: Any, max_epochs: int, callbacks=(),
        ckpt: Any = None, **trainer_kw: Any) -> dict[str, Any]:
    fts = FinetuningScheduler(ft_schedule=schedule, epoch_transitions_only=True,
                              strategy_adapter_cfg=trainer_kw.pop("cfg", None))
    t = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=max_epochs, callbacks=[fts, *callbacks],
                   logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   deterministic=True, default_root_dir=str(OUT / name), **trainer_kw)
    t.fit(module, ckpt_path=ckpt)
    return {"depth": fts.curr_depth, "audits": [verdict(r.audit) for r in fts.history],
            "stages": [r.audit for r in fts.history]}


def ddp(name: str, callbacks=(), ckpt: Any = None) -> dict[str, Any]:
    pl.seed_everything(3)
    saver = FTSCheckpoint(monitor="val_loss", save_top_k=-1, dirpath=str(OUT / name), filename="{epoch}")
    return fit(name, ToyModule(lr=0.05), DDP_SCHEDULE, "ddp", 4, [*callbacks, saver], ckpt=ckpt)


def caught(run) -> dict[str, Any]:
    try:
        run()
    except AuditError as e:
        return {"causes": [f.cause for f in e.result.findings], "params": e.result.findings[0].params,
                "found": {f.cause: f.params for f in e.result.findings}, "stage": e.result.stage}
    return {"causes": [], "params": [], "found": {}, "stage": None}


report: dict[str, Any] = {}
report["ddp_ok"] = ddp("ddp_ok")
report["ddp_resumed"] = ddp("ddp_resumed", ckpt=OUT / "ddp_ok" / "epoch=1.ckpt")
report["ddp_refrozen"] = caught(lambda: ddp("ddp_refrozen", [Refreeze()]))

pl.seed_everything(3)
report["fsdp1"] = fit("fsdp1", ToyModule(lr=0.05, n_layers=8, batch_size=8), FSDP1_SCHEDULE,
                      CPUFSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True), 3, cfg=OVERRIDES)
pl.seed_everything(3)
report["fsdp2"] = fit("fsdp2", LMModule(), FSDP2_SCHEDULE,
                      ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), 3,
                      cfg={"fsdp_plan": PLAN}, use_distributed_sampler=False)

write_report(str(OUT), torch.distributed.get_rank(), report)
torch.distributed.destroy_process_group()
