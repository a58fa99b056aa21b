"""Phase-aware early stopping for front ends without their own (the plain loop, the Hugging Face Trainer).

:class:`Patience` ends a phase after ``patience`` checks of the monitored value without an improvement of at least
``min_delta`` (the best value of the run carries over between phases, as in Lightning's ``EarlyStopping``), and
ends the run on a non-finite value (``check_finite``). The Lightning callback keeps ``FTSEarlyStopping``, which
does the same as a Lightning callback; :class:`PhaseStopper` is what the run asks of either at a transition.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Protocol

from phasetune.core import transitions

#: the end reason of a run stopped by a non-finite monitored value
NON_FINITE = "the monitored value is not finite"


class PhaseStopper(Protocol):
    """What :meth:`phasetune.run.PhaseRun.advance` needs of a front end's early stopping: start the next phase."""

    def start_phase(self) -> None: ...


class Patience:
    """Patience and the non-finite stop of one run.

    Args:
        patience: checks without improvement after which the phase ends (an integer >= 1).
        min_delta: the smallest change that counts as an improvement.
        check_finite: a non-finite value ends the run (as Lightning's ``EarlyStopping(check_finite=True)``).
        mode: ``"min"`` (a loss) or ``"max"`` (an accuracy).
    """

    def __init__(self, patience: int = 3, min_delta: float = 0.0, check_finite: bool = True,
                 mode: Literal["min", "max"] = "min") -> None:
        self.patience, self.min_delta, self.check_finite = patience, min_delta, check_finite
        #: the run was ended by this object (the final phase's patience, or a non-finite value)
        self.stopped = False
        self.tracker = transitions.PatienceTracker(mode=mode if mode in ("min", "max") else "min",
                                                   patience=max(patience, 1) if isinstance(patience, int) else 1,
                                                   min_delta=min_delta)

    @staticmethod
    def problems(patience: Any, mode: Any = "min") -> list[str]:
        """What is wrong with these settings (empty when nothing is), each naming the argument."""
        found = []
        if mode not in ("min", "max"):
            found.append(f"mode must be 'min' (e.g. a loss) or 'max' (e.g. an accuracy), got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            found.append(f"patience must be an integer >= 1, got {patience!r}")
        return found

    @property
    def done(self) -> bool:
        """The current phase ran out of patience."""
        return self.tracker.done

    def update(self, value: float) -> str | None:
        """Record a check of the monitored value; return why the run ends now (a non-finite value), else None."""
        if self.check_finite and not math.isfinite(value):
            return NON_FINITE
        self.tracker.update(value)
        return None

    def start_phase(self) -> None:
        """A new phase starts: its patience is counted afresh (the best value carries over)."""
        self.tracker.start_phase()

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint keys (``tracker``, ``done``), as the loop and the Trainer callback always saved them."""
        return {"tracker": self.tracker.state_dict(), "done": self.stopped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.stopped = bool(state["done"])


__all__ = ["NON_FINITE", "Patience", "PhaseStopper"]
