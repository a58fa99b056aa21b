"""Resuming a plain-strategy (FSDP2) checkpoint on another number of processes: 2 -> 1 and 1 -> 2.

DCP reshards the model and the optimizer state; the ScheduledFinetuning state (phase, thawed set, groups,
history) comes back whole. Each process's random state cannot: the resume is refused in one line naming
``resume_rng="reseed"``, and with it the run continues with generators re-seeded from the saved state (with a
warning). The 1-process side runs in this test process, the 2-process side in one launch of
tests/distributed/resume_scenarios.py (``topology``), which also loads this process's checkpoint.
"""

from __future__ import annotations

import json
import logging

import pytest

from launch import launch
from plain_strategy_runs import build, refusal, state_report, train_into_phase_1, train_steps


@pytest.fixture(scope="module")
def saved_on_one(tmp_path_factory, plain_process):
    """A 1-process checkpoint in phase 1 and its state (one process, whatever distributed variables earlier
    tests left)."""
    root = tmp_path_factory.mktemp("one")
    strategy, model, ft = build()
    try:
        train_into_phase_1(strategy, model, ft)
        strategy.save_ckpt(model, root / "ckpt", "phase1", finetuning=ft)
        return root / "ckpt" / "phase1", json.loads(json.dumps(state_report(model, ft)))
    finally:
        strategy.teardown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, saved_on_one):
    out = tmp_path_factory.mktemp("topology")
    return launch("resume_scenarios.py", out, "topology", str(saved_on_one[0])), out


def assert_same_state(loaded: dict, saved: dict) -> None:
    """Exact: DCP reshards by copying, so the state loaded on another number of processes is the saved one, bit for
    bit (model, every optimizer state tensor, phase state)."""
    assert loaded["params"] == saved["params"]
    assert loaded["optim"].keys() == saved["optim"].keys()
    assert loaded["optim"] == saved["optim"]
    for key in ("depth", "thawed", "groups", "history"):
        assert loaded[key] == saved[key], key


def test_a_2_process_checkpoint_loads_on_1_with_model_optimizer_and_phase_state(two_ranks, one_process, caplog):
    ranks, out = two_ranks
    saved = ranks[0]["saved"]
    assert saved["depth"] == 1 and saved["optim"]  # phase 1, with optimizer state to reshard
    strategy, model, ft = build(resume_rng="reseed")
    try:
        with caplog.at_level(logging.WARNING, logger="phasetune"):
            strategy.load_ckpt(model, out / "ckpt", finetuning=ft)
        assert_same_state(json.loads(json.dumps(state_report(model, ft))), saved)
        assert "saved by 2 processes and this run has 1" in caplog.text and "re-seeded" in caplog.text
        train_steps(strategy, model, ft)  # and it trains on
    finally:
        strategy.teardown()


def test_a_2_process_checkpoint_on_1_is_refused_in_one_line_naming_resume_rng(two_ranks, one_process):
    ranks, out = two_ranks
    strategy, model, ft = build()
    try:
        said = refusal(strategy, model, ft, out / "ckpt")
    finally:
        strategy.teardown()
    assert "\n" not in said
    assert "saved by 2 processes and this run has 1" in said and "resume_rng='reseed'" in said


def test_a_1_process_checkpoint_loads_on_2_with_model_optimizer_and_phase_state(two_ranks, saved_on_one):
    ranks, _ = two_ranks
    _, saved = saved_on_one
    for rank in ranks:
        assert_same_state(rank["from_one"], saved)
        assert rank["from_one_trained"]
    assert "re-seeded" in ranks[0]["from_one_warnings"]


def test_a_1_process_checkpoint_on_2_is_refused_on_every_rank_naming_resume_rng(two_ranks):
    ranks, _ = two_ranks
    for rank in ranks:
        assert "saved by 1 processes and this run has 2" in rank["refused"]
        assert "resume_rng='reseed'" in rank["refused"] and "\n" not in rank["refused"]


def test_re_seeded_ranks_draw_different_streams_and_the_same_ones_every_time(two_ranks):
    ranks, _ = two_ranks
    assert ranks[0]["draws"] != ranks[1]["draws"]  # exact: seeded from the saved state and the rank
    assert all(rank["draws"] == rank["draws_again"] for rank in ranks)  # exact, deterministic
