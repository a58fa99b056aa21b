"""One scheduled fine-tuning run, whichever front end drives it (torch only).

:class:`PhaseRun` owns everything a run needs around the :class:`~phasetune.engine.PhaseEngine`: the
schedule resolved against the model, the history of phases, the restore-best snapshots, the per-phase
clocks, the checkpoint state and the end-of-epoch decision. A front end (the Lightning callback, the
plain-loop :class:`~phasetune.loop.ScheduledFinetuning`) maps its hooks onto these calls and says where
it runs through a :class:`RunEnv`; the knobs both share are one :class:`RunOptions`::

    run = PhaseRun(schedule, params, shapes, options=RunOptions(), env=RunEnv(...), model=model)
    run.fit_optimizer(optimizer, schedulers)          # phase 0 over exactly phase 0's parameters
    run.start(epoch=0, step=0)
    ... after each validation: run.observe(value, epoch=..., step=..., optimizer=..., schedulers=...)
    ... before each epoch:     decision = run.decide(next_epoch, early_stopping_done)
                               if decision and decision.transition: run.transition(...)
    ... after each optimizer step: if decision := run.step_end(global_step): run.transition(..., step=...)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from phasetune import compile_support, generate, rng, run_audit, snapshots, step_events, thaw, transitions
from phasetune.audit import AuditResult
from phasetune.engine import PhaseEngine, Transition
from phasetune.errors import ConfigurationError
from phasetune.memory import PeakMemory
from phasetune.param_groups import Phase0Report
from phasetune.report import covering_modules, fmt_count
from phasetune.run_types import (
    Decision,
    PhaseRecord,
    RunEnv,
    RunOptions,
    implicit_resume_hint,
    phase_of,
    state_problem,
)
from phasetune.schedule import Schedule, diff_fingerprints, resolve_schedule
from phasetune.snapshot_store import SnapshotStore

log = logging.getLogger("phasetune")
if not logging.getLogger().hasHandlers() and not log.handlers:  # transition lines show without logging setup
    log.addHandler(logging.StreamHandler())
    log.setLevel(logging.INFO)

#: format of :meth:`PhaseRun.state_dict`; format 1 (phasetune 0.1 callback and loop) is still read
STATE_FORMAT = 2


class PhaseRun:
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
        self.audit = run_audit.build(self, model)
        self.lr_names = run_audit.LrNames(self.engine)
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
    def snapshot(self) -> snapshots.Snapshot | None:
        """The current restore-best snapshot, if any."""
        return self.store.snapshot

    @property
    def thawed_params(self) -> list[str]:
        """Names of the parameters trained in the current phase (phases 0..depth)."""
        return self.engine.schedule.params_through(self.engine.depth)

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
        """Audit the phase just entered (``stage``: start, transition or resume; see :mod:`phasetune.audit`) once the
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
        :mod:`phasetune.compile_support`; front ends whose training has an end call it)."""
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
        rank; not again in a resumed phase whose step had passed (see :mod:`phasetune.step_events`)."""
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
            self._take_snapshot(epoch, step, agreed, optimizer, schedulers)
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
        restore_note = self._restore_best(rec, optimizer, schedulers)
        t = self.engine.advance(optimizer, schedulers)
        self._apply_bn_mode()
        self.store.clear()
        if self.options.restore_best and self.best is not None and not self.is_final:
            # the state a phase starts from is the run's best so far (frozen parameters have not moved since):
            # a phase that never beats it is rolled back to it
            value, best_epoch, _ = self.best
            self._take_snapshot(best_epoch, step, value, t.optimizer, [t.new_scheduler] if t.new_scheduler else schedulers)
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
            f"{covering_modules(t.thawed, list(self.engine.params))} ({fmt_count(now.trainable_params - rec.trainable_params)} "
            f"params in {len(t.thawed)} tensors) at lr {t.lr:.3g}; "
            f"{100.0 * now.trainable_params / max(now.total_params, 1):.1f}% of the parameters now train"
            + ("; " + ", ".join(extras) if extras else "")
        )
        return t

    def finish(self, *, epoch: int, step: int | None, reason: str) -> None:
        """Close the last phase's record (once) and its clock; warn when the schedule did not run to its end."""
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

    # ------------------------------------------------------------------ restore-best
    def _take_snapshot(
        self, epoch: int, step: int | None, value: float, optimizer: Optimizer | None, schedulers: Sequence[Any]
    ) -> None:
        self.store.put(snapshots.take_snapshot(
            depth=self.depth,
            epoch=epoch,
            step=epoch if step is None else step,
            value=value,
            params=self.engine.trainable(),
            buffers=self.env.named_buffers(),
            optimizer=optimizer,
            schedulers=schedulers,
        ))

    def _restore_best(self, rec: PhaseRecord, optimizer: Optimizer, schedulers: Sequence[Any]) -> str:
        """Restore the ending phase's best state if asked; return how the transition line describes it."""
        if not self.options.restore_best:
            return "kept the last state (restore_best=False)"
        snap = self.snapshot
        # a phase without a single check of the metric (a short step-capped phase) is not rolled back
        if (snap is None or snap.depth != self.depth or rec.best_value is None) and self._checks == 0:
            return (f"kept the last state (no validation ran in phase {self.depth} before it ended, so there was "
                    "nothing to judge it by)")
        if snap is None or snap.depth != self.depth or rec.best_value is None:
            self.env.warn(
                f"restore_best: no best state was recorded in phase {self.depth} (is {self.monitor or 'the metric'!r} "
                "reported after validation, and does the phase last until one?); continuing from the current state"
            )
            return "kept the last state (no best state was recorded)"
        problems = snapshots.restore_snapshot(
            snap,
            params=self.engine.trainable(),
            buffers=self.env.named_buffers(),
            optimizer=optimizer,
            schedulers=schedulers,
            copy_into=self.env.copy_into,
            keep_lr_schedule=True,
        )
        if problems:
            self.env.warn(
                f"restore_best in phase {self.depth} could not restore the best state of epoch {snap.epoch} exactly: "
                + "; ".join(problems) + ". The phase continues from a partly restored state; check that the model, "
                "optimizer and lr schedulers were not replaced or regrouped during the phase."
            )
            return f"restoring the best state failed ({len(problems)} problem(s), see the warning)"
        rec.restored_best = True
        where = f"{self.monitor}={snap.value:.4g} at epoch {snap.epoch}"
        if snap.epoch < rec.start_epoch:  # the phase's baseline: it never beat the run's best
            return f"phase {self.depth} did not beat the best {where}: rolled back to the state it started from"
        return f"restored the best state ({where})"

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self, *, random_state: bool = False, generators: Sequence[torch.Generator] = ()) -> dict[str, Any]:
        """Everything needed to continue the run exactly (with this rank's snapshot or a reference to it).

        ``random_state``: include the random state of this rank (``env.state_saved_per_rank``) or of every
        rank (gathered: a collective every rank calls), restored by :meth:`resume`; front ends whose
        trainer saves it itself (Hugging Face) leave it out. ``generators``: the training loader's own
        (:func:`phasetune.rng.loader_generators`), saved with it.
        """
        self._close_clock()
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "depth": self.depth,
            "fingerprint": self.engine.schedule.fingerprint(),
            "history": [asdict(r) for r in self.history],
            "monitor": self.monitor,
            "mode": self.mode,
            "best": None if self.best is None else list(self.best),
        }
        state.update(self.store.state())
        if random_state:
            state["rng"] = self.random.checkpoint_state(gather=not self.env.state_saved_per_rank, generators=generators)
        return state

    def check_state(self, state: Mapping[str, Any], where: Any = None) -> None:
        """Refuse checkpoint state this run cannot continue, naming what differs and what to do."""
        refused = state_problem(state, where, monitor=self.monitor, mode=self.mode, env=self.env,
                                resume_rng=self.options.resume_rng, state_format=STATE_FORMAT)
        if refused:
            raise ConfigurationError(refused)

    def resume(
        self, state: Mapping[str, Any], optimizer: Optimizer, schedulers: Sequence[Any], where: Any = None,
        *, defer_random_state: bool = False, mid_epoch: bool = False, generators: Sequence[torch.Generator] = (),
    ) -> tuple[Optimizer, list[Any], dict[str, Any] | None]:
        """Continue a saved run: rebuild the saved phase (thawed set, groups, optimizer, scheduler) before
        the optimizer state is loaded, and restore the history, snapshot and random state.

        ``defer_random_state``: the front end restores the random state around the creation of its first data
        iterator (``self.random.before_data_iterator`` / ``after_data_iterator``): the loader may draw from the
        generators as it is built, and a ``mid_epoch`` checkpoint's run had created its iterator before saving.
        ``generators``: the training loader's own, restored now with the rest (not deferred).

        Returns the optimizer, the lr schedulers and, when a phase replaced the scheduler, its config fields.
        """
        self.check_state(state, where)
        src = f" from {where}" if where is not None else ""
        if self.depth != 0:
            raise ConfigurationError("resume needs a run that has not transitioned yet; build a new one to resume")
        blocking, benign = diff_fingerprints(state["fingerprint"], self.engine.schedule.fingerprint())
        if blocking:
            details = "".join(f"\n  - {b}" for b in blocking)
            raise ConfigurationError(
                f"cannot resume{src}: the checkpoint was trained with a different schedule or model:{details}\n"
                "resume with the schedule and model the checkpoint was saved with, or start a new fit without it"
                + (implicit_resume_hint(state["fingerprint"]) if self.implicit is not None else "")
            )
        for b in benign:
            self.env.warn(f"resuming with a changed schedule value: {b}; later phases use the current value")
        depth = int(state["depth"])
        if depth > self.final_depth:
            raise ConfigurationError(
                f"the checkpoint was saved in phase {depth}, beyond max_depth={self.options.max_depth} (last phase "
                f"{self.final_depth}); raise max_depth to at least {depth} to resume it"
            )
        scheds: list[Any] = list(schedulers)
        cfg = None
        if depth > 0:
            optimizer, scheds, cfg = self.engine.replay(depth, optimizer, schedulers)
            self._apply_bn_mode()
        self.history = [PhaseRecord.from_state(r) for r in state.get("history", [])]
        best = state.get("best")
        if best is None:  # format 1 kept per-phase bests only: the run's best is the best of them
            seen = [(r.best_value, r.best_epoch, r.depth) for r in self.history if r.best_value is not None]
            best = min(seen) if self.mode == "min" and seen else max(seen) if seen else None
        self.best = None if best is None else (float(best[0]), int(best[1]), int(best[2]))
        self.store.load(state, depth)
        if state.get("rng") is not None:  # last: nothing after it in a resume may draw from the generators
            self.random.resume(state["rng"], src, defer=defer_random_state, mid_epoch=mid_epoch, generators=generators)
        self.env.info(f"resumed in {phase_of(depth, self.final_depth)} ({len(self.thawed_params)} trainable tensors)")
        return optimizer, scheds, cfg

    def restore_random_state(self) -> None:
        """Restore the random state :meth:`resume` read (once; a no-op when there is none left)."""
        self.random.restore()

    # ------------------------------------------------------------------ records and clocks
    def _apply_bn_mode(self) -> None:
        if self.model is not None:
            thaw.apply_frozen_batchnorm_mode(self.model, self.options.frozen_bn_track_running_stats)

    def _new_record(self, depth: int, epoch: int, step: int | None) -> PhaseRecord:
        lr = None if depth == 0 else self.engine.lr_for(depth)
        return PhaseRecord.starting(self.engine.schedule, depth, epoch, step, lr)

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


__all__ = ["Decision", "PhaseRecord", "PhaseRun", "RunEnv", "RunOptions"]
