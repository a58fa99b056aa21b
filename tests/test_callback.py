"""FinetuningScheduler in a real (single-process, CPU) Trainer."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from helpers import SCHEDULE_3, ToyModule, trainer
from phasetune import (
    ConfigurationError,
    FinetuningScheduler,
    FTSCheckpoint,
    FTSEarlyStopping,
    ScheduleError,
    ScheduleGenerated,
)
from phasetune.core.engine import PhaseEngine
from phasetune.core.param_groups import PHASE_KEY
from phasetune.lightning.adapters import select_adapter
from phasetune.run import PhaseRun
from phasetune.run.step_events import StepEvents

EPOCH_SCHEDULE = {
    0: {"params": ["model.head.*"], "max_transition_epoch": 2},
    1: {"params": [r"model\.layers\.[23]\..*"], "lr": 0.05, "max_transition_epoch": 3},
    2: {"params": [r"model\.layers\.[01]\..*", "model.embed.*"], "lr": 0.02, "max_transition_epoch": 5},
}


class PhaseSpy(pl.Callback):
    """Records, per epoch, the depth and trainable names seen by training, and params after each validation."""

    def __init__(self, fts: FinetuningScheduler) -> None:
        self.fts = fts
        self.depth_by_epoch: dict[int, int] = {}
        self.trainable_by_epoch: dict[int, set[str]] = {}
        self.params_at_val: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.depth_by_epoch[trainer.current_epoch] = self.fts.curr_depth
            self.trainable_by_epoch[trainer.current_epoch] = {n for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.params_at_val[trainer.current_epoch] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def fit(tmp_path, module=None, callbacks=(), fts_kwargs=None, **trainer_kwargs):
    fts = FinetuningScheduler(**(fts_kwargs or {}))
    spy = PhaseSpy(fts)
    module = module or ToyModule()
    t = trainer(tmp_path, [fts, spy, *callbacks], **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module)
    return t, fts, spy, module


# ------------------------------------------------------------------ explicit and implicit schedules x max_depth
@pytest.mark.parametrize(("max_depth", "final", "groups", "end"), [(0, 0, 1, 2), (1, 1, 2, 3), (-1, 2, 3, 5)])
def test_explicit_schedule_runs_to_max_depth(tmp_path, max_depth, final, groups, end):
    t, fts, spy, module = fit(
        tmp_path, fts_kwargs=dict(ft_schedule=EPOCH_SCHEDULE, max_depth=max_depth, epoch_transitions_only=True),
        max_epochs=8,
    )
    assert fts.curr_depth == final and fts.depth_remaining == 0
    assert len(t.optimizers[0].param_groups) == groups
    assert spy.depth_by_epoch == {e: min(d, final) for e, d in enumerate([0, 0, 1, 2, 2, 2, 2, 2])}
    assert set(fts.thawed_params) == {n for n, p in module.named_parameters() if p.requires_grad}
    # as in FTS, the final phase's max_transition_epoch (here `end`) does not end the run: max_epochs does
    assert fts.schedule[final].max_transition_epoch == end and t.current_epoch == 8


@pytest.mark.parametrize(("style", "max_depth", "phases_run"), [("blocks", -1, 6), ("blocks", 2, 3), ("pairs", 3, 4)])
def test_implicit_schedule_is_generated_and_run(tmp_path, style, max_depth, phases_run):
    module = ToyModule(val_losses=[1.0] * 100)  # never improves: each phase ends after `patience` epochs
    es = FTSEarlyStopping(monitor="val_loss", patience=1)
    t, fts, spy, _ = fit(tmp_path, module, [es],
                         fts_kwargs=dict(schedule_style=style, max_depth=max_depth), max_epochs=30)
    assert fts.curr_depth == phases_run - 1
    assert [r.depth for r in fts.history] == list(range(phases_run))
    # phase 0's first check sets the run's best; each later check, never better, exhausts patience=1: phase 0
    # ends after 2 epochs, every later phase after 1 (the best carries over phases, as in FTS)
    assert [r.epochs for r in fts.history] == [2] + [1] * (phases_run - 1)
    generated = Path(tmp_path) / "ToyModule_ft_schedule.yaml"
    assert generated.exists() and len(yaml.safe_load(generated.read_text())) >= phases_run


def test_resolved_schedule_is_written_to_the_log_dir(tmp_path):
    t, fts, _, _ = fit(tmp_path, fts_kwargs=dict(ft_schedule=SCHEDULE_3, max_depth=0), max_epochs=1,
                       logger=CSVLogger(str(tmp_path)))
    path = Path(t.log_dir) / "ToyModule_ft_schedule_resolved.yaml"
    resolved = yaml.safe_load(path.read_text())
    assert resolved[1]["params"] == list(fts.schedule[1].params)
    assert resolved[1]["params"][0] == "model.layers.2.norm.weight"


# ------------------------------------------------------------------ transitions
def test_early_stopping_drives_transitions_at_known_epochs(tmp_path):
    # phase 0 best at epoch 1, patience 2 -> done after epoch 3; phase 1 best at 4 -> done after 6; final: stop after 10
    losses = [1.0, 0.9, 0.95, 0.96, 0.8, 0.85, 0.86, 0.87, 0.5, 0.6, 0.7, 0.8]
    es = FTSEarlyStopping(monitor="val_loss", patience=2)
    t, fts, spy, _ = fit(tmp_path, ToyModule(val_losses=losses), [es], fts_kwargs=dict(ft_schedule=SCHEDULE_3),
                         max_epochs=30)
    assert [(r.start_epoch, r.end_epoch, r.end_reason) for r in fts.history] == [
        (0, 4, "early stopping"),
        (4, 7, "early stopping"),
        (7, 11, "early stopping"),
    ]
    assert [r.best_epoch for r in fts.history] == [1, 4, 8]
    assert t.current_epoch == 11 and t.should_stop


def test_composed_mode_ends_a_phase_at_its_epoch_cap_before_early_stopping(tmp_path):
    sched = {0: {"params": ["model.head.*"], "max_transition_epoch": 2}, 1: {"params": ["model.embed.*"], "lr": 0.01}}
    es = FTSEarlyStopping(monitor="val_loss", patience=3)
    _, fts, _, _ = fit(tmp_path, ToyModule(val_losses=[1.0] * 50), [es], fts_kwargs=dict(ft_schedule=sched),
                       max_epochs=20)
    assert [(r.start_epoch, r.end_reason) for r in fts.history] == [
        (0, "max_transition_epoch reached"),
        (2, "early stopping"),
    ]
    # the new phase gets fresh patience but must beat the run's best (epoch 0): 3 checks, then it ends
    assert fts.history[1].end_epoch == 5


def test_non_finite_metric_ends_the_run_not_just_the_phase(tmp_path):
    es = FTSEarlyStopping(monitor="val_loss", patience=5, check_finite=True)
    t, fts, _, _ = fit(tmp_path, ToyModule(val_losses=[1.0, float("nan")]), [es],
                       fts_kwargs=dict(ft_schedule=SCHEDULE_3), max_epochs=10)
    assert fts.curr_depth == 0 and t.current_epoch == 2


# ------------------------------------------------------------------ restore best
def test_restore_best_restores_exactly_the_best_weights_of_the_phase(tmp_path):
    sched = {0: {"params": ["model.head.*", r"model\.layers\.3\..*"], "max_transition_epoch": 4},
             1: {"params": ["model.embed.*"], "lr": 0.01}}
    losses = [0.9, 0.5, 0.7, 0.8, 0.1]  # epoch 1 is phase 0's best
    captured = {}

    class AtTransition(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 4:
                captured.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    t, fts, spy, module = fit(tmp_path, ToyModule(val_losses=losses, optimizer="adam", lr=0.05), [AtTransition()],
                              fts_kwargs=dict(ft_schedule=sched), max_epochs=5)
    assert fts.history[0].restored_best and fts.history[0].best_epoch == 1
    best = spy.params_at_val[1]
    last = spy.params_at_val[3]
    for name, value in captured.items():
        assert torch.equal(value, best[name]), name  # exact: the restored copy of the best epoch's weights
    assert any(not torch.equal(best[n], last[n]) for n in best)  # exact: training did move on after the best epoch


def test_without_restore_best_the_phase_continues_from_its_last_state(tmp_path):
    sched = {0: {"params": ["model.head.*"], "max_transition_epoch": 3}, 1: {"params": ["model.embed.*"], "lr": 0.01}}
    captured = {}

    class AtTransition(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 3:
                captured.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    _, fts, spy, _ = fit(tmp_path, ToyModule(val_losses=[0.9, 0.1, 0.5, 0.5]), [AtTransition()],
                         fts_kwargs=dict(ft_schedule=sched, restore_best=False), max_epochs=4)
    assert not fts.history[0].restored_best
    assert all(torch.equal(captured[n], spy.params_at_val[2][n]) for n in captured)  # exact: nothing restored


# ------------------------------------------------------------------ companions: early stopping and checkpoint
def test_default_companions_are_added_with_a_warning(tmp_path):
    fts = FinetuningScheduler(ft_schedule=SCHEDULE_3, max_depth=0)
    t = trainer(tmp_path, [fts], max_epochs=1, enable_checkpointing=True)
    with pytest.warns(UserWarning, match=r"added FTSEarlyStopping\(monitor='val_loss'"):
        t.fit(ToyModule())
    assert isinstance(t.early_stopping_callback, FTSEarlyStopping)
    assert isinstance(t.checkpoint_callback, FTSCheckpoint) and t.checkpoint_callback.monitor == "val_loss"
    names = [type(c).__name__ for c in t.callbacks]
    assert names.index("FTSEarlyStopping") < names.index("FTSCheckpoint") == len(names) - 1


def test_plain_callbacks_are_upgraded_keeping_their_settings(tmp_path):
    es = EarlyStopping(monitor="val_real_loss", patience=7, min_delta=0.01)
    ck = ModelCheckpoint(monitor="val_real_loss", save_top_k=2, dirpath=str(tmp_path / "ck"))
    t, fts, _, _ = fit(tmp_path, callbacks=[es, ck], fts_kwargs=dict(ft_schedule=SCHEDULE_3, max_depth=0),
                       max_epochs=1, enable_checkpointing=True)
    up_es, up_ck = t.early_stopping_callback, t.checkpoint_callback
    assert isinstance(up_es, FTSEarlyStopping) and (up_es.monitor, up_es.patience, up_es.min_delta) == ("val_real_loss", 7, -0.01)
    assert isinstance(up_ck, FTSCheckpoint) and up_ck.save_top_k == 2 and up_ck.best_model_path
    assert fts.monitor == "val_real_loss"


def test_epoch_transitions_only_removes_early_stopping(tmp_path):
    with pytest.warns(UserWarning, match="removed 1 EarlyStopping"):
        t = trainer(tmp_path, [FinetuningScheduler(EPOCH_SCHEDULE, epoch_transitions_only=True),
                               EarlyStopping(monitor="val_loss")], max_epochs=6)
        t.fit(ToyModule())
    assert t.early_stopping_callback is None


def test_custom_early_stopping_subclass_is_refused(tmp_path):
    class MyStop(EarlyStopping):
        pass

    t = trainer(tmp_path, [FinetuningScheduler(SCHEDULE_3), MyStop(monitor="val_loss")])
    with pytest.raises(ConfigurationError, match="MyStop subclasses EarlyStopping but not FTSEarlyStopping"):
        t.fit(ToyModule())


def test_checkpoint_records_the_depth_of_its_best_checkpoint_even_with_tied_scores(tmp_path):
    # identical monitored values in every phase: the best stays the first one saved (phase 0)
    ck = FTSCheckpoint(monitor="val_loss", save_top_k=3, dirpath=str(tmp_path / "ck"), filename="{epoch}")
    t, fts, _, _ = fit(tmp_path, ToyModule(val_losses=[0.5] * 10), [ck],
                       fts_kwargs=dict(ft_schedule=EPOCH_SCHEDULE, epoch_transitions_only=True),
                       max_epochs=6, enable_checkpointing=True)
    assert Path(ck.best_model_path).name == "epoch=0.ckpt" and ck.best_ckpt_depth == 0
    assert {Path(p).name: d for p, d in ck.depth_of.items()} == {"epoch=0.ckpt": 0, "epoch=1.ckpt": 0, "epoch=2.ckpt": 1}
    saved = torch.load(ck.best_model_path, weights_only=False)
    key = next(k for k in saved["callbacks"] if k.startswith("FinetuningScheduler"))
    assert saved["callbacks"][key]["depth"] == 0


def test_checkpoint_depth_follows_a_reused_file_name(tmp_path):
    ck = FTSCheckpoint(monitor="val_loss", save_top_k=1, dirpath=str(tmp_path / "ck"), filename="best")
    fit(tmp_path, ToyModule(val_losses=[0.9, 0.8, 0.7, 0.6, 0.5]), [ck],
        fts_kwargs=dict(ft_schedule=EPOCH_SCHEDULE, epoch_transitions_only=True), max_epochs=6,
        enable_checkpointing=True)
    assert Path(ck.best_model_path).name == "best.ckpt" and ck.best_ckpt_depth == 2


# ------------------------------------------------------------------ misc behaviour
def test_gen_ft_sched_only_writes_the_schedule_and_skips_training(tmp_path):
    t = trainer(tmp_path, [FinetuningScheduler(gen_ft_sched_only=True)])
    module = ToyModule()
    before = {n: p.clone() for n, p in module.named_parameters()}
    with pytest.raises(ScheduleGenerated) as info:
        t.fit(module)
    assert info.value.code == 0
    text = Path(info.value.path).read_text()
    assert text.startswith("# phasetune schedule generated for ToyModule")
    assert yaml.safe_load(text)[0]["params"] == [r"model\.head\..*"]
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())  # exact: nothing trained


def test_schedule_errors_surface_before_training(tmp_path):
    module = ToyModule()
    t = trainer(tmp_path, [FinetuningScheduler({0: {"params": ["model.haed.*"]}, 1: {"params": ["model.embd"]}})])
    with pytest.raises(ScheduleError) as info:
        t.fit(module)
    assert len(info.value.problems) == 2
    assert t.global_step == 0


def test_multiple_optimizers_are_refused(tmp_path):
    class Two(ToyModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return [torch.optim.SGD(self.model.head.parameters(), lr=0.1), torch.optim.SGD(self.model.embed.parameters(), lr=0.1)]

    t = trainer(tmp_path, [FinetuningScheduler(SCHEDULE_3)])
    with pytest.raises(ConfigurationError, match="exactly one optimizer, but configure_optimizers returned 2"):
        t.fit(Two())


def test_unsupported_strategy_is_refused_with_what_is_supported():
    from lightning.pytorch.strategies import ParallelStrategy

    class Custom(ParallelStrategy):
        pass

    Custom.__abstractmethods__ = frozenset()
    with pytest.raises(ConfigurationError, match="does not support the Custom strategy yet; it supports single-device and DDP"):
        select_adapter(Custom())


def test_bad_constructor_arguments_are_reported_together():
    with pytest.raises(ConfigurationError) as info:
        FinetuningScheduler(max_depth=-3, base_max_lr=0, schedule_style="layers", snapshot_storage="cloud")
    assert len(info.value.problems) == 4


def test_phase_is_logged_and_shown_in_the_progress_bar_as_an_integer(tmp_path):
    seen = []

    class Peek(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            bar = trainer.progress_bar_callback
            shown = bar.get_metrics(trainer, pl_module).get("ft_phase")
            assert not isinstance(shown, float)  # an int (TQDM) or its text (Rich formats every number as 0.000)
            seen.append((trainer.current_epoch, None if shown is None else int(shown)))

    t, fts, _, _ = fit(tmp_path, callbacks=[Peek()], fts_kwargs=dict(ft_schedule=EPOCH_SCHEDULE, epoch_transitions_only=True),
                       max_epochs=6, enable_progress_bar=True, logger=CSVLogger(str(tmp_path)))
    rows = (Path(t.log_dir) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    phases = [float(r.split(",")[header.index("ft_phase")]) for r in rows[1:] if r.split(",")[header.index("ft_phase")]]
    assert phases == [0, 0, 1, 2, 2, 2]
    # an epoch-level metric: the bar shows the phase of the last finished epoch (no per-step hook)
    by_epoch = dict(seen)
    assert by_epoch[0] is None and [by_epoch[e] for e in range(1, 6)] == phases[:5]


def test_frozen_batchnorm_statistics(tmp_path):
    sched = {0: {"params": ["model.head.*"]}}
    for track, moves in ((True, True), (False, False)):
        module = ToyModule(batchnorm=True)
        before = module.model.layers[0].norm.running_mean.clone()
        fit(tmp_path, module, fts_kwargs=dict(ft_schedule=sched, frozen_bn_track_running_stats=track), max_epochs=1)
        assert (not torch.equal(module.model.layers[0].norm.running_mean, before)) is moves  # exact: written or not


def test_groups_are_tagged_with_their_phase(tmp_path):
    t, _, _, _ = fit(tmp_path, fts_kwargs=dict(ft_schedule=EPOCH_SCHEDULE, epoch_transitions_only=True), max_epochs=6)
    assert [g[PHASE_KEY] for g in t.optimizers[0].param_groups] == [0, 1, 2]
    assert [g["lr"] for g in t.optimizers[0].param_groups] == [0.1, 0.05, 0.02]


PER_STEP_HOOKS = (
    "on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
    "on_before_optimizer_step", "on_before_zero_grad", "on_validation_batch_start", "on_validation_batch_end",
)


def test_the_per_step_hook_does_no_work_on_ordinary_steps(tmp_path, monkeypatch):
    # The overhead target (bench/overhead.py) rests on this: the one per-step hook (for max_transition_step and
    # step watches) compares one integer and returns; nothing else of phasetune runs per training step. (The prefix
    # cache's on_train_batch_start exists only as an instance attribute of a fit in which a phase caches.)
    for ours, parent in ((FinetuningScheduler, pl.Callback), (FTSEarlyStopping, EarlyStopping),
                         (FTSCheckpoint, ModelCheckpoint)):
        for hook in PER_STEP_HOOKS:
            if (ours, hook) != (FinetuningScheduler, "on_train_batch_end"):
                assert getattr(ours, hook) is getattr(parent, hook), f"{ours.__name__}.{hook}"
    calls = {"step_end": 0, "due": 0, "advance": 0}

    def counting(cls, name):
        original = getattr(cls, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    for cls, name in ((PhaseRun, "step_end"), (StepEvents, "due"), (PhaseEngine, "advance")):
        counting(cls, name)
    instance_hooks = []

    class InstanceHooks(pl.Callback):  # per-step hooks installed on the callback object during the fit: none
        def on_train_epoch_start(self, trainer, pl_module):
            fts = next(c for c in trainer.callbacks if isinstance(c, FinetuningScheduler))
            instance_hooks.extend(h for h in PER_STEP_HOOKS if h in vars(fts))

    t, _, _, _ = fit(tmp_path, fts_kwargs=dict(ft_schedule=EPOCH_SCHEDULE, epoch_transitions_only=True), max_epochs=5,
                     callbacks=[InstanceHooks()])
    assert t.global_step == 20 and instance_hooks == []
    # 20 compares; both transitions at epoch starts; step watches due once per phase, after its first step (the thaw
    # audit's spent hooks are dropped then), never on the steps between
    assert calls == {"step_end": 20, "due": 3, "advance": 2}
