"""When a phase ends: pure decision logic shared by the Lightning callback and the plain-loop engine."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

EPOCH = "max_transition_epoch reached"
#: a phase's ``max_transition_step`` (an absolute optimizer-step count) was reached: see PhaseRun.step_end
STEP = "max_transition_step reached"
EARLY_STOPPING = "early stopping"


def phase_end_reason(
    *,
    next_epoch: int,
    phase_start_epoch: int,
    max_transition_epoch: int,
    early_stopping_done: bool,
    epoch_transitions_only: bool = False,
) -> str | None:
    """Why the current phase should end before ``next_epoch`` starts, or None to keep training it.

    Every phase trains at least one epoch. ``max_transition_epoch`` is absolute: the phase ends once the
    next epoch would be at or past it. Early stopping counts unless ``epoch_transitions_only``.
    """
    if next_epoch <= phase_start_epoch:
        return None
    if max_transition_epoch >= 0 and next_epoch >= max_transition_epoch:
        return EPOCH
    if early_stopping_done and not epoch_transitions_only:
        return EARLY_STOPPING
    return None


@dataclass
class PatienceTracker:
    """Phase-aware early stopping for plain loops: the phase is done after ``patience`` checks without
    an improvement of at least ``min_delta`` on the best value of the run so far (the rule of Lightning's
    ``EarlyStopping`` and of ``FTSEarlyStopping``, whose best score also carries over between phases)."""

    mode: Literal["min", "max"] = "min"
    patience: int = 3
    min_delta: float = 0.0
    best: float = math.nan
    wait: int = 0
    done: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")

    def improved(self, value: float) -> bool:
        if math.isnan(self.best):
            return True
        delta = abs(self.min_delta)
        return value < self.best - delta if self.mode == "min" else value > self.best + delta

    def update(self, value: float) -> bool:
        """Record a monitored value; return True when it improved on the best so far."""
        value = float(value)
        if not math.isfinite(value):
            self.wait += 1
            self.done = self.done or self.wait >= self.patience
            return False
        if self.improved(value):
            self.best, self.wait = value, 0
            return True
        self.wait += 1
        if self.wait >= self.patience:
            self.done = True
        return False

    def reset(self) -> None:
        """Forget everything (best value included)."""
        self.best, self.wait, self.done = math.nan, 0, False

    def start_phase(self) -> None:
        """A new phase gets fresh patience but must beat the best value of the run so far."""
        self.wait, self.done = 0, False

    def state_dict(self) -> dict[str, float | int | bool | str]:
        return {"mode": self.mode, "patience": self.patience, "min_delta": self.min_delta,
                "best": self.best, "wait": self.wait, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        for k in ("best", "wait", "done"):
            setattr(self, k, state[k])
