"""The run core (phasetune.run.PhaseRun) under its front ends: the Lightning callback and the plain loop agree,
and the bookkeeping bugs found in review stay fixed."""

from __future__ import annotations

import itertools
import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from helpers import SCHEDULE_3, ToyModule, float32_drift, trainer
from loop_runs import (
    MIXED,
    MIXED_VAL_LOSSES,
    STEP_VAL_LOSSES,
    STEPS,
    epoch_loop_run,
    step_loop_run,
    trajectory_point,
)
from phasetune import ConfigurationError, FinetuningScheduler, FTSCheckpoint, FTSEarlyStopping, RunOptions
from phasetune.loop import ScheduledFinetuning

EPOCH_SCHEDULE = {k: v | {"max_transition_epoch": k + 1} for k, v in SCHEDULE_3.items()}
# FRONT_ENDS: the callback's and the loop's weights are compared numerically: the same losses and steps through
# other code (Lightning's closure and loops) that may order a sum otherwise; sums of 16 terms (the toy network's
# width, the batch), weights below 1, over the runs' optimizer steps (float32_drift)


class Record(pl.Callback):
    """Per-epoch trajectory, read after the scheduler's epoch-start hook (it comes later in the list)."""

    def __init__(self) -> None:
        self.epochs: list[tuple] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append(trajectory_point(pl_module, trainer.optimizers[0]))


def lightning_run(tmp_path, **fts_kwargs):
    torch.manual_seed(0)
    module = ToyModule(val_losses=MIXED_VAL_LOSSES, lr=0.1)
    rec = Record()
    fts = FinetuningScheduler(ft_schedule=MIXED, **fts_kwargs)
    t = trainer(tmp_path, [fts, FTSEarlyStopping(monitor="val_loss", patience=2), rec], max_epochs=12,
                enable_checkpointing=False)
    t.fit(module)
    return module, fts, rec.epochs


@pytest.mark.numerical
@pytest.mark.parametrize("restore_best", [True, False])
def test_the_callback_and_the_loop_run_the_same_trajectory(tmp_path, restore_best):
    lit_module, fts, lit_epochs = lightning_run(tmp_path, restore_best=restore_best)
    loop_module, ft, loop_epochs = epoch_loop_run(restore_best=restore_best)
    assert lit_epochs == loop_epochs
    assert len({e[0] for e in lit_epochs}) == 3  # all three phases ran
    for a, b in zip(fts.history, ft.history):
        assert (a.depth, a.start_epoch, a.end_epoch, a.end_reason, a.best_epoch, a.restored_best) == (
            b.depth, b.start_epoch, b.end_epoch, b.end_reason, b.best_epoch, b.restored_best)
    lit = dict(lit_module.named_parameters())
    for n, p in loop_module.named_parameters():  # numerical: FRONT_ENDS, up to 12 epochs of 4 steps
        torch.testing.assert_close(p, lit[n], rtol=0, atol=float32_drift(48, 16), msg=n)


def test_both_front_ends_have_the_same_defaults():
    import inspect
    from dataclasses import fields

    lit = inspect.signature(FinetuningScheduler).parameters
    loop = inspect.signature(ScheduledFinetuning).parameters
    knobs = {f.name: f.default for f in fields(RunOptions)}  # the loop takes them as options= (or keywords)
    assert {"max_depth", "base_max_lr", "restore_best", "epoch_transitions_only", "schedule_style",
            "enforce_phase0_params", "snapshot_storage"} <= set(knobs) <= set(lit)
    assert {n: lit[n].default for n in knobs} == knobs
    shared = set(lit) & set(loop)
    assert {n: lit[n].default for n in shared} == {n: loop[n].default for n in shared}


def test_every_front_end_is_a_host_of_the_run():
    import inspect

    from phasetune.hf import PhasetuneTrainerCallback
    from phasetune.run import Host

    for host in (FinetuningScheduler, PhasetuneTrainerCallback, ScheduledFinetuning):
        for name in ("optimizer_and_schedulers", "install", "trained_model"):
            assert inspect.signature(getattr(host, name)).parameters.keys() == \
                inspect.signature(getattr(Host, name)).parameters.keys(), (host.__name__, name)


def test_the_final_phase_takes_no_snapshot_and_checkpoints_carry_none(tmp_path):
    _, fts, _ = lightning_run(tmp_path, restore_best=True)
    assert fts.curr_depth == 2 and fts.history[2].best_value is not None
    assert fts.snapshot is None
    state = fts.state_dict()
    assert "snapshot" not in state and "snapshot_ref" not in state


class LateModule(ToyModule):
    """Builds its network in configure_model, so the scheduler resolves the schedule at fit start (as under
    sharded strategies)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        del self.model

    def configure_model(self):
        if not hasattr(self, "model"):
            from helpers import Net

            self.model = Net()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


@pytest.mark.parametrize("module_cls", [ToyModule, LateModule], ids=["at-setup", "deferred"])
def test_one_callback_serves_two_fits(tmp_path, module_cls):
    fts = FinetuningScheduler(ft_schedule=EPOCH_SCHEDULE, epoch_transitions_only=True, restore_best=False)
    for run in range(2):
        torch.manual_seed(run)
        module = module_cls()
        t = trainer(tmp_path / str(run), [fts], max_epochs=3, enable_checkpointing=False)
        t.fit(module)
        assert [r.depth for r in fts.history] == [0, 1, 2]
        held = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
        assert held == {id(p) for p in module.parameters()}  # this fit's model, every phase thawed


ORDERS = list(itertools.permutations(["stopper", "checkpoint", "scheduler"]))


@pytest.mark.parametrize("epoch_transitions_only", [True, False])
@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_every_callback_order_sets_up_every_callback(tmp_path, order, epoch_transitions_only):
    make = {
        "stopper": lambda: EarlyStopping(monitor="val_loss", patience=2),
        "checkpoint": lambda: ModelCheckpoint(dirpath=str(tmp_path / "ckpt")),
        "scheduler": lambda: FinetuningScheduler(ft_schedule=EPOCH_SCHEDULE, epoch_transitions_only=epoch_transitions_only),
    }
    callbacks = [make[name]() for name in order]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(tmp_path, callbacks, max_epochs=3, enable_progress_bar=True)
        t.fit(ToyModule(val_losses=MIXED_VAL_LOSSES))
    fts = next(c for c in t.callbacks if isinstance(c, FinetuningScheduler))
    assert fts.curr_depth == 2
    assert t.progress_bar_callback is not None and t.progress_bar_callback._trainer is t
    stoppers = [c for c in t.callbacks if isinstance(c, EarlyStopping)]
    assert [type(c) for c in stoppers] == ([] if epoch_transitions_only else [FTSEarlyStopping])
    ckpt = t.checkpoint_callback
    assert isinstance(ckpt, FTSCheckpoint) and ckpt.dirpath == str(tmp_path / "ckpt") and ckpt.best_model_path


def test_a_partly_failed_restore_is_reported_as_such(caplog):
    torch.manual_seed(0)
    module = ToyModule()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    ft = ScheduledFinetuning({0: {"params": ["model.head.*"]}, 1: {"params": ["model.embed.*"]}}, module, opt,
                             patience=1)
    ft.step(0, metric=1.0)  # the best state of phase 0: one param group
    ft.optimizer.add_param_group({"params": [module.model.layers[0].lin.weight], "lr": 0.0})
    with caplog.at_level(logging.INFO, logger="phasetune"):
        ft.step(1, metric=2.0)
    assert ft.depth == 1 and not ft.history[0].restored_best
    text = caplog.text
    assert "could not restore the best state of epoch 0 exactly" in text and "param groups" in text
    assert "restoring the best state failed" in text and "no best state was recorded" not in text


def test_new_optimizer_keeps_the_users_per_group_hyperparameters_or_names_the_dropped_ones():
    module = ToyModule()
    head, embed = module.model.head, module.model.embed
    opt = torch.optim.SGD([{"params": [head.weight], "momentum": 0.5, "weight_decay": 0.1},
                           {"params": [head.bias], "weight_decay": 0.0}], lr=0.1, weight_decay=0.01)
    schedule = {0: {"params": ["model.head.*"], "max_transition_epoch": 1},
                1: {"params": ["model.embed.*"], "lr": 0.01, "max_transition_epoch": 2,
                    "new_optimizer": {"optimizer_init": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}}}},
                2: {"params": [r"model\.layers\..*"], "lr": 0.001,
                    "new_optimizer": {"optimizer_init": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01}}}}}
    ft = ScheduledFinetuning(schedule, module, opt, restore_best=False)
    with pytest.warns(UserWarning, match=r"AdamW takes no momentum=0.5"):
        ft.step(0)
    adamw = ft.optimizer
    assert isinstance(adamw, torch.optim.AdamW)
    wd = {id(p): g["weight_decay"] for g in adamw.param_groups for p in g["params"]}
    assert wd[id(head.weight)] == 0.1 and wd[id(head.bias)] == 0.0  # per-group values followed the groups
    assert wd[id(embed.weight)] == 0.1  # the new phase's groups copy the user's first group (see GroupLayout)
    ft.step(1)
    assert isinstance(ft.optimizer, torch.optim.SGD)


def test_resuming_with_another_monitor_is_refused(tmp_path):
    torch.manual_seed(0)
    ckpt = FTSCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val_loss", save_last=True)
    t = trainer(tmp_path, [FinetuningScheduler(ft_schedule=SCHEDULE_3), FTSEarlyStopping(monitor="val_loss", patience=1),
                           ckpt], max_epochs=2)
    t.fit(ToyModule(val_losses=MIXED_VAL_LOSSES))
    t2 = trainer(tmp_path, [FinetuningScheduler(ft_schedule=SCHEDULE_3),
                            FTSEarlyStopping(monitor="val_real_loss", patience=1),
                            FTSCheckpoint(dirpath=str(tmp_path / "ckpt2"), monitor="val_real_loss")], max_epochs=4)
    with pytest.raises(ConfigurationError, match=r"monitoring 'val_loss', this run monitors 'val_real_loss'"):
        t2.fit(ToyModule(val_losses=MIXED_VAL_LOSSES), ckpt_path=ckpt.last_model_path)


class RecordSteps(pl.Callback):
    """Per-step trajectory: what trains in each optimizer step, read before it."""

    def __init__(self) -> None:
        self.steps: list[tuple] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trajectory_point(pl_module, trainer.optimizers[0]))


@pytest.mark.numerical
def test_the_callback_and_the_loop_run_a_step_capped_schedule_alike_step_by_step(tmp_path):
    torch.manual_seed(0)
    module = ToyModule(val_losses=STEP_VAL_LOSSES, lr=0.1)
    rec = RecordSteps()
    t = trainer(tmp_path, [FinetuningScheduler(ft_schedule=STEPS), FTSEarlyStopping(monitor="val_loss", patience=2),
                           rec], max_epochs=4, enable_checkpointing=False)
    t.fit(module)
    loop_module, _, loop_steps, _ = step_loop_run()
    assert len(rec.steps) == 16 and rec.steps == loop_steps  # thawed set, groups and lrs before every step
    reference = dict(loop_module.named_parameters())
    for n, p in module.named_parameters():  # numerical: FRONT_ENDS, 16 steps
        torch.testing.assert_close(p, reference[n], rtol=0, atol=float32_drift(16, 16), msg=n)
