"""FTSEarlyStopping: Lightning's EarlyStopping made phase-aware.

Before the final phase, meeting the stopping criterion ends the *phase* (the scheduler moves on at the
next epoch) instead of the run. A non-finite monitored value or a crossed ``divergence_threshold`` still
ends the run: thawing more of a diverged model does not help.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import EarlyStopping

from phasetune.lightning import _compat

if TYPE_CHECKING:
    import lightning.pytorch as pl


class FTSEarlyStopping(EarlyStopping):
    """``EarlyStopping`` whose criterion ends the current phase until the final phase.

    Takes every argument of :class:`lightning.pytorch.callbacks.EarlyStopping`. ``phase_done`` is True
    once the current phase met the criterion; the scheduler resets the state at each transition.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_phase_state()

    def _init_phase_state(self) -> None:
        self.phase_done = False
        self.phase_done_epoch: int | None = None
        self.scheduler_callback: Any = None  # the FinetuningScheduler, linked at setup

    @classmethod
    def upgrade(cls, plain: EarlyStopping) -> FTSEarlyStopping:
        """A phase-aware copy of a plain ``EarlyStopping`` with the same settings and state."""
        new = _compat.copy_callback(plain, cls)
        new._init_phase_state()
        return new

    @property
    def _in_final_phase(self) -> bool:
        fts = self.scheduler_callback
        return fts is None or fts.is_final_phase

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase_aware(super().on_validation_end, trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase_aware(super().on_train_epoch_end, trainer, pl_module)

    def _phase_aware(self, hook: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stopping_before = trainer.should_stop
        hook(trainer, pl_module)
        if stopping_before or not trainer.should_stop or self._in_final_phase:
            return
        if self._run_should_end(trainer):
            return
        trainer.should_stop = False
        self.stopped_epoch = 0
        self.phase_done = True
        self.phase_done_epoch = trainer.current_epoch

    def _run_should_end(self, trainer: pl.Trainer) -> bool:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return False
        v = float(value)
        if self.check_finite and not math.isfinite(v):
            return True
        if self.divergence_threshold is not None:
            return v > self.divergence_threshold if self.mode == "min" else v < self.divergence_threshold
        return False

    def reset_for_phase(self) -> None:
        """Start the next phase with fresh patience and best score."""
        self.wait_count = 0
        self.stopped_epoch = 0
        self.best_score = torch.tensor(math.inf if self.mode == "min" else -math.inf)
        self.phase_done = False
        self.phase_done_epoch = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(phase_done=self.phase_done, phase_done_epoch=self.phase_done_epoch)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.phase_done = bool(state.pop("phase_done", False))
        self.phase_done_epoch = state.pop("phase_done_epoch", None)
        super().load_state_dict(state)
