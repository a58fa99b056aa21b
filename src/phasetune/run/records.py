"""What a run reports: one :class:`PhaseRecord` per phase started, and each :class:`Decision` (torch only)."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from phasetune.core.engine import Transition


@dataclass
class PhaseRecord:
    """What happened in one phase (a run's ``history`` holds one per phase started)."""

    depth: int
    start_epoch: int
    start_step: int | None
    lr: float | None
    trainable_params: int
    total_params: int
    end_epoch: int | None = None
    end_step: int | None = None
    end_reason: str | None = None
    best_value: float | None = None
    best_epoch: int | None = None
    restored_best: bool = False
    wall_time: float = 0.0
    peak_memory: int | None = None  # bytes; what was measured: peak_memory_kind (see phasetune.features.peak_memory)
    peak_memory_kind: str | None = None
    #: the thaw audit's last line for this phase (its transition's, then its first step's); None: not audited
    audit: str | None = None
    #: the frozen-prefix cache's end-of-phase line (what it held and served, see docs/prefix_cache.md); None: no cache
    prefix_cache: str | None = None

    @property
    def epochs(self) -> int | None:
        return None if self.end_epoch is None else self.end_epoch - self.start_epoch

    @property
    def steps(self) -> int | None:
        return None if self.end_step is None or self.start_step is None else self.end_step - self.start_step

    @classmethod
    def starting(cls, schedule: Any, depth: int, epoch: int, step: int | None, lr: float | None,
                 retired: Collection[str] = ()) -> PhaseRecord:
        """The record of phase ``depth`` of ``schedule`` starting now, with its share of the parameters (``retired``:
        parameters that no longer train, e.g. LoRA adapters merged into their base weights)."""
        shapes = schedule.shapes  # logical shapes: tensors may be shards or shared FlatParameters
        trainable = sum(math.prod(shapes[n]) for n in schedule.params_through(depth) if n not in retired)
        return cls(depth, epoch, step, lr, trainable, sum(math.prod(s) for s in shapes.values()))

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PhaseRecord:
        """A record from :func:`dataclasses.asdict` output (fields a format-1 loop record lacked default)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in state.items() if k in known}
        values.setdefault("start_step", None)
        values.setdefault("trainable_params", 0)
        values.setdefault("total_params", 0)
        return cls(**values)


@dataclass(frozen=True)
class Decision:
    """What :meth:`PhaseRun.decide` (and the run-level calls) say: move to the next phase, or end the run; and why."""

    transition: bool
    reason: str
    #: the transition :meth:`PhaseRun.end_evaluation` made of it (None: not made, or a stop)
    applied: Transition | None = None

    @property
    def stop(self) -> bool:
        return not self.transition


def phase_of(depth: int, final_depth: int) -> str:
    """``phase 1 (of phases 0-2)``: a phase and the phases of the run, in messages."""
    return f"phase {depth} (of phases 0-{final_depth})"


__all__ = ["Decision", "PhaseRecord", "phase_of"]
