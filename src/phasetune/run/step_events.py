"""Things that happen at a given optimizer step of a phase: its step cap, and watches other code registers.

A :class:`~phasetune.run.PhaseRun` is told after every optimizer step how many steps the fit has taken
(:meth:`~phasetune.run.PhaseRun.step_end`). So that an ordinary step costs one integer compare, the run keeps
the next step at which anything is due; :class:`StepEvents` computes it for the current phase and says
which watches are due when it is reached. A watch is "``after`` optimizer steps into every phase": the thaw
audit (after the first step of each phase) is one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: the "next event" of a phase that has none
NEVER = sys.maxsize


@dataclass(frozen=True)
class StepWatch:
    """``fn(run, step)`` after the ``after``-th optimizer step of every phase (1: right after its first)."""

    after: int
    fn: Callable[[Any, int], None]


class StepEvents:
    """The watches of a run, and which of them already fired in the current phase."""

    def __init__(self) -> None:
        self.watches: list[StepWatch] = []
        self._base = 0
        self._fired: set[int] = set()

    def add(self, after: int, fn: Callable[[Any, int], None]) -> None:
        if isinstance(after, bool) or not isinstance(after, int) or after < 1:
            raise ValueError(f"a step watch fires after >= 1 optimizer steps of a phase, got after={after!r}")
        if not callable(fn):
            raise TypeError(f"a step watch needs a callable fn(run, step), got {type(fn).__name__}")
        self.watches.append(StepWatch(after, fn))

    def begin_phase(self, base: int, now: int) -> None:
        """A phase that started at step ``base``; the fit is now at step ``now`` (later after a resume): watches
        whose step has passed count as fired, so a resumed phase does not repeat them."""
        self._base = base
        self._fired = {i for i, w in enumerate(self.watches) if base + w.after <= now}

    def due(self, step: int) -> list[StepWatch]:
        """The watches due at ``step`` (each once per phase), marked fired."""
        found = [i for i, w in enumerate(self.watches) if i not in self._fired and self._base + w.after <= step]
        self._fired.update(found)
        return [self.watches[i] for i in found]

    def next_step(self, cap: int) -> int:
        """The first step at which a watch is due or the phase's step ``cap`` (-1: none) is reached."""
        pending = [self._base + w.after for i, w in enumerate(self.watches) if i not in self._fired]
        if cap >= 0:
            pending.append(max(cap, self._base + 1))  # a phase trains at least one step
        return min(pending, default=NEVER)
