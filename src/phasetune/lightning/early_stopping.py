"""FTSEarlyStopping: Lightning's EarlyStopping made phase-aware.

Before the final phase, meeting the stopping criterion ends the *phase* (the scheduler moves on at the
next epoch) instead of the run. A non-finite monitored value or a crossed ``divergence_threshold`` still
ends the run: thawing more of a diverged model does not help; so does reaching ``stopping_threshold`` (the
target is met). Under DDP every decision is one for all
ranks: a phase (or the run) ends when any rank's criterion says so, as in finetuning-scheduler.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.trainer.states import TrainerFn

from phasetune.lightning import _compat, messages

if TYPE_CHECKING:
    import lightning.pytorch as pl


class FTSEarlyStopping(EarlyStopping):
    """``EarlyStopping`` whose criterion ends the current phase until the final phase.

    Takes every argument of :class:`lightning.pytorch.callbacks.EarlyStopping`. ``phase_done`` is True
    once the current phase met the criterion; the scheduler resets the state at each transition.

    finetuning-scheduler's names are kept: ``es_phase_complete`` (``phase_done``), ``final_phase`` (the
    scheduler is in its final phase), ``finetuningscheduler_callback`` (``scheduler_callback``) and
    ``reduce_transition_decisions``: True while the ranks of a distributed fit see different monitored
    values (a metric logged without ``sync_dist=True``), whose decisions are then reduced to one (any rank).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_phase_state()

    def _init_phase_state(self) -> None:
        self.phase_done = False
        self.phase_done_epoch: int | None = None
        self.scheduler_callback: Any = None  # the FinetuningScheduler, linked at setup
        self.reduce_transition_decisions = False
        self._warned_unsynced = False

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

    # finetuning-scheduler's names
    @property
    def es_phase_complete(self) -> bool:
        """finetuning-scheduler's name of :attr:`phase_done`."""
        return self.phase_done

    @es_phase_complete.setter
    def es_phase_complete(self, value: bool) -> None:
        self.phase_done = bool(value)

    @property
    def final_phase(self) -> bool:
        """True while the scheduler is in its final phase (or no scheduler is linked)."""
        return self._in_final_phase

    @property
    def finetuningscheduler_callback(self) -> Any:
        """finetuning-scheduler's name of :attr:`scheduler_callback`."""
        return self.scheduler_callback

    @finetuningscheduler_callback.setter
    def finetuningscheduler_callback(self, value: Any) -> None:
        self.scheduler_callback = value

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and trainer.world_size > 1:
            self._check_ranks_agree(trainer)
        self._phase_aware(super().on_validation_end, trainer, pl_module)

    def _check_ranks_agree(self, trainer: pl.Trainer) -> None:
        """Set :attr:`reduce_transition_decisions`: whether the ranks see different monitored values (a collective)."""
        value = trainer.callback_metrics.get(self.monitor)
        local = torch.tensor([math.nan if value is None else float(value)], dtype=torch.float64,
                             device=trainer.strategy.root_device)
        seen = trainer.strategy.all_gather(local).flatten().tolist()
        self.reduce_transition_decisions = any(v != seen[0] and not (math.isnan(v) and math.isnan(seen[0])) for v in seen)
        if self.reduce_transition_decisions and not self._warned_unsynced:
            self._warned_unsynced = True
            messages.warn(
                f"the monitored {self.monitor!r} differs across ranks ({', '.join(f'{v:.6g}' for v in seen)}): it is "
                "logged without sync_dist=True. A phase ends when early stopping on any rank says so; log it with "
                "sync_dist=True for one value on every rank."
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase_aware(super().on_train_epoch_end, trainer, pl_module)

    def _phase_aware(self, hook: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stopping_before = trainer.should_stop
        hook(trainer, pl_module)
        if stopping_before or not trainer.should_stop or self._in_final_phase:
            return
        # one decision for every rank (a collective): a rank that ends the run while another moves on would hang
        if trainer.strategy.reduce_boolean_decision(self._run_should_end(trainer), all=False):
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
        if self.stopping_threshold is not None:
            reached = v < self.stopping_threshold if self.mode == "min" else v > self.stopping_threshold
            if reached:
                return True
        if self.divergence_threshold is not None:
            return v > self.divergence_threshold if self.mode == "min" else v < self.divergence_threshold
        return False

    def reset_for_phase(self) -> None:
        """Start the next phase with fresh patience; it must beat the best score of the run so far."""
        self.wait_count = 0
        self.stopped_epoch = 0
        self.phase_done = False
        self.phase_done_epoch = None

    def start_phase(self) -> None:
        """What :meth:`phasetune.run.PhaseRun.advance` calls at a transition (:meth:`reset_for_phase`)."""
        self.reset_for_phase()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(phase_done=self.phase_done, phase_done_epoch=self.phase_done_epoch)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.phase_done = bool(state.pop("phase_done", False))
        self.phase_done_epoch = state.pop("phase_done_epoch", None)
        super().load_state_dict(state)
