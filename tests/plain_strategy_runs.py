"""The plain strategy (FSDP2Strategy) fit both sides of the topology tests run: the 1-process side in the test
process (tests/test_topology.py), the 2-process side under torchrun (tests/distributed/resume_scenarios.py
``topology``). Every process of the group calls these."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
