"""What a new user meets in the first hour with ``FinetuningScheduler()`` alone: messages that say what applies and
how to fix it, files they can read, commands that work as the help says."""

from __future__ import annotations

import logging
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from helpers import Net, ToyModule, trainer
from phasetune import ConfigurationError, FinetuningScheduler, ScheduledFinetuning
from phasetune.core.generate import RunFacts
from phasetune.lightning.cli import main
from phasetune.lightning.fit_command import RunResult, timing_caution
from phasetune.lightning.messages import PhasetuneWarning
from phasetune.run import PhaseRun, RunEnv, RunOptions

PHASETUNE_SRC = str(Path(__import__("phasetune").__file__).parent)


def run_cli(*args: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main([str(a) for a in args])


# ------------------------------------------------------------------------------------------ messages
def test_under_lightning_phasetune_warnings_point_at_the_users_fit_call_not_at_phasetune(tmp_path):
    t = trainer(tmp_path, [FinetuningScheduler()], max_epochs=1, enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(ToyModule())
    ours = [w for w in caught if issubclass(w.category, PhasetuneWarning)]
    assert any("added FTSEarlyStopping(monitor='val_loss'" in str(w.message) for w in ours)
    assert {w.filename for w in ours} == {__file__}  # the t.fit(...) line above, where the user can act
    assert not [w for w in caught if w.filename.startswith(PHASETUNE_SRC)]


def test_schedule_options_with_a_misspelt_key_suggest_the_right_one():
    with pytest.raises(ConfigurationError, match=r"unknown schedule_options key 'total_step'; did you mean 'total_steps'\?"):
        FinetuningScheduler(schedule_options={"total_step": 90})


def run_core(facts: RunFacts, schedule=None) -> tuple[PhaseRun, list[str]]:
    said: list[str] = []
    model = Net()
    params = dict(model.named_parameters())
    run = PhaseRun(schedule, params, {n: tuple(p.shape) for n, p in params.items()}, options=RunOptions(),
                   env=RunEnv(warn=said.append, info=lambda m: None), model=model, facts=facts)
    return run, said


def test_a_run_ending_early_names_its_phase_among_the_phases_and_what_applies():
    run, said = run_core(RunFacts(no_budget="the test gives none"))
    run.start(epoch=0, step=0)
    run.finish(epoch=3, step=12, reason="trainer stopped")
    end = said[-1]
    assert end.startswith("training ended in phase 0 (of phases 0-1): trainer stopped")
    assert "no step budget" in end and "max_transition_epoch" not in end
    explicit, said = run_core(RunFacts(), schedule={0: {"params": ["head.*"]}, 1: {"params": ["layers.*"]}})
    explicit.start(epoch=0, step=0)
    explicit.finish(epoch=3, step=12, reason="trainer stopped")
    assert "raise max_epochs or lower the phases' max_transition_epoch" in said[-1]


def test_a_step_capped_phase_that_was_never_validated_keeps_its_last_state_and_says_why(tmp_path, caplog):
    fts = FinetuningScheduler(schedule_options={"total_steps": 10})  # phase 0 ends at step 2 or 3, mid-epoch 0
    t = trainer(tmp_path, [fts], max_epochs=3, enable_checkpointing=True)  # restore_best on, validation per epoch
    with caplog.at_level(logging.INFO, logger="phasetune"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(ToyModule(optimizer="adam", lr=1e-3))
    line = next(r.getMessage() for r in caplog.records if "phase 0 -> 1" in r.getMessage())
    assert "kept the last state (no validation ran in phase 0 before it ended, so there was nothing to judge it by)" in line
    assert "no best state was recorded" not in caplog.text


# ------------------------------------------------------------------------------------------ files and commands
def test_generated_schedule_files_get_the_permissions_of_any_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        t = trainer(tmp_path, [FinetuningScheduler()], max_epochs=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.fit(ToyModule())
    finally:
        os.umask(old)
    for name in ("ToyModule_ft_schedule.yaml", "ToyModule_ft_schedule_resolved.yaml"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_schedule_generate_splits_steps_in_whole_epochs(tmp_path, capsys):
    out = tmp_path / "s.yaml"
    assert run_cli("schedule", "generate", "--model", "helpers:Net", "--steps", "90", "--steps_per_epoch", "30",
                   "-o", out) == 0
    generated = yaml.safe_load(out.read_text())
    assert [generated[k]["max_transition_epoch"] for k in (0, 1)] == [1, 3]  # 30 steps of head, 60 of the rest
    assert "budget: 90 optimizer steps, from --steps" in out.read_text()


def test_schedule_generate_with_steps_that_are_no_whole_epochs_says_which_would_be(capsys):
    assert run_cli("schedule", "generate", "--model", "helpers:Net", "--steps", "100", "--steps_per_epoch", "30") == 2
    err = capsys.readouterr().err
    assert "--steps 100 is not a whole number of epochs of --steps_per_epoch 30 steps: give 90 or 120" in err
    assert "leave out --steps_per_epoch" in err


def test_the_demo_comparison_says_that_one_pair_of_timings_is_noise():
    said = timing_caution(RunResult("scheduled", 48, 70.0, None, None, cpu_time=100.0),
                          RunResult("full fine-tuning", 48, 74.0, None, None, cpu_time=125.0))
    assert "0.95x the wall time, 0.80x the CPU time of full fine-tuning, from one run of each" in said
    assert "noise, not a measurement" in said and "bench/quality.py" in said


def test_the_plain_loop_says_the_budget_its_implicit_schedule_got(caplog):
    model = Net()
    with caplog.at_level(logging.INFO, logger="phasetune"):
        ScheduledFinetuning(None, model, torch.optim.AdamW(model.parameters(), lr=1e-3), total_steps=40)
    assert "implicit schedule (2 phases; budget: 40 optimizer steps, from ScheduledFinetuning(total_steps=40))" in caplog.text


def test_phasetune_fit_stopped_by_sigterm_exits_with_143_not_0(monkeypatch, capsys):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from phasetune.lightning import cli

    def stopped(*args, **kwargs):  # what Lightning raises from the fit loop after a SIGTERM
        raise SIGTERMException

    monkeypatch.setattr(cli, "PhasetuneCLI", stopped)
    assert cli.main(["fit", "--config", "any.yaml"]) == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err


def test_the_phasetune_command_prints_its_warnings_as_phasetune_lines(monkeypatch, capsys):
    from phasetune.lightning import cli

    def warns(argv):
        warnings.warn("look at this", PhasetuneWarning, stacklevel=2)
        return 0

    monkeypatch.setattr(cli, "schedule_main", warns)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(["schedule"]) == 0
    err = capsys.readouterr().err
    assert "phasetune: look at this" in err and "PhasetuneWarning" not in err
