"""Scheduled fine-tuning of a ``torch.compile``-d model (torch only).

Measured on torch 2.13 (tests/test_compile.py): a thaw needs neither a recompile by hand nor
``torch._dynamo.reset()`` to be correct. Dynamo guards every parameter's ``requires_grad``, so the first
forward after a transition fails the guard and compiles one new graph (per compiled frame and grad mode), and
the run trains exactly as without compile. What can go wrong is the budget: dynamo compiles a frame at most
``torch._dynamo.config.recompile_limit`` times (8 by default), then runs it uncompiled for the rest of the
process with only a log line. Each phase costs a graph for training and, with validation under ``no_grad``,
one for evaluation, so a schedule of more than about 4 phases silently loses compilation.

:func:`reserve_recompiles` raises that limit for a run (and gives it back at the end);
:class:`RecompileCounter` counts the graphs compiled since a transition, which the audit reports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

log = logging.getLogger("phasetune")

#: graphs a phase may cost per compiled frame: training, evaluation under no_grad, and one spare
GRAPHS_PER_PHASE = 3


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (every compiled function and module)."""
    from torch._dynamo.utils import counters  # dynamo's own statistics, the only count of compiled graphs

    return int(counters["stats"]["unique_graphs"])


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or a module in it runs through ``torch.compile``."""
    from torch._dynamo.eval_frame import OptimizedModule  # what torch.compile(module) returns

    for m in model.modules():
        # nn.Module.compile() compiles in place and keeps the compiled call here (private, no public flag)
        if isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None:
            return True
    return False


@dataclass
class RecompileCounter:
    """Graphs compiled since :meth:`mark` (the audit marks it at each transition)."""

    start: int = 0

    def mark(self) -> None:
        self.start = compiled_graphs()

    def since_mark(self) -> int:
        return compiled_graphs() - self.start


def reserve_recompiles(model: nn.Module, n_phases: int, warn: Callable[[str], None] | None = None) -> Callable[[], None]:
    """Let dynamo recompile ``model`` at every transition of an ``n_phases`` schedule.

    When ``model`` is compiled and ``torch._dynamo.config.recompile_limit`` is below
    ``GRAPHS_PER_PHASE * n_phases``, raise it to that (a process-wide setting of torch, changed here only)
    and say so. Returns the function that puts the previous value back; call it when the run ends.
    """
    if not is_compiled(model):
        return _nothing
    import torch._dynamo

    config = torch._dynamo.config
    before = int(config.recompile_limit)
    need = GRAPHS_PER_PHASE * n_phases
    if before >= need:
        return _nothing
    config.recompile_limit = need  # dynamo's per-frame budget: each thaw compiles a new graph
    (warn or log.info)(
        f"torch.compile: raised torch._dynamo.config.recompile_limit from {before} to {need} for this run: each of "
        f"the {n_phases} phases compiles new graphs (requires_grad changes), and past the limit dynamo runs the "
        "model uncompiled"
    )

    def restore() -> None:
        if config.recompile_limit == need:  # unless someone changed it since
            config.recompile_limit = before

    return restore


def _nothing() -> None:
    return None


__all__ = ["GRAPHS_PER_PHASE", "RecompileCounter", "compiled_graphs", "is_compiled", "reserve_recompiles"]
