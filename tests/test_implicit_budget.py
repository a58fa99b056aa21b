"""An implicit schedule (no schedule given) takes the run's step budget and the default settings, in every front end.

The default settings live in one place (``phasetune.core.recipes.DEFAULT_RULE``): these tests read them from there, so
they state how the settings flow (the budget, the optimizer's lr, user options winning, every value in the file)
rather than the values themselves.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import Net, ToyModule, assert_bit_equal, trainer
from phasetune import ConfigurationError, FinetuningScheduler, FTSEarlyStopping, ScheduledFinetuning
from phasetune.core import recipes
from phasetune.core.generate import RunFacts, generate_implicit
from phasetune.core.recipes import DEFAULT_RULE, default_settings, rule_lr, split_budget
from phasetune.lightning.messages import PhasetuneWarning
from phasetune.run import RunOptions

NO_BUDGET = "no step budget reached the implicit schedule"


def head_and_body(total: int) -> list[int]:
    """The default's split of ``total`` optimizer steps over its two phases."""
    return split_budget(total, 2, DEFAULT_RULE["head_fraction"], "lpft")


def caps(schedule) -> list[int]:
    return [p.max_transition_step for p in schedule]


# ------------------------------------------------------------------------------------------ the settings, core
def test_default_settings_apply_the_rule_to_the_optimizer_lr_and_the_budget():
    got = default_settings(1e-3, 80, optimizer_groups=2)
    assert got["total_steps"] == 80 and got["head_fraction"] == DEFAULT_RULE["head_fraction"]
    assert got["lr"] == rule_lr(DEFAULT_RULE["body"], 1e-3)
    assert got["include_stem"] is (DEFAULT_RULE["stem"] == "body")
    assert got["phase0_lr_shape"] is True  # every phase warms up and decays over its own steps, phase 0 too


def test_without_a_budget_the_settings_set_no_phase_lengths():
    got = default_settings(1e-3, None)
    assert not {"total_steps", "head_fraction", "phase0_lr_shape", "head_lr", "ft_head_lr"} & set(got)


def test_an_lr_rule_relative_to_the_optimizer_and_a_fixed_head_lr_reach_the_schedule(monkeypatch):
    monkeypatch.setitem(DEFAULT_RULE, "body", ("rel", 0.25))
    monkeypatch.setitem(DEFAULT_RULE, "head", ("abs", 3e-3))
    made = generate_implicit(Net(), RunOptions(), RunFacts(total_steps=40, optimizer_lr=4e-4, optimizer_groups=2))
    assert made.raw[1]["lr"] == pytest.approx(1e-4, rel=1e-12)  # numerical: 0.25 x 4e-4 in float64, rounded to 4 digits
    assert made.raw[0]["new_lr_scheduler"]["init_pg_lrs"] == [3e-3, 3e-3]  # exact: written as given, one per group
    assert made.raw[1]["new_lr_scheduler"]["init_pg_lrs"] == [3e-3, 3e-3]  # the head restarts at its own lr
    assert any("0.25 x the optimizer's lr" in n for n in made.notes)


def test_every_default_value_and_the_budget_are_written_in_the_generated_file(tmp_path):
    made = generate_implicit(Net(), RunOptions(), RunFacts(total_steps=40, budget_source="the test's budget",
                                                           optimizer_lr=1e-3))
    head, body = head_and_body(40)
    assert [made.raw[k]["max_transition_step"] for k in (0, 1)] == [head, 40]
    assert made.raw[1]["lr"] == rule_lr(DEFAULT_RULE["body"], 1e-3)
    for k, steps in ((0, head), (1, body)):
        assert made.raw[k]["new_lr_scheduler"]["lr_scheduler_init"]["init_args"] == recipes.phase_lr_shape(
            steps, DEFAULT_RULE["warmup_fraction"])
    text = "\n".join(made.notes)
    assert "budget: 40 optimizer steps, from the test's budget" in text
    assert recipes.DEFAULT_RULE_SOURCE in text
    assert f"head_fraction {DEFAULT_RULE['head_fraction']:g}" in text
    assert f"{DEFAULT_RULE['warmup_fraction']:.0%} of its steps" in text
    assert ("stays frozen" if DEFAULT_RULE["stem"] == "frozen" else "trains with them") in text


def test_schedule_options_override_the_default_settings_and_the_budget():
    options = RunOptions(schedule_options={"lr": 5e-5, "include_stem": True, "total_steps": 12})
    made = generate_implicit(Net(), options, RunFacts(total_steps=400, optimizer_lr=1e-3))
    assert made.raw[1]["lr"] == 5e-5 and r"embed\..*" in made.raw[1]["params"]  # exact: the user's values
    assert made.raw[1]["max_transition_step"] == 12
    assert any("budget: 12 optimizer steps, from schedule_options['total_steps']" in n for n in made.notes)
    assert any("schedule_options set include_stem, lr" in n for n in made.notes)


def test_a_run_shorter_than_the_phases_gets_no_lengths_and_says_why():
    made = generate_implicit(Net(), RunOptions(), RunFacts(total_steps=1, budget_source="Trainer(max_steps=1)"))
    assert all("max_transition_step" not in p for p in made.raw.values())
    assert "1 optimizer step(s), from Trainer(max_steps=1), are fewer than its 2 phases" in made.no_budget_warning


# ------------------------------------------------------------------------------------------ Lightning
def fit(tmp_path, fts, module=None, callbacks=(), **kwargs):
    t = trainer(tmp_path, [fts, *callbacks], **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's own; phasetune's still show (a test may record them)
        warnings.simplefilter("always", PhasetuneWarning)
        t.fit(module or ToyModule(optimizer="adam", lr=1e-3), **kwargs.pop("fit_kwargs", {}))
    return t


def test_lightning_gives_the_implicit_schedule_estimated_stepping_batches(tmp_path):
    fts = FinetuningScheduler()
    # 4 batches per epoch, 2 accumulated per optimizer step, 5 epochs: Lightning's estimate is 10 steps
    t = fit(tmp_path, fts, max_epochs=5, accumulate_grad_batches=2)
    assert t.estimated_stepping_batches == 10 and t.global_step == 10
    head, _ = head_and_body(10)
    assert caps(fts.schedule) == [head, 10]
    assert [(r.depth, r.start_step, r.end_step) for r in fts.history] == [(0, 0, head), (1, head, 10)]
    text = (Path(tmp_path) / "ToyModule_ft_schedule.yaml").read_text()
    assert "# budget: 10 optimizer steps, from Trainer(max_epochs=5) x 4 batches / accumulate_grad_batches=2" in text
    assert yaml.safe_load(text)[1]["max_transition_step"] == 10


def test_lightning_max_steps_and_limit_train_batches_reach_the_schedule(tmp_path):
    fts = FinetuningScheduler()
    fit(tmp_path, fts, max_steps=7, max_epochs=-1)
    assert caps(fts.schedule) == [head_and_body(7)[0], 7]
    fts = FinetuningScheduler()
    fit(tmp_path / "limited", fts, max_epochs=3, limit_train_batches=2)
    assert caps(fts.schedule) == [head_and_body(6)[0], 6]


def test_lightning_user_options_keep_their_say_over_the_budget(tmp_path):
    fts = FinetuningScheduler(schedule_options={"total_steps": 5, "lr": 0.05})
    fit(tmp_path, fts, max_epochs=4)
    assert caps(fts.schedule) == [head_and_body(5)[0], 5] and fts.schedule[1].lr == 0.05


def test_lightning_without_a_budget_warns_once_at_the_start(tmp_path, caplog):
    module = ToyModule(val_losses=[1.0] * 50)  # never improves: early stopping ends each phase
    # under Lightning phasetune warns with warnings.warn (attributed to the user's fit line), not through logging
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="phasetune"):
        warnings.simplefilter("always")
        t = fit(tmp_path, FinetuningScheduler(), module, [FTSEarlyStopping(monitor="val_loss", patience=1)],
                max_epochs=-1)
    messages = [str(w.message) for w in caught]
    said = [m for m in messages if NO_BUDGET in m]
    assert len(said) == 1 and "max_epochs=-1 and no max_steps" in said[0] and "'total_steps': N" in said[0]
    assert t.should_stop and all(p.max_transition_step < 0 for p in t.callbacks[0].schedule)
    # no end-of-run advice for a key the schedule does not use
    assert not any("max_transition_epoch" in m for m in messages) and "max_transition_epoch" not in caplog.text


def test_lightning_gen_ft_sched_only_writes_the_budgeted_schedule(tmp_path):
    from phasetune import ScheduleGenerated

    t = trainer(tmp_path, [FinetuningScheduler(gen_ft_sched_only=True)], max_epochs=2)
    with pytest.raises(ScheduleGenerated) as info:
        t.fit(ToyModule())
    text = Path(info.value.path).read_text()
    assert "budget: 8 optimizer steps" in text and yaml.safe_load(text)[1]["max_transition_step"] == 8
    assert t.global_step == 0


def test_a_resumed_implicit_budgeted_run_regenerates_its_schedule_and_ends_bit_equal(tmp_path):
    def run(root, ckpt_path=None):
        torch.manual_seed(0)
        module = ToyModule(optimizer="adam", lr=1e-3)
        fts = FinetuningScheduler()
        ck = ModelCheckpoint(dirpath=str(root / "ckpts"), save_top_k=-1, filename="{epoch}")
        t = trainer(root, [fts, ck], max_epochs=4, enable_checkpointing=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.fit(module, ckpt_path=ckpt_path)
        return {n: p.detach().clone() for n, p in module.named_parameters()}, fts

    expected, ref = run(tmp_path / "ref")
    assert ref.history[0].end_step == head_and_body(16)[0] == 4  # phase 0 ends at the end of epoch 0
    for ckpt in ("epoch=0.ckpt", "epoch=2.ckpt"):  # right after the transition, and inside phase 1
        resumed, fts = run(tmp_path / ckpt, ckpt_path=tmp_path / "ref" / "ckpts" / ckpt)
        assert fts.schedule.to_dict() == ref.schedule.to_dict()
        assert_bit_equal(resumed, expected)  # exact: same machine, same batches, resumed vs uninterrupted


def test_resuming_an_implicit_run_with_another_budget_is_refused_naming_the_budget(tmp_path):
    root = tmp_path / "ref"
    ck = ModelCheckpoint(dirpath=str(root / "ckpts"), save_top_k=-1, filename="{epoch}")
    fit(root, FinetuningScheduler(), callbacks=[ck], max_epochs=4, enable_checkpointing=True)
    t = trainer(tmp_path / "longer", [FinetuningScheduler()], max_epochs=8)
    with pytest.raises(ConfigurationError, match=r"its budget: 16 optimizer steps\).*'total_steps': N"):
        t.fit(ToyModule(optimizer="adam", lr=1e-3), ckpt_path=root / "ckpts" / "epoch=1.ckpt")


# ------------------------------------------------------------------------------------------ the plain loop
def loop(**kwargs) -> ScheduledFinetuning:
    model = Net()
    return ScheduledFinetuning(None, model, torch.optim.AdamW(model.parameters(), lr=1e-3), **kwargs)


def test_the_loop_takes_total_steps_or_epochs_times_the_loader_length():
    assert caps(loop(total_steps=20).schedule) == [head_and_body(20)[0], 20]
    loader = torch.utils.data.DataLoader(torch.arange(40), batch_size=8)  # 5 batches
    ft = loop(max_epochs=3, train_loader=loader)
    assert caps(ft.schedule) == [head_and_body(15)[0], 15]
    assert "budget: 15 optimizer steps, from ScheduledFinetuning(max_epochs=3) x len(train_loader)=5" in ft.run.implicit.notes


def test_the_loop_without_a_budget_warns_once(caplog):
    with caplog.at_level(logging.WARNING, logger="phasetune"):
        ft = loop()
    said = [r.getMessage() for r in caplog.records if NO_BUDGET in r.getMessage()]
    assert len(said) == 1 and "pass total_steps=N" in said[0]
    assert all(p.max_transition_step < 0 for p in ft.schedule)


def test_the_loop_refuses_a_budget_for_a_schedule_it_was_given():
    model = Net()
    with pytest.raises(ConfigurationError, match="total_steps sets the budget of an implicit schedule"):
        ScheduledFinetuning({0: {"params": ["head.*"]}}, model, torch.optim.SGD(model.parameters(), lr=0.1),
                            total_steps=10)


# ------------------------------------------------------------------------------------------ Accelerate
@pytest.mark.usefixtures("plain_process")
def test_accelerate_takes_total_steps_and_without_it_warns_once(caplog):
    from accelerate import Accelerator

    from phasetune.loop.accelerated import AcceleratedFinetuning

    def accelerated(**kwargs):
        model = Net()
        return AcceleratedFinetuning(None, Accelerator(cpu=True), model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                                     **kwargs)

    with caplog.at_level(logging.INFO, logger="phasetune"):
        ft = accelerated(total_steps=20)
    assert caps(ft.schedule) == [head_and_body(20)[0], 20]
    assert ft.schedule[1].lr == rule_lr(DEFAULT_RULE["body"], 1e-3)
    assert "budget: 20 optimizer steps, from AcceleratedFinetuning(total_steps=20)" in ft.run.implicit.notes
    assert "implicit schedule (2 phases; budget: 20 optimizer steps" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="phasetune"):
        ft = accelerated()
    said = [r.getMessage() for r in caplog.records if NO_BUDGET in r.getMessage()]
    assert len(said) == 1 and "AcceleratedFinetuning got no total_steps: pass total_steps=N" in said[0]
    assert all(p.max_transition_step < 0 for p in ft.schedule)


# ------------------------------------------------------------------------------------------ the Hugging Face Trainer
@pytest.mark.usefixtures("plain_process")
def test_the_trainer_gives_the_implicit_schedule_its_max_steps(tmp_path):
    from transformers.utils import logging as hf_logging

    from distributed.hf_scenarios import Tokens, tiny_bert, training_args
    from phasetune.hf import PhasetuneTrainer, PhasetuneTrainerCallback

    hf_logging.set_verbosity_error()
    ft = PhasetuneTrainerCallback()
    args = training_args(tmp_path, num_train_epochs=3, save_strategy="no", learning_rate=1e-3)
    t = PhasetuneTrainer(model=tiny_bert(), args=args, train_dataset=Tokens(32, 0), eval_dataset=Tokens(16, 1),
                         callbacks=[ft])
    t.train()
    assert t.state.max_steps == 12  # 3 epochs of 4 batches of 8
    assert caps(ft.schedule) == [head_and_body(12)[0], 12]
    assert ft.schedule[1].lr == rule_lr(DEFAULT_RULE["body"], 1e-3)
    text = (tmp_path / "BertForSequenceClassification_ft_schedule.yaml").read_text()
    assert "budget: 12 optimizer steps, from TrainingArguments(num_train_epochs=3)" in text
    assert yaml.safe_load(text)[1]["max_transition_step"] == 12
