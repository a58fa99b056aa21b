"""What a :class:`~phasetune.run.PhaseRun` adds around the thaw audit (torch only).

- :func:`build`: the run's :class:`~phasetune.features.audit.phase_audit.PhaseAudit` (``RunOptions.audit``: raise, warn or off), its
  results written into the phase's history record, its spent hooks removed after each phase's first step, and a
  warning when the audited optimizer has not stepped 10 optimizer steps into a phase;
- :class:`LrNames`: readable names of the optimizer's groups (``phase1/layers.2-3``), computed at a start, a
  transition or a resume (never per step), for logging each group's lr under its name.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from phasetune.features import compile_support
from phasetune.features.audit import AuditOptions, AuditResult, PhaseAudit, group_names
from phasetune.features.audit.result import RESUME

#: optimizer steps into a phase after which an audit still waiting for the phase's first step warns
STEPPED_WATCH = 10


def build(run: Any, model: nn.Module | None) -> PhaseAudit | None:
    """The audit of ``run`` (None when ``run.options.audit == "off"``)."""
    options, env = run.options, run.env
    if options.audit == "off":
        return None

    def record(result: AuditResult) -> None:  # the phase's record keeps its latest audit line
        rec = next((r for r in reversed(run.history) if r.depth == result.depth), None)
        if rec is None or (result.passed and result.stage == RESUME and rec.audit is not None):
            return  # a resumed phase keeps what its first step found before the save, unless the resume fails
        rec.audit = result.summary()

    audit = PhaseAudit(run.engine, options=AuditOptions(options.audit, options.audit_zero_lr), model=model,
                       info=env.info, warn=env.warn, on_result=record,
                       recompiles=compile_support.RecompileCounter()
                       if model is not None and compile_support.is_compiled(model) else None)
    run.add_step_watch(_drop_spent_hooks, after=1)
    run.add_step_watch(_not_stepped, after=STEPPED_WATCH)
    return audit


def _drop_spent_hooks(run: Any, step: int) -> None:
    if run.audit is not None:
        run.audit.drop_spent_hooks()


def _not_stepped(run: Any, step: int) -> None:
    if run.audit is not None:
        run.audit.check_stepped(step - (run.history[-1].start_step or 0))


class LrNames:
    """Each optimizer group's readable name (see :func:`phasetune.features.audit.phase_audit.group_names`), kept until the groups
    change: :meth:`refresh` at a start, a transition or a resume; :meth:`lrs` reads the current lrs."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._optimizer: Optimizer | None = None
        self._names: list[str] = []

    def refresh(self, optimizer: Optimizer) -> list[str]:
        self._optimizer, self._names = optimizer, group_names(optimizer, self.engine)
        return self._names

    def lrs(self, optimizer: Optimizer) -> dict[str, float]:
        """``{name: lr}`` of ``optimizer``'s groups (names recomputed only when the groups changed)."""
        if optimizer is not self._optimizer or len(self._names) != len(optimizer.param_groups):
            self.refresh(optimizer)
        return {n: float(g["lr"]) for n, g in zip(self._names, optimizer.param_groups)}

