"""phasetune.hf: a Trainer run resumed from its checkpoints ends bit-equal to the uninterrupted run, phases that
bring a new optimizer or lr scheduler install them in the Trainer (a tiny BERT with random weights, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers.utils import logging as hf_logging

from distributed.hf_scenarios import Tokens, tiny_bert, training_args
from phasetune import ConfigurationError
from phasetune.core.param_groups import PHASE_KEY
from phasetune.hf import STATE_FILE, PhasetuneTrainer, PhasetuneTrainerCallback

pytestmark = pytest.mark.usefixtures("plain_process")  # the Trainers run as one plain process
hf_logging.set_verbosity_error()

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
        assert torch.equal(p, reference[n]), n  # exact: resume against the uninterrupted run
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
        assert torch.equal(p, reference[n]), n  # exact: resume against the uninterrupted run


def test_resuming_from_a_checkpoint_without_phasetune_state_is_refused(uninterrupted, tmp_path):
    out, *_ = uninterrupted
    plain = tmp_path / "checkpoint-4"
    plain.mkdir()
    for f in (out / "checkpoint-4").iterdir():
        if f.name != STATE_FILE:
            (plain / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigurationError, match=f"holds no {STATE_FILE}"):
        recipe_run(tmp_path / "again", resume=str(plain))
