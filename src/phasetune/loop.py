"""Scheduled fine-tuning in your own training loop (no Lightning).

:class:`ScheduledFinetuning` drives the same :class:`~phasetune.engine.PhaseEngine` as the Lightning
callback: it freezes the model to phase 0, fits your optimizer to it and, when you report the end of an
epoch with :meth:`~ScheduledFinetuning.step`, decides whether the phase is over (its
``max_transition_epoch``, or no improvement of the metric you pass for ``patience`` epochs) and thaws the
next phase, adding its parameter groups to your optimizer and lr scheduler::

    ft = ScheduledFinetuning("schedule.yaml", model, optimizer, lr_scheduler)
    for epoch in range(max_epochs):
        train_one_epoch(model, ft.optimizer)
        ft.step(epoch, metric=validate(model))
        if ft.done:
            break

A phase may install a new optimizer or lr scheduler: always use ``ft.optimizer`` and ``ft.lr_scheduler``.
Its :meth:`~ScheduledFinetuning.state_dict` goes into checkpoints (``FSDP2Strategy.save_ckpt`` takes the
object itself and restores it before the optimizer state, which needs the saved phase's groups to exist).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from phasetune import snapshots, thaw, transitions
from phasetune._dist import rank, world_size
from phasetune.engine import PhaseEngine, Transition
from phasetune.errors import ConfigurationError
from phasetune.generate import generate_schedule
from phasetune.schedule import Schedule, diff_fingerprints, resolve_schedule
from phasetune.sharding.groups import split_groups
from phasetune.sharding.plan import logical_name, logical_view

log = logging.getLogger("phasetune")
if not logging.getLogger().hasHandlers() and not log.handlers:  # transition lines show without logging setup
    log.addHandler(logging.StreamHandler())
    log.setLevel(logging.INFO)

STATE_FORMAT = 1


@dataclass
class PhaseSummary:
    """What happened in one phase (``ScheduledFinetuning.history`` holds one per phase started)."""

    depth: int
    start_epoch: int
    lr: float | None
    end_epoch: int | None = None
    end_reason: str | None = None
    best_value: float | None = None
    best_epoch: int | None = None
    restored_best: bool = False


class ScheduledFinetuning:
    """Run a fine-tuning schedule over ``model`` and ``optimizer`` in a plain PyTorch loop.

    Args:
        schedule: YAML path or dict, validated like the Lightning callback's ``ft_schedule``; ``None``
            generates a schedule from the model (``generate_schedule(model, "blocks")``).
        model: the model (plain, or prepared by ``FSDP2Strategy.prepare_model``).
        optimizer: an optimizer over the model's parameters. Build it over every parameter you may train
            (e.g. before this object freezes the model): its groups are the template later phases copy
            hyperparameters from. It is fitted to phase 0's parameters here.
        lr_scheduler: an lr scheduler of ``optimizer`` (or a list of them), extended when groups are added.
        max_depth: last phase to run (-1: all).
        base_lr: lr of phases >= 1 that set none; ``None``: a tenth of the optimizer's first group lr.
        epoch_transitions_only: phases end only at their ``max_transition_epoch`` (required in every phase).
        mode, patience, min_delta: phase-aware early stopping on the ``metric`` passed to :meth:`step`: a
            phase ends after ``patience`` epochs without an improvement of at least ``min_delta``.
        restore_best: before each transition, restore the state (trainable parameters, their optimizer
            state, lr scheduler, buffers) of the epoch with the phase's best metric. Off by default: it
            keeps a CPU copy of the trainable part and its optimizer state on every rank.
        enforce_phase0_params: fit ``optimizer`` to exactly phase 0's parameters (True) or only warn.
        no_decay: parameter-name substrings (e.g. ``["bias", "norm"]``) whose parameters get
            ``weight_decay=0`` groups in every phase (not needed when ``optimizer`` already separates them).
        apply_lambdas_new_pgs: groups added to a LambdaLR/MultiplicativeLR follow its last lambda.
        frozen_bn_track_running_stats: frozen BatchNorm layers keep updating running statistics (True)
            or are put in eval mode while frozen.
    """

    def __init__(
        self,
        schedule: str | os.PathLike[str] | Mapping[Any, Any] | None,
        model: nn.Module,
        optimizer: Optimizer,
        lr_scheduler: Any = None,
        *,
        max_depth: int = -1,
        base_lr: float | None = 1e-5,
        epoch_transitions_only: bool = False,
        mode: Literal["min", "max"] = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        restore_best: bool = False,
        enforce_phase0_params: bool = True,
        no_decay: Sequence[str] | None = None,
        apply_lambdas_new_pgs: bool = False,
        frozen_bn_track_running_stats: bool = True,
    ) -> None:
        problems = []
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < -1:
            problems.append(f"max_depth must be -1 (all phases) or an integer >= 0, got {max_depth!r}")
        if base_lr is not None and (isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not base_lr > 0):
            problems.append(f"base_lr must be a positive number or None, got {base_lr!r}")
        if mode not in ("min", "max"):
            problems.append(f"mode must be 'min' (e.g. a loss) or 'max' (e.g. an accuracy), got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            problems.append(f"patience must be an integer >= 1, got {patience!r}")
        if not isinstance(optimizer, Optimizer):
            problems.append(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if problems:
            raise ConfigurationError(problems)
        self.model = model
        self.optimizer = optimizer
        if lr_scheduler is None:
            self.schedulers: list[Any] = []
        elif isinstance(lr_scheduler, (list, tuple)):
            self.schedulers = list(lr_scheduler)
        else:
            self.schedulers = [lr_scheduler]
        self.epoch_transitions_only = epoch_transitions_only
        self.restore_best = restore_best
        self.frozen_bn_track_running_stats = frozen_bn_track_running_stats
        self.tracker = transitions.PatienceTracker(mode=mode, patience=patience, min_delta=min_delta)
        self.done = False
        self.snapshot: snapshots.Snapshot | None = None

        # names as written in the model, without the segments wrappers insert (activation checkpointing)
        params = {logical_name(n): p for n, p in model.named_parameters()}
        # generated from a stand-in of the unwrapped tree: logical names and original class names
        source = schedule if schedule is not None else generate_schedule(logical_view(model), "blocks")
        resolved = resolve_schedule(source, {n: tuple(p.shape) for n, p in params.items()},
                                    epoch_transitions_only=epoch_transitions_only)
        for note in resolved.warnings:
            log.warning("phasetune: schedule %s: %s", resolved.source, note)
        if resolved.unscheduled and rank() == 0:
            log.warning("phasetune: %d of %d parameters are in no phase and stay frozen (e.g. %r); add them to a "
                        "phase to train them", len(resolved.unscheduled), len(params), resolved.unscheduled[0])
        self.engine = PhaseEngine(resolved, params, base_lr=base_lr, max_depth=max_depth, no_decay=no_decay,
                                  apply_lambdas_new_pgs=apply_lambdas_new_pgs)
        self.engine.group_splitter = _homogeneous
        self.engine.start()
        thaw.apply_frozen_batchnorm_mode(model, frozen_bn_track_running_stats)
        report = self.engine.prepare_optimizer(optimizer, self.schedulers, enforce=enforce_phase0_params)
        if report.changed and rank() == 0:
            log.info("phasetune: fitted the optimizer to phase 0 (%d parameter(s) of later phases taken out, %d "
                     "phase-0 parameter(s) added)", len(report.extra), len(report.missing))
        problems = self.engine.check_setup(optimizer, self.schedulers)
        if problems:
            raise ConfigurationError(problems)
        self.history = [self._summary(0, 0)]

    # ------------------------------------------------------------------ read-only state
    @property
    def schedule(self) -> Schedule:
        return self.engine.schedule

    @property
    def depth(self) -> int:
        """Index of the phase being trained."""
        return self.engine.depth

    @property
    def final_depth(self) -> int:
        return self.engine.final_depth

    @property
    def lr_scheduler(self) -> Any:
        """The (first) lr scheduler; a phase with ``new_lr_scheduler`` replaces it."""
        return self.schedulers[0] if self.schedulers else None

    @property
    def thawed_params(self) -> list[str]:
        """Names of the parameters trained in the current phase (phases 0..depth)."""
        return self.engine.schedule.params_through(self.engine.depth)

    # ------------------------------------------------------------------ the per-epoch call
    def step(self, epoch: int, metric: float | torch.Tensor | None = None) -> Transition | None:
        """Report the end of ``epoch`` (0-based) and, optionally, the monitored value measured after it.

        Returns the :class:`~phasetune.engine.Transition` when the next phase starts with epoch
        ``epoch + 1``, else None. Sets :attr:`done` when the final phase has ended. Under
        ``torch.distributed`` every rank must call it; rank 0's ``metric`` decides for all of them.
        """
        if self.done:
            return None
        phase = self.engine.phase
        rec = self.history[-1]
        value = _agree(None if metric is None else float(metric))
        if value is None and phase.max_transition_epoch < 0 and not self.engine.is_final:
            raise ConfigurationError(
                f"phase {phase.index} has no max_transition_epoch, so it ends when the metric stops improving; "
                "pass metric=... to step() (e.g. the validation loss), or set max_transition_epoch in the phase"
            )
        if value is not None:
            improved = self.tracker.update(value)
            if improved and math.isfinite(value):
                rec.best_value, rec.best_epoch = value, epoch
                if self.restore_best:
                    self._take_snapshot(epoch, value)
        reason = transitions.phase_end_reason(
            next_epoch=epoch + 1,
            phase_start_epoch=rec.start_epoch,
            max_transition_epoch=phase.max_transition_epoch,
            early_stopping_done=self.tracker.done,
            epoch_transitions_only=self.epoch_transitions_only,
        )
        if reason is None:
            return None
        rec.end_epoch, rec.end_reason = epoch + 1, reason
        if self.engine.is_final:
            self.done = True
            if rank() == 0:
                log.info("phasetune: final phase %d ended after epoch %d (%s)", phase.index, epoch, reason)
            return None
        return self._transition(epoch + 1, reason)

    def _transition(self, next_epoch: int, reason: str) -> Transition:
        rec = self.history[-1]
        if self.restore_best:
            rec.restored_best = self._restore_snapshot()
        t = self.engine.advance(self.optimizer, self.schedulers)
        self.optimizer = t.optimizer
        if t.new_scheduler is not None:
            self.schedulers = [t.new_scheduler]
        thaw.apply_frozen_batchnorm_mode(self.model, self.frozen_bn_track_running_stats)
        self.tracker.reset()
        self.snapshot = None
        self.history.append(self._summary(t.depth, next_epoch))
        if rank() == 0:
            extras = []
            if t.new_optimizer:
                extras.append(f"new optimizer {type(t.optimizer).__name__}")
            if t.new_scheduler is not None:
                extras.append(f"new lr scheduler {type(t.new_scheduler).__name__}")
            restored = ", restored the phase's best state" if rec.restored_best else ""
            log.info("phasetune: phase %d -> %d before epoch %d (%s): thawed %d tensors, %d group(s) at lr %.3g%s%s",
                     t.depth - 1, t.depth, next_epoch, reason, len(t.thawed), t.groups_added, t.lr,
                     "; " + ", ".join(extras) if extras else "", restored)
        return t

    def _summary(self, depth: int, start_epoch: int) -> PhaseSummary:
        return PhaseSummary(depth, start_epoch, None if depth == 0 else self.engine.lr_for(depth))

    # ------------------------------------------------------------------ restore-best
    def _take_snapshot(self, epoch: int, value: float) -> None:
        self.snapshot = snapshots.take_snapshot(
            depth=self.engine.depth, epoch=epoch, step=epoch, value=value, params=self.engine.trainable(),
            buffers=dict(self.model.named_buffers()), optimizer=self.optimizer, schedulers=self.schedulers,
        )

    def _restore_snapshot(self) -> bool:
        snap = self.snapshot
        if snap is None or snap.depth != self.engine.depth:
            if rank() == 0:
                log.warning("phasetune: restore_best: no best state recorded in phase %d (no metric passed to "
                            "step()?); continuing from the current state", self.engine.depth)
            return False
        problems = snapshots.restore_snapshot(snap, params=self.engine.trainable(),
                                              buffers=dict(self.model.named_buffers()),
                                              optimizer=self.optimizer, schedulers=self.schedulers)
        for p in problems:
            log.warning("phasetune: restore_best in phase %d: %s", self.engine.depth, p)
        return not problems

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the schedule exactly (this rank's part of the snapshot included)."""
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "depth": self.engine.depth,
            "fingerprint": self.engine.schedule.fingerprint(),
            "history": [asdict(r) for r in self.history],
            "tracker": self.tracker.state_dict(),
            "done": self.done,
            "snapshot": None,
        }
        if self.snapshot is not None:
            state["snapshot"] = self.snapshot.to_state()  # each rank's own shards of sharded tensors
            state["snapshot_world"] = [rank(), world_size()]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a saved run: replay its transitions (thaw, groups, optimizer, scheduler) and bookkeeping.

        Call it on a freshly built object, before loading optimizer and lr scheduler state (the saved
        phase's groups must exist for that); ``FSDP2Strategy.load_ckpt`` does this in the right order.
        """
        if state.get("format") != STATE_FORMAT:
            raise ConfigurationError(f"fine-tuning state has format {state.get('format')!r}; this phasetune reads "
                                     f"format {STATE_FORMAT}")
        if self.engine.depth != 0 or len(self.history) != 1:
            raise ConfigurationError("load_state_dict needs a ScheduledFinetuning that has not transitioned yet; "
                                     "build a new one (with a new optimizer) to resume")
        blocking, benign = diff_fingerprints(state["fingerprint"], self.engine.schedule.fingerprint())
        if blocking:
            raise ConfigurationError(["cannot resume: the checkpoint was trained with a different schedule or model",
                                      *blocking])
        for b in benign:
            log.warning("phasetune: resuming with a changed schedule value: %s; later phases use the current value", b)
        depth = int(state["depth"])
        if depth > self.engine.final_depth:
            raise ConfigurationError(f"the checkpoint was saved in phase {depth}, beyond max_depth (last phase "
                                     f"{self.engine.final_depth}); raise max_depth to resume it")
        if depth > 0:
            self.optimizer, self.schedulers, _ = self.engine.replay(depth, self.optimizer, self.schedulers)
            thaw.apply_frozen_batchnorm_mode(self.model, self.frozen_bn_track_running_stats)
        self.history = [PhaseSummary(**r) for r in state["history"]]
        self.tracker.load_state_dict(state["tracker"])
        self.done = bool(state["done"])
        self.snapshot = None
        if state.get("snapshot") is not None:
            if list(state.get("snapshot_world", [])) == [rank(), world_size()]:
                self.snapshot = snapshots.Snapshot.from_state(state["snapshot"])
            elif rank() == 0:
                log.warning("phasetune: the restore-best snapshot was saved by rank %s of %s processes and cannot be "
                            "used with %d; the phase restores the best state seen after resuming",
                            *state["snapshot_world"], world_size())


# ---------------------------------------------------------------------------------------------- helpers


def _agree(value: float | None) -> float | None:
    """Rank 0's value on every rank, so that all ranks take the same transition decision."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _homogeneous(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Split phase groups so each holds one dtype and one device mesh (foreach/fused kernels need that)."""
    return split_groups(groups)[0]
