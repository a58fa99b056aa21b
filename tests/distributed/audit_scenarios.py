"""2-process scenarios under torchrun, one launch: the audit under DDP, FSDP1 and FSDP2, passing and failing
(tests/test_audit.py), and a compiled DDP model against the eager one (tests/test_compile.py).

Each audit scenario builds a 3-layer model, runs phase 0 for a step, thaws phase 1 (``1.*``) and steps again, with
the audit armed as a front end arms it. Each rank reports what the audit said.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

from launch import write_report
from phasetune import PhaseEngine, resolve_schedule
from phasetune.features.audit.phase_audit import AuditError, PhaseAudit
from phasetune.sharding.fsdp1_alignment import ParamIndex

warnings.simplefilter("ignore")
torch.set_num_threads(1)
OUT = sys.argv[1]
SCHEDULE = {0: {"params": ["2.*"]}, 1: {"params": ["1.*"], "lr": 0.05}, 2: {"params": ["0.*"], "lr": 0.02}}

dist.init_process_group("gloo")
RANK = dist.get_rank()


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + RANK)  # each rank its own data: unsynchronised gradients differ
    return torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)


def engine_of(params: dict[str, torch.Tensor]) -> PhaseEngine:
    return PhaseEngine(resolve_schedule(SCHEDULE, {n: tuple(p.shape) for n, p in params.items()}), params)


def step(net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x, y = batch()
    optimizer.zero_grad()
    ((net(x) - y) ** 2).mean().backward()
    optimizer.step()


def run(net: nn.Module, engine: PhaseEngine, audit: PhaseAudit, refreeze: str | None = None) -> dict:
    """Phase 0 for a step, the transition, phase 1's first step; what the audit said (or the failure)."""
    optimizer = torch.optim.SGD([p for p in engine.params.values()], lr=0.1)
    engine.prepare_optimizer(optimizer)
    out: dict = {}
    try:
        audit.check_phase(optimizer, stage="start")
        step(net, optimizer)
        t = engine.advance(optimizer)
        out["transition"] = audit.check_phase(optimizer, thawed=t.thawed).passed
        if refreeze:
            engine.params[refreeze].requires_grad_(False)
        step(net, optimizer)
        out["first_step"] = audit.results[-1].passed
        out["newly_thawed"] = audit.results[-1].newly_thawed
    except AuditError as e:
        out = {"causes": [f.cause for f in e.result.findings], "params": [n for f in e.result.findings for n in f.params],
               "stage": e.result.stage}
    return out


def resumed(net: nn.Module, engine: PhaseEngine, audit: PhaseAudit, refreeze: str | None = None) -> dict:
    """A fresh run resumed into phase 1 (its transitions replayed), audited, then its first step."""
    optimizer = torch.optim.SGD([p for p in engine.params.values()], lr=0.1)
    engine.prepare_optimizer(optimizer)
    optimizer, _, _ = engine.replay(1, optimizer, [])
    try:
        out = {"resume": audit.check_phase(optimizer, stage="resume").passed}
        if refreeze:
            engine.params[refreeze].requires_grad_(False)
        step(net, optimizer)
        out.update(first_step=audit.results[-1].passed, newly_thawed=audit.results[-1].newly_thawed)
    except AuditError as e:
        out = {"causes": [f.cause for f in e.result.findings], "params": [n for f in e.result.findings for n in f.params],
               "stage": e.result.stage}
    return out


def fsdp1(refreeze: str | None = None, resume: bool = False) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    root = FSDP(model(), auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), device_id=torch.device("cpu"),
                use_orig_params=True)
    engine = engine_of(dict(ParamIndex.build(root).tensors))
    engine.start()
    return (resumed if resume else run)(root, engine, PhaseAudit(engine, model=root), refreeze)


def fsdp2(refreeze: str | None = None, resume: bool = False) -> dict:
    from torch.distributed.fsdp import fully_shard

    net = model()
    for layer in net:
        fully_shard(layer)
    fully_shard(net)
    engine = engine_of(dict(net.named_parameters()))
    engine.start()
    return (resumed if resume else run)(net, engine, PhaseAudit(engine, model=net), refreeze)


def audit_scenarios() -> dict:
    report: dict = {}

    # DDP built while every scheduled parameter required grad (phasetune freezes after): passes
    net = model()
    ddp = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    engine = engine_of(dict(net.named_parameters()))
    engine.start()
    result = run(ddp, engine, PhaseAudit(engine, model=ddp))
    report["ddp_ok"] = {k: result[k] for k in ("transition", "first_step")} if "causes" not in result else result

    # DDP built after phasetune froze the model: phase 1's parameters never reach the reducer
    net = model()
    engine = engine_of(dict(net.named_parameters()))
    engine.start()
    ddp = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    report["ddp_late"] = run(ddp, engine, PhaseAudit(engine, model=ddp))

    # DDP built while phases 0 and 2 trained: its reducer holds as many tensors as phase 1 trains, but not phase 1's;
    # caught after the first step by gradients that differ across ranks
    net = model()
    for name, p in net.named_parameters():
        p.requires_grad_(not name.startswith("1."))
    ddp = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    engine = engine_of(dict(net.named_parameters()))
    engine.start()
    report["ddp_other"] = run(ddp, engine, PhaseAudit(engine, model=ddp))

    # the same, resumed into phase 1 (the run replays its transitions into a DDP built over phase 0)
    net = model()
    engine = engine_of(dict(net.named_parameters()))
    engine.start()
    ddp = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    engine.prepare_optimizer(optimizer)
    optimizer, _, _ = engine.replay(1, optimizer, [])
    try:
        PhaseAudit(engine, model=ddp).check_phase(optimizer, stage="resume")
        report["ddp_late_resume"] = {"causes": []}
    except AuditError as e:
        report["ddp_late_resume"] = {"causes": [f.cause for f in e.result.findings]}


    for kind, fn in (("fsdp1", fsdp1), ("fsdp2", fsdp2)):
        report[f"{kind}_ok"] = fn()
        report[f"{kind}_refrozen"] = fn(refreeze="1.weight")
        report[f"{kind}_resumed"] = fn(resume=True)
        report[f"{kind}_resumed_refrozen"] = fn(refreeze="2.bias", resume=True)

    return report


def compile_scenario() -> dict:
    """3 phases, 2 steps each, on DDP (every scheduled parameter registered, phasetune freezing after), eager and
    compiled with aot_eager: the same parameters at the end, one audit pass per phase, graphs built per phase.

    DDP wraps the compiled module: ``torch.compile`` of the DDP module itself builds no graph on torch 2.13 (dynamo
    breaks the graph at DDP's forward and skips the module inside), so it would run eagerly."""
    from phasetune.features.compile_support import RecompileCounter, compiled_graphs

    finals, report = [], {}
    for backend in (None, "aot_eager"):
        torch._dynamo.reset()
        net = model()
        ddp = nn.parallel.DistributedDataParallel(torch.compile(net, backend=backend) if backend else net,
                                                  find_unused_parameters=True)
        engine = engine_of(dict(net.named_parameters()))
        engine.start()
        runner = ddp
        audit = PhaseAudit(engine, model=ddp, recompiles=RecompileCounter(), info=lambda _: None)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        engine.prepare_optimizer(optimizer)
        audit.check_phase(optimizer, stage="start")
        while True:
            step(runner, optimizer)
            step(runner, optimizer)
            if engine.is_final:
                break
            t = engine.advance(optimizer)
            audit.check_phase(optimizer, thawed=t.thawed)
        finals.append({n: p.detach().clone() for n, p in net.named_parameters()})
        report["compiled_passed" if backend else "eager_passed"] = [r.passed for r in audit.results]
        if backend:
            report["recompiles"] = [r.recompiles for r in audit.results]
    report["max_diff"] = max((finals[0][n] - finals[1][n]).abs().max().item() for n in finals[0])
    torch._dynamo.reset()  # the measurement the docstring quotes: graphs torch.compile(DDP(model)) builds
    net = model()
    outer = torch.compile(nn.parallel.DistributedDataParallel(net), backend="aot_eager")
    before = compiled_graphs()
    step(outer, torch.optim.SGD(net.parameters(), lr=0.1))
    report["graphs_of_compiled_ddp"] = compiled_graphs() - before
    return report


report = {**audit_scenarios(), **compile_scenario()}
write_report(OUT, RANK, report)
dist.destroy_process_group()
