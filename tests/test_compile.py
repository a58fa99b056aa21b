"""Scheduled fine-tuning of a torch.compile-d model: it thaws, trains and resumes like the eager model.

Backends "aot_eager" and "eager" need no compiler toolchain. The default backend (inductor) also works on these
machines (gcc present) but compiles the tiny model in about a minute on 2 cores: set PHASETUNE_TEST_INDUCTOR=1 to
run it. 2-process DDP runs in one torchrun launch (tests/distributed/audit_scenarios.py compile).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

from helpers import float32_drift
from phasetune import PhaseEngine, resolve_schedule
from phasetune.features.audit.phase_audit import PhaseAudit
from phasetune.features.compile_support import RecompileCounter, is_compiled, reserve_recompiles
from phasetune.loop import ScheduledFinetuning
from plain_models import SCHEDULE, TinyLM, data


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo's caches and recompile counts are per process (and per code object, shared by every compiled
    module): each test starts and ends without them."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def epoch(net: nn.Module, ft: ScheduledFinetuning, batches: list) -> None:
    for ids, labels in batches:
        ft.optimizer.zero_grad()
        F.cross_entropy(net(ids), labels).backward()
        ft.optimizer.step()


def batches() -> list:
    ids, labels = data(32)
    return [(ids[:16], labels[:16]), (ids[16:], labels[16:])]


def start(backend: str | None, state: dict | None = None) -> tuple[TinyLM, nn.Module, ScheduledFinetuning, PhaseAudit]:
    torch.manual_seed(0)
    model = TinyLM()
    if state is not None:
        model.load_state_dict(state["model"])
    net = torch.compile(model, backend=backend) if backend else model
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    ft = ScheduledFinetuning(SCHEDULE, net, optimizer, restore_best=False)
    audit = PhaseAudit(ft.engine, recompiles=RecompileCounter(), info=lambda _: None)
    if state is not None:
        ft.load_state_dict(state["ft"])
        ft.optimizer.load_state_dict(state["optimizer"])
        audit.check_phase(ft.optimizer, ft.schedulers, stage="resume")
    else:
        audit.check_phase(ft.optimizer, stage="start")
    return model, net, ft, audit


def fit(backend: str | None, epochs: range = range(3), state: dict | None = None) -> tuple[dict, list, dict]:
    """Train ``epochs`` (3 phases: thaws after epochs 0 and 1); final parameters, the audit results and the state."""
    model, net, ft, audit = start(backend, state)
    saved: dict = {}
    for e in epochs:
        epoch(net, ft, batches())
        t = ft.step(e)
        if t is not None:
            audit.check_phase(ft.optimizer, ft.schedulers, thawed=t.thawed)
        if e == 0:
            saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "ft": ft.state_dict(),
                     "optimizer": ft.optimizer.state_dict()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}, audit.results, saved


@functools.cache
def eager_run() -> dict:
    return fit(None)[0]


def assert_same(a: dict, b: dict) -> None:
    """Numerical: a compiled graph may fuse and order the eager run's operations otherwise; 3 epochs of 2 steps,
    sums of 16 terms (TinyLM's width and batch), weights below 1."""
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=float32_drift(6, 16), msg=f"{n} differs")


@pytest.mark.numerical
def test_a_compiled_model_thaws_and_trains_like_the_eager_one():
    eager = eager_run()
    compiled, results, _ = fit("aot_eager")
    assert_same(eager, compiled)
    assert [r.passed for r in results] == [True, True, True]
    # each phase's first forward compiles one new graph: dynamo guards requires_grad, no reset is needed
    assert [r.recompiles for r in results] == [1, 1, 1]


@pytest.mark.numerical
def test_a_compiled_run_resumes_like_the_uninterrupted_eager_run():
    eager = eager_run()
    _, _, state = fit("aot_eager", range(1))
    resumed, results, _ = fit("aot_eager", range(1, 3), state)
    assert_same(eager, resumed)
    assert results[0].stage == "first step after the resume" and all(r.passed for r in results)


def test_compiled_models_are_recognised():
    model = TinyLM()
    assert not is_compiled(model)
    assert is_compiled(torch.compile(model, backend="eager"))
    block = TinyLM()
    block.layers[0].compile(backend="eager")  # nn.Module.compile: in place, on one block
    assert is_compiled(block)


def graphs_per_transition(n_phases: int, reserve: bool) -> list[int]:
    """An ``n_phases`` schedule (one Linear per phase, top down) on a compiled model: graphs built per phase."""
    torch.manual_seed(0)
    net = nn.Sequential(*(nn.Linear(4, 4) for _ in range(n_phases)))
    params = dict(net.named_parameters())
    top = n_phases - 1
    schedule = resolve_schedule({k: {"params": [rf"{top - k}\..*"], **({"lr": 0.01} if k else {})} for k in range(n_phases)},
                                {n: tuple(p.shape) for n, p in params.items()})
    engine = PhaseEngine(schedule, params)
    engine.start()
    compiled = torch.compile(net, backend="eager")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    engine.prepare_optimizer(optimizer)
    restore = reserve_recompiles(compiled, len(schedule), warn=lambda _: None) if reserve else (lambda: None)
    counter, built = RecompileCounter(), []
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    try:
        while True:
            counter.mark()
            optimizer.zero_grad()
            compiled(x).pow(2).mean().backward()
            optimizer.step()
            built.append(counter.since_mark())
            if engine.is_final:
                break
            optimizer = engine.advance(optimizer).optimizer
    finally:
        restore()
    return built


def test_past_dynamos_recompile_limit_a_thaw_runs_uncompiled():
    assert torch._dynamo.config.recompile_limit == 8  # torch's default: a schedule of 9+ phases reaches it
    with torch._dynamo.config.patch(recompile_limit=3):  # the same with fewer phases, faster
        assert graphs_per_transition(5, reserve=False) == [1, 1, 1, 0, 0]  # phases 3 and 4 run uncompiled


def test_reserve_recompiles_keeps_every_phase_compiled_and_gives_the_limit_back():
    with torch._dynamo.config.patch(recompile_limit=3):
        assert graphs_per_transition(5, reserve=True) == [1] * 5
        assert torch._dynamo.config.recompile_limit == 3


@pytest.mark.skipif(os.environ.get("PHASETUNE_TEST_INDUCTOR") != "1", reason="inductor compiles for about a minute "
                    "on 2 cores; set PHASETUNE_TEST_INDUCTOR=1")
@pytest.mark.numerical
def test_the_default_backend_trains_like_eager():
    eager = eager_run()
    compiled, results, _ = fit("inductor")
    assert_same(eager, compiled)
    assert all(r.passed for r in results)


@pytest.fixture(scope="module")
def ddp_runs(audit_ranks) -> list[dict]:
    return audit_ranks  # the one launch of tests/distributed/audit_scenarios.py (conftest.py), shared with test_audit.py


@pytest.mark.numerical
@pytest.mark.launched
def test_a_compiled_ddp_model_thaws_and_trains_like_the_eager_one(ddp_runs):
    for rank in ddp_runs:
        assert rank["compiled_passed"] == [True, True, True]
        assert rank["max_diff"] <= float32_drift(6, 8)  # numerical: compiled vs eager; 6 steps, sums of 8 (width)
        assert rank["recompiles"] == [1, 1, 1]


def test_compiling_the_ddp_module_itself_builds_no_graph(ddp_runs):
    # torch 2.13: dynamo breaks the graph at DDP's forward and skips the module inside; compile the module and
    # wrap the compiled module in DDP instead (docs/audit.md)
    assert [rank["graphs_of_compiled_ddp"] for rank in ddp_runs] == [0, 0]
