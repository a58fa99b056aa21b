"""Per-phase optimizer and lr-scheduler control, phase-0 enforcement and no_decay, in a Trainer."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch

from helpers import ToyModule, trainer
from phasetune import ConfigurationError, FinetuningScheduler
from phasetune.core.param_groups import PHASE_KEY

COSINE_STEP = {
    "lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR", "init_args": {"T_max": 8}},
    "pl_lrs_cfg": {"interval": "step"},
}
ADAMW = {"optimizer_init": {"class_path": "torch.optim.AdamW", "init_args": {"weight_decay": 0.05}}}

SWAPPING = {
    0: {"params": ["model.head.*"], "max_transition_epoch": 1},
    1: {"params": [r"model\.layers\.3\..*"], "lr": 0.05, "max_transition_epoch": 2, "new_lr_scheduler": COSINE_STEP},
    2: {"params": [r"model\.layers\.[012]\..*", "model.embed.*"], "lr": 0.02, "max_transition_epoch": 4,
        "new_optimizer": ADAMW,
        "new_lr_scheduler": {"lr_scheduler_init": {"class_path": "ExponentialLR", "init_args": {"gamma": 0.5}},
                             "init_pg_lrs": [0.01, 0.03]}},
}


class Recorder(pl.Callback):
    """Optimizer type, scheduler type/interval and group lrs at the first batch of each epoch."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            opt = trainer.optimizers[0]
            cfg = trainer.lr_scheduler_configs[0] if trainer.lr_scheduler_configs else None
            self.seen[trainer.current_epoch] = (
                type(opt).__name__,
                type(cfg.scheduler).__name__ if cfg else None,
                cfg.interval if cfg else None,
                [round(g["lr"], 6) for g in opt.param_groups],
            )


def fit(tmp_path, module, callbacks=(), **fts_kwargs):
    max_epochs = fts_kwargs.pop("max_epochs", 6)
    fts = FinetuningScheduler(**fts_kwargs)
    t = trainer(tmp_path, [fts, *callbacks], max_epochs=max_epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module)
    return t, fts


def test_phases_install_new_lr_schedulers_and_optimizers(tmp_path):
    rec = Recorder()
    t, fts = fit(tmp_path, ToyModule(scheduler="step"), [rec], ft_schedule=SWAPPING, epoch_transitions_only=True)
    assert rec.seen[0] == ("SGD", "StepLR", "epoch", [0.1])
    # phase 1: cosine over steps; the existing group restarts from its initial lr, the new group at its phase lr
    assert rec.seen[1] == ("SGD", "CosineAnnealingLR", "step", [0.1, 0.05])
    # phase 2: AdamW over every group so far plus the new one; init_pg_lrs reset the two existing groups
    assert rec.seen[2] == ("AdamW", "ExponentialLR", "epoch", [0.01, 0.03, 0.02])
    opt = t.optimizers[0]
    assert [g[PHASE_KEY] for g in opt.param_groups] == [0, 1, 2]
    assert all(g["weight_decay"] == 0.05 for g in opt.param_groups)
    assert rec.seen[3][3] == [0.005, 0.015, 0.01]  # ExponentialLR(gamma=0.5) stepped once per epoch


def test_reinit_configs_apply_at_every_transition_of_an_implicit_schedule(tmp_path):
    rec = Recorder()
    module = ToyModule(val_losses=[1.0] * 50)
    from phasetune import FTSEarlyStopping

    t, fts = fit(
        tmp_path, module, [rec, FTSEarlyStopping(monitor="val_loss", patience=1)], max_depth=2,
        max_epochs=30,  # a budget whose step caps come after early stopping ends each phase
        schedule_style="blocks", reinit_optim_cfg=ADAMW,
        reinit_lr_cfg={"lr_scheduler_init": {"class_path": "StepLR", "init_args": {"step_size": 1, "gamma": 0.5}},
                       "use_current_optimizer_pg_lrs": True},
    )
    assert fts.curr_depth == 2
    assert {v[0] for e, v in rec.seen.items() if e >= 2} == {"AdamW"}
    assert all(fts.schedule[k].new_optimizer is not None for k in (1, 2))


def test_new_optimizer_without_a_new_scheduler_is_refused_before_training(tmp_path):
    sched = {0: {"params": ["model.head.*"]}, 1: {"params": ["model.embed.*"], "new_optimizer": ADAMW}}
    t = trainer(tmp_path, [FinetuningScheduler(sched)])
    with pytest.raises(ConfigurationError, match="phase 1, key 'new_optimizer': the lr scheduler from configure_optimizers"):
        t.fit(ToyModule(scheduler="step"))
    assert t.global_step == 0


def test_init_pg_lrs_of_the_wrong_length_is_refused_before_training(tmp_path):
    sched = {0: {"params": ["model.head.*"]}, 1: {"params": ["model.embed.*"], "new_lr_scheduler": {
        "lr_scheduler_init": {"class_path": "StepLR", "init_args": {"step_size": 1}}, "init_pg_lrs": [0.1, 0.2, 0.3]}}}
    t = trainer(tmp_path, [FinetuningScheduler(sched)])
    with pytest.raises(ConfigurationError, match="'init_pg_lrs': 3 values given, but the optimizer will have 1 param groups"):
        t.fit(ToyModule())


def test_reinit_configs_are_refused_with_an_explicit_schedule():
    with pytest.raises(ConfigurationError, match="implicit schedules only"):
        FinetuningScheduler(ft_schedule=SWAPPING, reinit_optim_cfg=ADAMW)


def test_plateau_scheduler_from_configure_optimizers_keeps_working_as_groups_are_added(tmp_path):
    sched = {0: {"params": ["model.head.*"], "max_transition_epoch": 1},
             1: {"params": ["model.embed.*"], "lr": 0.05, "max_transition_epoch": 3}}
    rec = Recorder()
    t, _ = fit(tmp_path, ToyModule(scheduler="plateau", val_losses=[1.0] * 10), [rec], ft_schedule=sched,
               epoch_transitions_only=True, restore_best=False)
    plateau = t.lr_scheduler_configs[0].scheduler
    assert len(plateau.min_lrs) == 2
    assert rec.seen[2][3] == [0.05, 0.025]  # both groups halved after the non-improving epoch 1


class NoDecay(ToyModule):
    no_decay = ["bias", "norm.weight"]

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.01, weight_decay=0.1)


def test_no_decay_attribute_gives_each_phase_a_group_without_weight_decay(tmp_path):
    sched = {0: {"params": ["model.head.*"], "max_transition_epoch": 1},
             1: {"params": [r"model\.layers\.3\..*"], "lr": 0.05, "max_transition_epoch": 2}}
    t, _ = fit(tmp_path, NoDecay(), ft_schedule=sched, epoch_transitions_only=True)
    groups = [(g[PHASE_KEY], g["weight_decay"], len(g["params"])) for g in t.optimizers[0].param_groups]
    assert groups == [(0, 0.1, 1), (0, 0.0, 1), (1, 0.1, 1), (1, 0.0, 3)]


def test_enforce_phase0_rebuilds_an_optimizer_over_all_parameters_and_warns(tmp_path):
    t = trainer(tmp_path, [FinetuningScheduler({0: {"params": ["model.head.*"]}, 1: {"params": ["model.embed.*"]}})],
                max_epochs=1)
    with pytest.warns(UserWarning, match=r"held 18 parameter\(s\) outside phase 0 .* rebuilt its groups over exactly phase 0"):
        t.fit(ToyModule(all_params_in_optimizer=True, scheduler="step"))
    opt = t.optimizers[0]
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 2
    assert type(opt).__name__ == "SGD" and opt.param_groups[0]["momentum"] == 0.9
    assert type(t.lr_scheduler_configs[0].scheduler).__name__ == "StepLR"


def test_without_enforcement_phase0_differences_only_warn(tmp_path):
    t = trainer(tmp_path, [FinetuningScheduler({0: {"params": ["model.head.*"]}}, enforce_phase0_params=False)],
                max_epochs=1)
    with pytest.warns(UserWarning, match="enforce_phase0_params=False leaves it as it is"):
        t.fit(ToyModule(all_params_in_optimizer=True))
    assert len(t.optimizers[0].param_groups[0]["params"]) == 20


class TwoGroups(ToyModule):
    def configure_optimizers(self):
        body = [p for n, p in self.named_parameters() if "bias" not in n]
        biases = [p for n, p in self.named_parameters() if "bias" in n]
        return torch.optim.SGD([{"params": body, "momentum": 0.9}, {"params": biases, "momentum": 0.5}], lr=0.1)


def test_users_param_groups_shape_the_phase_groups(tmp_path):
    sched = {0: {"params": ["model.head.*"], "max_transition_epoch": 1},
             1: {"params": ["model.embed.*"], "lr": 0.05, "max_transition_epoch": 2}}
    t, _ = fit(tmp_path, TwoGroups(), ft_schedule=sched, epoch_transitions_only=True)
    groups = [(g[PHASE_KEY], g["momentum"], g["lr"], len(g["params"])) for g in t.optimizers[0].param_groups]
    assert groups == [(0, 0.9, 0.1, 1), (0, 0.5, 0.1, 1), (1, 0.9, 0.05, 1), (1, 0.5, 0.05, 1)]


def test_a_sequential_scheduler_from_a_phase_is_extended_by_later_phases(tmp_path):
    sequential = {
        "lr_scheduler_init": {
            "class_path": "torch.optim.lr_scheduler.SequentialLR",
            "init_args": {
                "schedulers": [
                    {"class_path": "LinearLR", "init_args": {"start_factor": 0.5, "total_iters": 2}},
                    {"class_path": "ExponentialLR", "init_args": {"gamma": 0.9}},
                ],
                "milestones": [2],
            },
        },
        "pl_lrs_cfg": {"interval": "step"},
    }
    sched = {
        0: {"params": ["model.head.*"], "max_transition_epoch": 1},
        1: {"params": [r"model\.layers\.3\..*"], "lr": 0.05, "max_transition_epoch": 2, "new_lr_scheduler": sequential},
        2: {"params": ["model.embed.*"], "lr": 0.02, "max_transition_epoch": 3},
    }
    rec = Recorder()
    t, fts = fit(tmp_path, ToyModule(), [rec], ft_schedule=sched, epoch_transitions_only=True)
    composite = t.lr_scheduler_configs[0].scheduler
    assert type(composite).__name__ == "SequentialLR" and fts.curr_depth == 2
    assert [len(s.base_lrs) for s in composite._schedulers] == [3, 3]  # both inner schedulers know group 3
    # epoch 2 starts after 4 steps under the schedule (milestone at step 2, then gamma 0.9 per step)
    assert rec.seen[2][3] == [round(0.1 * 0.9**2, 6), round(0.05 * 0.9**2, 6), 0.02]
