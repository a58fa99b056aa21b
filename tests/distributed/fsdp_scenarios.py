"""2-process FSDP1 scenarios (run by tests/test_fsdp.py under torchrun, gloo, CPU): one launch, many fits.

An 8-layer ToyModule wrapped per Block (``auto_wrap_policy={Block}``) plus ``awp_overrides=["model.head"]``
runs a 3-phase schedule in both ``use_orig_params`` modes and resumes from a phase-1 checkpoint; then a
restore-best run driven by early stopping resumes mid-phase; then misconfigured fits stop before training
and report what they said.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from fsdp_cpu import OVERRIDES, SCHEDULE, CPUFSDPStrategy
from helpers import Block, ToyModule
from launch import write_report
from phasetune import ConfigurationError, FinetuningScheduler, FTSCheckpoint, FTSEarlyStopping

warnings.simplefilter("ignore")
torch.set_num_threads(1)
OUT = Path(sys.argv[1])

ES_SCHEDULE = {k: {kk: vv for kk, vv in v.items() if kk != "max_transition_epoch"} for k, v in SCHEDULE.items()}
LOSSES = [1.0, 0.9, 0.95, 0.96, 0.8, 0.85, 0.86, 0.87, 0.5, 0.6, 0.7, 0.8]  # transitions at epochs 4 and 7


class Probe(pl.Callback):
    """Per epoch: logical names thawed, tensors the optimizer trains, and which logical parameters changed."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._before: dict[str, torch.Tensor] = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fts = trainer.callbacks[0]
        self._before = trainer.strategy.lightning_module_state_dict()  # full, on rank 0 (all ranks gather)
        self.rows.append({
            "epoch": trainer.current_epoch,
            "depth": fts.curr_depth,
            "thawed": len(fts.thawed_params),
            "trainable_tensors": sum(1 for p in trainer.model.parameters() if p.requires_grad),
            "optimizer_tensors": [len(g["params"]) for g in trainer.optimizers[0].param_groups],
        })

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        after = trainer.strategy.lightning_module_state_dict()
        # exact: the same tensors before and after the epoch (a frozen one is never written)
        self.rows[-1]["changed"] = sorted(n for n in after if not torch.equal(after[n], self._before[n]))


def full_params(trainer: pl.Trainer) -> dict[str, list[float]]:
    state = trainer.strategy.lightning_module_state_dict()
    return {n: t.double().flatten().tolist() for n, t in state.items()}


def fit(name, orig, schedule=SCHEDULE, ckpt=None, es=False, cfg=OVERRIDES, **strategy_kw):
    pl.seed_everything(3)
    module = ToyModule(val_losses=LOSSES if es else None, optimizer="adam", lr=0.01, scheduler="step", batch_size=8,
                       n_layers=8)
    fts = FinetuningScheduler(ft_schedule=schedule, epoch_transitions_only=not es, strategy_adapter_cfg=cfg)
    probe = Probe()
    ck = FTSCheckpoint(monitor="val_loss", save_top_k=-1, dirpath=str(OUT / name), filename="{epoch}")
    callbacks = [fts, probe, ck] + ([FTSEarlyStopping(monitor="val_loss", patience=2)] if es else [])
    strategy = CPUFSDPStrategy(auto_wrap_policy={Block}, use_orig_params=orig, **strategy_kw)
    t = pl.Trainer(
        # epoch-driven runs end at the final phase's max_transition_epoch (6) by max_epochs, as in FTS
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=20 if es else 6, callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
        default_root_dir=str(OUT / name),
    )
    t.fit(module, ckpt_path=ckpt)
    return {
        "depth": fts.curr_depth,
        "epoch": t.current_epoch,
        "phases": [[r.start_epoch, r.end_epoch, r.end_reason, r.restored_best] for r in fts.history],
        "trainable_params": [r.trainable_params for r in fts.history],
        "epochs": probe.rows,
        "params": full_params(t),
        "groups": [[g["lr"], len(g["params"]), g["ft_phase"]] for g in t.optimizers[0].param_groups],
        "units": len(fts.adapter.param_index().units),
        "patches_left": patches_left(t),
    }, t, module


def patches_left(t: pl.Trainer) -> list[str]:
    """phasetune's instance patches still on the strategy, or a wrap policy other than the user's, after fit."""
    from phasetune.sharding.fsdp1_alignment import AlignedWrapPolicy

    left = [k for k in ("load_checkpoint", "optimizer_state", "save_checkpoint") if k in vars(t.strategy)]
    return left + (["auto_wrap_policy"] if isinstance(t.strategy.kwargs.get("auto_wrap_policy"), AlignedWrapPolicy) else [])


class ManuallyWrapped(ToyModule):
    """Wraps its modules itself in configure_model (Lightning then wraps nothing), then ``model`` around them."""

    enclose = True

    def configure_model(self) -> None:
        from torch.distributed.fsdp.wrap import wrap

        net = self.model
        net.embed, net.head = wrap(net.embed), wrap(net.head)
        for i, layer in enumerate(net.layers):
            net.layers[i] = wrap(layer)
        if self.enclose:
            self.model = wrap(net)


class ManyRoots(ManuallyWrapped):
    enclose = False


def manual_fit(name):
    pl.seed_everything(3)
    module = ManuallyWrapped(optimizer="adam", lr=0.01, batch_size=8, n_layers=8)
    fts = FinetuningScheduler(ft_schedule=SCHEDULE, epoch_transitions_only=True, strategy_adapter_cfg=OVERRIDES)
    probe = Probe()
    ck = FTSCheckpoint(monitor="val_loss", save_top_k=-1, dirpath=str(OUT / name), filename="{epoch}")
    t = pl.Trainer(
        accelerator="cpu", devices=2, strategy=CPUFSDPStrategy(use_orig_params=False),
        # 3 epochs of 4 steps (64 samples, 2 ranks, batch 8): max_epochs alone would be raised to the schedule's 6
        max_epochs=3, max_steps=12, callbacks=[fts, probe, ck], logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(OUT / name),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(module)
    return {
        "warnings": [str(w.message) for w in caught if "awp_overrides" in str(w.message)],
        "units": sorted(u.module for u in fts.adapter.param_index().units),
        "epochs": probe.rows,
        "checkpoints": sorted(p.name for p in (OUT / name).glob("*.ckpt")),
    }


class Halt(Exception):
    pass


class HaltAtTrainStart(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise Halt


def setup_only(schedule=SCHEDULE, orig=False, cfg=None, module=None, make_kw=None, **strategy_kw):
    """Fit until training would start; return the error (or None), the warnings and the adapter."""
    pl.seed_everything(3)
    module = module or ToyModule(optimizer="adam", lr=0.01, batch_size=8, n_layers=8)
    if make_kw is not None:
        strategy_kw.update(make_kw(module))
    fts = FinetuningScheduler(ft_schedule=schedule, epoch_transitions_only=True, strategy_adapter_cfg=cfg)
    t = pl.Trainer(
        accelerator="cpu", devices=2, strategy=CPUFSDPStrategy(use_orig_params=orig, **strategy_kw), max_epochs=2,
        callbacks=[fts, HaltAtTrainStart()], logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(OUT / "setup_only"),
    )
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            t.fit(module)
        except ConfigurationError as e:
            error = str(e)
        except Halt:
            pass
    relevant = [str(w.message) for w in caught if "configure_optimizers" not in str(w.message)]
    return {"error": error, "warnings": relevant}, fts


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


report: dict = {}
for orig in (False, True):
    tag = "orig" if orig else "flat"
    kw = {"activation_checkpointing_policy": {Block}} if orig else {}
    report[f"{tag}_run"], t, done_module = fit(f"{tag}_run", orig, **kw)
    report[f"{tag}_resumed"], _, _ = fit(f"{tag}_resumed", orig, ckpt=OUT / f"{tag}_run" / "epoch=3.ckpt", **kw)
rank = t.global_rank

report["es_run"], _, _ = fit("es_run", False, schedule=ES_SCHEDULE, es=True)
report["es_resumed"], _, _ = fit("es_resumed", False, schedule=ES_SCHEDULE, es=True, ckpt=OUT / "es_run" / "epoch=5.ckpt")

# ---- misconfigurations and diagnostics (each stops before training)
report["root_mix"], _ = setup_only(cfg=None, auto_wrap_policy={Block})
split = {
    0: {"params": ["model.head.*", r"model\.layers\.7\.lin\..*"], "max_transition_epoch": 1},
    1: {"params": [r"model\.layers\.7\.norm\..*", r"model\.layers\.6\..*"], "max_transition_epoch": 2},
}
report["split_and_unmatched"], _ = setup_only(
    split, cfg={"awp_overrides": ["model.head", "model.nothere", r"model\.layers\.9"]}, auto_wrap_policy={Block}
)
report["one_unit"], _ = setup_only(cfg=None)
report["phase0_ignored"], _ = setup_only(
    orig=True, cfg=None, auto_wrap_policy={Block}, make_kw=lambda m: {"ignored_modules": [m.model.head]}
)
report["already_wrapped"], _ = setup_only(module=done_module, cfg=OVERRIDES, auto_wrap_policy={Block})
handler = ListHandler()
phasetune_log = logging.getLogger("phasetune")
phasetune_log.addHandler(handler)
level = phasetune_log.level
phasetune_log.setLevel(logging.DEBUG)
report["orig_root_head"], fts = setup_only(orig=True, cfg=None, auto_wrap_policy={Block})
phasetune_log.setLevel(level)
phasetune_log.removeHandler(handler)
report["orig_root_head"]["empty_phase0_ranks"] = fts.adapter.empty_phase0_ranks
report["orig_root_head"]["debug"] = [m for m in handler.messages if "no shard" in m]
report["min_num_params"], fts = setup_only(cfg={"min_num_params": 100, **OVERRIDES}, auto_wrap_policy={Block})
report["min_num_params"]["units"] = sorted(u.module for u in fts.adapter.param_index().units)
report["manual"] = manual_fit("manual")
report["many_roots"], _ = setup_only(module=ManyRoots(optimizer="adam", lr=0.01, batch_size=8, n_layers=8))

write_report(str(OUT), rank, report)
