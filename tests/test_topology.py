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
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from helpers import one_process_environment, one_process_fixture
from launch import launch
from phasetune import ConfigurationError, FSDP2Strategy, ScheduledFinetuning
from plain_models import SCHEDULE, TinyLM, data

MICRO_BATCH = 4


def build(resume_rng: str = "exact") -> tuple[FSDP2Strategy, nn.Module, ScheduledFinetuning]:
    """Strategy, sharded model and a fresh ScheduledFinetuning; every process of the group calls it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = FSDP2Strategy(seed=0, micro_batch_size=MICRO_BATCH, global_batch_size=MICRO_BATCH * world)
    with strategy.init_model_context():
        model = TinyLM(dropout=0.2)
    model = strategy.prepare_model(model)
    ft = ScheduledFinetuning(SCHEDULE, model, strategy.create_optimizer(model, lr=1e-2), resume_rng=resume_rng)
    return strategy, model, ft


def train_steps(strategy: FSDP2Strategy, model: nn.Module, ft: ScheduledFinetuning, steps: int = 2) -> None:
    ids, labels = data(64, 0)
    rank, world = strategy.rank, strategy.world_size
    model.train()
    for i in range(steps):
        batch = slice((i * world + rank) * MICRO_BATCH, (i * world + rank + 1) * MICRO_BATCH)
        strategy.backward(nn.functional.cross_entropy(model(ids[batch]), labels[batch]), model)
        strategy.optimizer_step(ft.optimizer, model)


def train_into_phase_1(strategy: FSDP2Strategy, model: nn.Module, ft: ScheduledFinetuning) -> None:
    """One epoch of phase 0, the transition to phase 1, and steps there (its parameters get optimizer state)."""
    train_steps(strategy, model, ft)
    ft.step(0, metric=1.0)
    assert ft.depth == 1
    train_steps(strategy, model, ft)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def state_report(model: nn.Module, ft: ScheduledFinetuning) -> dict[str, Any]:
    """The full model and optimizer state and the phase state, as JSON-safe exact lists (a collective)."""
    names = {id(p): n for n, p in model.named_parameters()}
    optim = {}
    for p, st in ft.optimizer.state.items():
        optim[names[id(p)]] = {k: full(v.detach()).double().flatten().tolist() for k, v in st.items()
                               if torch.is_tensor(v)}
    return {
        "params": {n: full(p.detach()).double().flatten().tolist() for n, p in model.named_parameters()},
        "optim": optim,
        "depth": ft.depth,
        "thawed": sorted(ft.thawed_params),
        "groups": [[g["lr"], len(g["params"])] for g in ft.optimizer.param_groups],
        "history": [[r.depth, r.start_epoch] for r in ft.history],
    }


def refusal(strategy: FSDP2Strategy, model: nn.Module, ft: ScheduledFinetuning, path: Path) -> str:
    try:
        strategy.load_ckpt(model, path, finetuning=ft)
    except ConfigurationError as e:
        return str(e)
    return "no error"


# ---------------------------------------------------------------------------------------------- the test side
@pytest.fixture
def one_process(monkeypatch, tmp_path):
    yield from one_process_fixture(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def saved_on_one(tmp_path_factory):
    """A 1-process checkpoint in phase 1 and its state."""
    root = tmp_path_factory.mktemp("one")
    with one_process_environment():  # one process, whatever distributed variables earlier tests left
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
    assert ranks[0]["draws"] != ranks[1]["draws"]  # seeded from the saved state and the rank
    assert all(rank["draws"] == rank["draws_again"] for rank in ranks)  # deterministic
