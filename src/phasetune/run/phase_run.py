"""One scheduled fine-tuning run, whichever front end drives it (torch only).

:class:`PhaseRun` owns everything a run needs around the :class:`~phasetune.core.engine.PhaseEngine`: the
schedule resolved against the model, the history of phases, the restore-best snapshots, the per-phase
clocks, the checkpoint state (:mod:`phasetune.run.checkpoint`) and when a phase ends; and it drives the run: a
front end (the Lightning callback, the Hugging Face callback, the plain loop) implements a small
:class:`~phasetune.run.Host` and calls the run-level sequence of :mod:`phasetune.run.sequence` at its framework's
moments; it says where it runs through a :class:`~phasetune.run.RunEnv`, and the knobs every front end shares
are one :class:`~phasetune.run.RunOptions`::

    run = PhaseRun(schedule, params, shapes, options=RunOptions(), env=RunEnv(...), model=model)
    run.prepare(host); run.begin(host, epoch=0, step=0); run.begin_training(host, epoch=0, step=0)
    ... after each optimizer step:  if decision := run.step_end(step): run.advance(host, ..., reason=decision.reason)
    ... after each evaluation:      run.end_evaluation(host, value, epoch=..., step=...)
    ... at the end:                 run.finish(epoch=..., step=..., reason=...)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer

from phasetune.core import generate, thaw, transitions
from phasetune.core.engine import PhaseEngine, Transition
from phasetune.core.param_groups import Phase0Report
from phasetune.core.schedule import Schedule, resolve_schedule
from phasetune.errors import ConfigurationError
from phasetune.features import compile_support, snapshots
from phasetune.features import random_state as rng
from phasetune.features.audit import AuditResult
from phasetune.features.peak_memory import PeakMemory
from phasetune.run import audit_glue, lora_glue, step_events
from phasetune.run.checkpoint import STATE_FORMAT, RunCheckpoint
from phasetune.run.host import RunEnv
from phasetune.run.options import RunOptions
from phasetune.run.patience import PhaseStopper
from phasetune.run.records import Decision, PhaseRecord, phase_of
from phasetune.run.sequence import RunSequence
from phasetune.run.snapshot_store import SnapshotStore, restore_best, take_snapshot
from phasetune.util.text import covering_modules, fmt_count

if TYPE_CHECKING:
    from phasetune.features.prefix_cache.phases import PrefixCachePhases

log = logging.getLogger("phasetune")
if not logging.getLogger().hasHandlers() and not log.handlers:  # transition lines show without logging setup
    log.addHandler(logging.StreamHandler())
    log.setLevel(logging.INFO)

class PhaseRun(RunSequence, RunCheckpoint):
    """A run of a schedule over ``params`` (logical name -> tensor that trains it).

    Args:
        source: schedule YAML path or mapping; ``None`` generates one from ``structure``.
        params: every parameter by its schedule name, in registration order (names may share a tensor).
        shapes: every parameter's logical (unsharded) shape, by the same names.
        options: the shared knobs.
        env: where the run happens.
        model: the module whose frozen BatchNorm layers follow ``frozen_bn_track_running_stats``.
        structure: the module implicit schedules are generated from (default: ``model``).
        no_decay: parameter-name substrings whose parameters get ``weight_decay=0`` groups.
        group_splitter: applied to each phase's new groups (sharded strategies keep groups homogeneous).
        monitor, mode: the monitored metric (for messages and checkpoint checks) and whether lower is better.
        facts: what the front end knows of the run (its step budget, the optimizer's lr) for an implicit schedule;
            without a budget the run warns once, here, that phases end by early stopping.
    """

    def __init__(
        self,
        source: Any,
        params: Mapping[str, torch.Tensor],
        shapes: Mapping[str, tuple[int, ...]],
        *,
        options: RunOptions,
        env: RunEnv,
        model: nn.Module | None = None,
        structure: nn.Module | None = None,
        no_decay: Sequence[str] | None = None,
        group_splitter: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
        monitor: str | None = None,
        mode: str = "min",
        facts: generate.RunFacts | None = None,
    ) -> None:
        self.options = options
        self.env = env
        self.model = model
        self.monitor = monitor
        self.mode = mode
        #: the generated schedule and its file notes (None: the user gave one)
        self.implicit: generate.ImplicitSchedule | None = None
        if source is None:
            if structure is None and model is None:
                raise ConfigurationError("no schedule given and no model to generate one from")
            self.implicit = generate.generate_implicit(structure if structure is not None else model, options, facts)  # type: ignore[arg-type]
            source = self.implicit.raw
            if self.implicit.no_budget_warning:
                env.warn(self.implicit.no_budget_warning)
        lora_glue.check_injected(model, source)  # adapters the schedule trains exist before names are resolved
        schedule = resolve_schedule(source, dict(shapes), epoch_transitions_only=options.epoch_transitions_only)
        for note in schedule.warnings:
            env.warn(f"schedule {schedule.source}: {note}")
        if schedule.unscheduled:
            frozen = (f"{len(schedule.unscheduled)} of {len(shapes)} parameters are in no phase and stay frozen for "
                      f"the whole run (e.g. {schedule.unscheduled[0]!r})")
            if self.implicit is not None:  # the generated schedule's choice, said in its file
                env.info(f"{frozen}, as the implicit schedule's settings say")
            else:
                env.warn(f"{frozen}; add them to a phase to train them.")
        if options.max_depth > len(schedule) - 1:
            env.warn(f"max_depth={options.max_depth} exceeds the last phase ({len(schedule) - 1}); running all phases.")
        self.engine = PhaseEngine(
            schedule,
            params,
            base_lr=options.base_max_lr,
            max_depth=options.max_depth,
            no_decay=no_decay,
            apply_lambdas_new_pgs=options.apply_lambdas_new_pgs,
        )
        self.engine.group_splitter = group_splitter
        #: the LoRA side of the run (None: the schedule has no peft section or merge_lora): merges, their record
        self.lora = lora_glue.LoraRun.build(self, model)
        self.engine.start()
        self._apply_bn_mode()
        self.history: list[PhaseRecord] = []
        #: the best monitored value of the run so far, and where it was seen: (value, epoch, phase)
        self.best: tuple[float, int, int] | None = None
        self._checks = 0  # checks of the metric (validations) in the current phase since it started or resumed
        self.store = SnapshotStore(env, options.snapshot_storage)
        self._clock: float | None = None
        self._memory: PeakMemory | None = None
        # this rank's random state: saved with checkpoints, given back on resume (see rng.RandomState)
        self.random = rng.RandomState(env, self.options.resume_rng)
        self._events = step_events.StepEvents()
        self._next_event = step_events.NEVER  # the first optimizer step at which step_end has work to do
        #: the thaw audit (None: ``options.audit="off"``); front ends run it through :meth:`audit_phase`
        self.audit = audit_glue.build(self, model)
        self.lr_names = audit_glue.LrNames(self.engine)
        #: the early stopping a transition restarts (:class:`~phasetune.run.Patience` for the loop and the Trainer
        #: callback, saved with the run; ``FTSEarlyStopping`` under Lightning, saved by Lightning)
        self.patience: PhaseStopper | None = None
        #: the frozen-prefix cache of the phases that ask for one (see :meth:`use_prefix_cache`)
        self.caches: PrefixCachePhases | None = None
        self._give_back_recompiles: Callable[[], None] = lambda: None

    # ------------------------------------------------------------------ read-only state
    @property
    def schedule(self) -> Schedule:
        return self.engine.schedule

    @property
    def depth(self) -> int:
        return self.engine.depth

    @property
    def final_depth(self) -> int:
        return self.engine.final_depth

    @property
    def is_final(self) -> bool:
        return self.engine.is_final

    @property
    def depth_remaining(self) -> int:
        """Phases left after the current one (within ``max_depth``)."""
        return self.engine.depth_remaining

    @property
    def snapshot(self) -> snapshots.Snapshot | None:
        """The current restore-best snapshot, if any."""
        return self.store.snapshot

    @property
    def thawed_params(self) -> list[str]:
        """Names of the parameters trained in the current phase (phases 0..depth)."""
        return [n for n in self.engine.schedule.params_through(self.engine.depth) if n not in self.engine.retired]

    # ------------------------------------------------------------------ what strategy adapters read and set
    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Every parameter by its schedule name."""
        return self.engine.params

    @property
    def name_of(self) -> dict[int, str]:
        """A parameter's schedule name by ``id()`` of its tensor."""
        return self.engine.name_of

    @property
    def no_decay(self) -> list[str] | None:
        return self.engine.no_decay

    def groups_for(self, depth: int) -> list[dict[str, Any]]:
        """The parameter groups phase ``depth`` adds (before any split)."""
        return self.engine.groups_for(depth)

    def split_groups_with(self, splitter: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None) -> None:
        """Apply ``splitter`` to each later phase's new groups (sharded strategies keep groups homogeneous)."""
        self.engine.group_splitter = splitter

    # ------------------------------------------------------------------ setup
    def fit_optimizer(self, optimizer: Optimizer, schedulers: Sequence[Any], *, expected: bool = False) -> Phase0Report:
        """Make ``optimizer`` hold exactly phase 0's parameters (or only report, without enforcement).

        ``expected``: the optimizer was built before the model was frozen (over every parameter), so taking
        later phases' parameters out is routine and said at INFO level rather than as a warning.
        """
        enforce = self.options.enforce_phase0_params
        report = self.engine.prepare_optimizer(optimizer, schedulers, enforce=enforce)
        said = report.message(self.env.optimizer_source, enforce, expected)
        if said is not None:
            (self.env.info if said[0] == "info" else self.env.warn)(said[1])
        return report

    def first_scheduler(self, optimizer: Optimizer, given: Sequence[Any]) -> tuple[Any, dict[str, Any]] | None:
        """Phase 0's ``new_lr_scheduler`` and its config fields (None without one), replacing ``given``."""
        first = self.engine.first_scheduler(optimizer)
        if first is not None and given:
            self.env.info(f"phase 0's new_lr_scheduler replaces {', '.join(type(s).__name__ for s in given)}")
        return first

    def check(self, optimizer: Optimizer, schedulers: Sequence[Any]) -> list[str]:
        """Problems that would stop a later transition, found before training."""
        return self.engine.check_setup(optimizer, schedulers)

    def start(self, *, epoch: int, step: int | None) -> None:
        """Begin recording (a fresh run's phase 0, or the phase a resume restored) and start the clocks."""
        if not self.history:
            self.history = [self._new_record(self.depth, epoch, step)]
        self._memory = PeakMemory(self.env.device)
        self._start_clock()
        self._plan_steps(step or 0)

    # ------------------------------------------------------------------ the thaw audit
    def audit_phase(
        self, optimizer: Optimizer, schedulers: Sequence[Any], *, stage: str, thawed: Sequence[str] | None = None,
        model: nn.Module | None = None,
    ) -> AuditResult | None:
        """Audit the phase just entered (``stage``: start, transition or resume; see :mod:`phasetune.features.audit.phase_audit`) once the
        front end installed it (a rebuilt DDP: ``model``, the model as trained; a phase's new scheduler); name the
        groups for :meth:`lrs`. A collective: every rank calls it."""
        self.lr_names.refresh(optimizer)
        if self.audit is None:
            return None
        if model is not None:
            self.audit.model = model
        return self.audit.check_phase(optimizer, schedulers, thawed=thawed, stage=stage)

    def lrs(self, optimizer: Optimizer) -> dict[str, float]:
        """Each group's lr by its readable name (``phase1/layers.2-3``), for loggers."""
        return self.lr_names.lrs(optimizer)

    def reserve_recompiles(self) -> None:
        """A compiled model: raise dynamo's recompile limit for the schedule's phases until :meth:`release` (see
        :mod:`phasetune.features.compile_support`; front ends whose training has an end call it)."""
        if self.model is not None:
            self._give_back_recompiles = compile_support.reserve_recompiles(self.model, len(self.schedule), self.env.info)

    def release(self) -> None:
        """Remove the audit's optimizer hooks and give back dynamo's recompile limit (:meth:`finish` does; a front
        end also calls it when training stopped without finishing)."""
        if self.audit is not None:
            self.audit.disarm()
        self._give_back_recompiles()
        self._give_back_recompiles = lambda: None

    # ------------------------------------------------------------------ per optimizer step
    def step_end(self, step: int) -> Decision | None:
        """After every optimizer step (and the lr schedulers' step), with the fit's optimizer steps so far: runs
        the step watches due and returns a transition when the phase's ``max_transition_step`` is reached (the
        final phase's does not end the run); None otherwise. One compare on ordinary steps; a repeated ``step``
        (gradient accumulation) does nothing more."""
        if step < self._next_event:
            return None
        for watch in self._events.due(step):
            watch.fn(self, step)
        if self._step_cap() <= step:
            return Decision(transition=True, reason=transitions.STEP)
        self._next_event = self._events.next_step(self._step_cap(-1))
        return None

    def begin_steps(self, step: int) -> Decision | None:
        """Plan step events from ``step`` as training (re)starts; a transition if the cap was already reached."""
        self._plan_steps(step)
        return Decision(transition=True, reason=transitions.STEP) if self._step_cap() <= step else None

    def add_step_watch(self, fn: Callable[[PhaseRun, int], None], *, after: int = 1) -> None:
        """Call ``fn(run, step)`` once per phase after its ``after``-th optimizer step (1: its first), on every
        rank; not again in a resumed phase whose step had passed (see :mod:`phasetune.run.step_events`)."""
        self._events.add(after, fn)
        if self.history:
            self._plan_steps(self.history[-1].start_step or 0)

    def _step_cap(self, unset: int = step_events.NEVER) -> int:
        cap = -1 if self.is_final else self.engine.phase.max_transition_step
        return unset if cap < 0 else cap

    def _plan_steps(self, now: int) -> None:
        self._events.begin_phase((self.history[-1].start_step or 0) if self.history else 0, now)
        self._next_event = self._events.next_step(self._step_cap(-1))

    # ------------------------------------------------------------------ per epoch
    def decide(self, next_epoch: int, early_stopping_done: bool = False) -> Decision | None:
        """Whether the current phase ends before ``next_epoch`` starts: a transition, or the end of the run
        when early stopping ends the final phase; None to keep training. The final phase's
        ``max_transition_epoch`` does not end the run (front ends make sure training reaches it)."""
        rec = self.history[-1]
        reason = transitions.phase_end_reason(
            next_epoch=next_epoch,
            phase_start_epoch=rec.start_epoch,
            max_transition_epoch=self.engine.phase.max_transition_epoch,
            early_stopping_done=early_stopping_done,
            epoch_transitions_only=self.options.epoch_transitions_only,
        )
        if reason is None or (self.is_final and reason == transitions.EPOCH):
            return None  # the final phase runs until early stopping or the front end's own limit
        return Decision(transition=not self.is_final, reason=reason)

    def observe(
        self,
        value: float | torch.Tensor | None,
        *,
        epoch: int,
        step: int | None,
        optimizer: Optimizer | None,
        schedulers: Sequence[Any],
    ) -> float | None:
        """Record a check of the monitored value (rank 0's decides for every rank; a collective).

        The phase's best value goes into its history record. When the value beats the best of the run so far,
        ``restore_best`` snapshots the trainable state (not in the final phase, which is never restored).
        Returns the agreed value (None when absent).
        """
        local = None if value is None else float(value)
        agreed = self.env.broadcast(local)
        self._checks += 1
        if agreed is None or not math.isfinite(agreed):
            return agreed
        rec = self.history[-1]
        if rec.best_value is None or self._better(agreed, rec.best_value):
            rec.best_value, rec.best_epoch = agreed, epoch
        if self.best is not None and not self._better(agreed, self.best[0]):
            return agreed
        self.best = (agreed, epoch, self.depth)
        # the final phase has no transition after it, so its best state would never be restored
        if self.options.restore_best and not self.is_final:
            take_snapshot(self, epoch, step, agreed, optimizer, schedulers)
        return agreed

    def _better(self, value: float, than: float) -> bool:
        return value < than if self.mode == "min" else value > than

    def transition(
        self, *, epoch: int, step: int | None, reason: str, optimizer: Optimizer, schedulers: Sequence[Any]
    ) -> Transition:
        """End the current phase before ``epoch`` (restoring its best state) and start the next one."""
        old = self.depth
        rec = self.history[-1]
        rec.end_epoch, rec.end_step, rec.end_reason = epoch, step, reason
        self._close_clock()
        restore_note = restore_best(self, rec, optimizer, schedulers)
        merged = self.lora.before_advance(self, self.depth + 1, optimizer) if self.lora is not None else None
        t = self.engine.advance(optimizer, schedulers)
        if self.lora is not None:
            self.lora.after_advance(self, merged, t, schedulers)
        self._apply_bn_mode()
        self.store.clear()
        if self.options.restore_best and self.best is not None and not self.is_final:
            # the state a phase starts from is the run's best so far (frozen parameters have not moved since):
            # a phase that never beats it is rolled back to it
            value, best_epoch, _ = self.best
            take_snapshot(self, best_epoch, step, value, t.optimizer, [t.new_scheduler] if t.new_scheduler else schedulers)
        self.history.append(self._new_record(t.depth, epoch, step))
        self._checks = 0
        self._start_clock()
        self._plan_steps(step or 0)
        now = self.history[-1]
        extras = []
        if t.new_optimizer:
            extras.append(f"new optimizer {type(t.optimizer).__name__}")
        if t.new_scheduler is not None:
            extras.append(f"new lr scheduler {type(t.new_scheduler).__name__}")
        if t.already_in_optimizer:
            extras.append(f"{len(t.already_in_optimizer)} already in the optimizer")
        where = f"step {step} (epoch {epoch})" if reason == transitions.STEP else f"epoch {epoch}"
        self.env.info(
            f"phase {old} -> {t.depth} at {where} ({reason}): {restore_note}; thawed "
            f"{covering_modules(t.thawed, list(self.engine.params))} ({fmt_count(sum(math.prod(self.engine.schedule.shapes[n]) for n in t.thawed))} "
            f"params in {len(t.thawed)} tensors) at lr {t.lr:.3g}; "
            f"{100.0 * now.trainable_params / max(now.total_params, 1):.1f}% of the parameters now train"
            + ("; " + ", ".join(extras) if extras else "")
        )
        return t

    def finish(self, *, epoch: int, step: int | None, reason: str) -> None:
        """End the run: drop the prefix cache, close the last phase's record (once) and its clock, give back what the
        run holds (:meth:`release`); warn when the schedule did not run to its end."""
        self.close_caches()
        self.release()
        if not self.history:
            return
        rec = self.history[-1]
        if rec.end_epoch is None:
            rec.end_epoch, rec.end_step, rec.end_reason = epoch, step, reason
        self._close_clock()
        self._clock = None
        if self.depth < self.final_depth:
            if self.implicit is None:
                advice = "raise max_epochs or lower the phases' max_transition_epoch to run the whole schedule"
            elif self.implicit.no_budget_warning:
                advice = "the implicit schedule had no step budget (see the warning at the start of training)"
            else:
                advice = "the run stopped before the step budget its implicit schedule was generated for"
            self.env.warn(f"training ended in {phase_of(self.depth, self.final_depth)}: {rec.end_reason}; {advice}")

    # ------------------------------------------------------------------ records and clocks
    def _apply_bn_mode(self) -> None:
        if self.model is not None:
            thaw.apply_frozen_batchnorm_mode(self.model, self.options.frozen_bn_track_running_stats)

    def _new_record(self, depth: int, epoch: int, step: int | None) -> PhaseRecord:
        lr = None if depth == 0 else self.engine.lr_for(depth)
        return PhaseRecord.starting(self.engine.schedule, depth, epoch, step, lr, retired=self.engine.retired)

    def _start_clock(self) -> None:
        self._clock = time.perf_counter()
        if self._memory is not None:
            self._memory.reset()

    def _close_clock(self) -> None:
        if self._clock is None or not self.history:
            return
        now = time.perf_counter()
        rec = self.history[-1]
        rec.wall_time += now - self._clock
        self._clock = now
        peak = self._memory.read() if self._memory is not None else None
        if peak is not None:
            rec.peak_memory = max(rec.peak_memory or 0, peak)
            rec.peak_memory_kind = self._memory.kind  # type: ignore[union-attr]


__all__ = ["STATE_FORMAT", "PhaseRun"]
