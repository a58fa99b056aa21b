"""The run-level sequence of a fit, written once for every front end (a mixin of :class:`~phasetune.run.PhaseRun`).

A front end implements :class:`~phasetune.run.Host` and calls, at its framework's moments::

    run.prepare(host)                           # optimizer fitted to phase 0, phase 0's lr scheduler, checks
    run.restore(host, state)                    # (a resume) the saved phase rebuilt before optimizer state loads
    run.begin(host, epoch=e, step=s)            # records and clocks start, the phase is audited
    run.begin_training(host, epoch=e, step=s)   # prefix cache, a transition a step-cap checkpoint still owes
    run.step_end(step) -> advance               # after each optimizer step (one compare on ordinary steps)
    run.end_evaluation(host, value, ...)        # observe -> patience -> decide (a stop ends the run)
    run.start_epoch(host, epoch=e, step=s)      # decide -> advance, for front ends that move at epoch starts
    run.finish(epoch=e, step=s, reason=r)       # the last record closed, the cache dropped, hooks removed

Every transition is :meth:`RunSequence.advance`: leave the prefix cache -> transition -> install -> reset
patience -> audit -> enter the next phase's cache, in that order in every front end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from phasetune.errors import ConfigurationError
from phasetune.features.prefix_cache.index import PrefixCacheError
from phasetune.features.prefix_cache.phases import PrefixCachePhases
from phasetune.run.host import Host
from phasetune.run.patience import Patience
from phasetune.run.records import Decision

if TYPE_CHECKING:
    from torch import nn

    from phasetune.core.engine import Transition
    from phasetune.run.phase_run import PhaseRun

#: said when a resumed checkpoint's schedule had already ended
ALREADY_COMPLETE = "the schedule was already complete in the checkpoint; nothing left to train"


def metric_missing(phase: int, how_to_report: str) -> str:
    """The error of a phase that ends only by the monitored metric when none was reported."""
    return (f"phase {phase} has no max_transition_epoch or max_transition_step, so it ends when the monitored metric "
            f"stops improving, but no value of it was reported: {how_to_report}")


class RunSequence:
    """The calls that hold a fit's sequence (see the module docstring); ``self`` is a :class:`PhaseRun`."""

    def prepare(self: PhaseRun, host: Host, *, expected: bool = False, fitted: bool = False, refreeze: bool = False,
                checks: Sequence[Callable[[], list[str]]] = ()) -> None:
        """Fit the host's optimizer to phase 0 (unless ``fitted`` already), install phase 0's ``new_lr_scheduler``,
        and raise every problem that would stop a later transition, once: ``checks`` first (a strategy may set how
        groups are split), then the run's own. ``refreeze``: freeze to phase 0 again (the host thawed every phase's
        parameters for a wrapper that registers them when built, see :meth:`thaw_every_phase`)."""
        if refreeze:
            self.engine.start()
            self._apply_bn_mode()
        optimizer, schedulers = host.optimizer_and_schedulers()
        if not fitted:
            self.fit_optimizer(optimizer, schedulers, expected=expected)
        first = self.first_scheduler(optimizer, schedulers)
        if first is not None:
            host.install(optimizer=None, scheduler=first[0], scheduler_cfg=first[1], thawed=False)
            schedulers = [first[0]]
        problems = [p for check in checks for p in check()]
        problems += self.check(optimizer, schedulers)
        if problems:
            raise ConfigurationError(problems)

    def thaw_every_phase(self: PhaseRun) -> None:
        """Make every parameter of the phases to run trainable until :meth:`prepare` freezes again (a DDP wrapper
        registers only trainable parameters when built, and an optimizer built over them keeps their groups)."""
        from phasetune.core import thaw

        thaw.thaw(self.engine.params, self.schedule.params_through(self.final_depth))

    def use_prefix_cache(self: PhaseRun, model: nn.Module, overrides: Mapping[int, Any] | None,
                         **settings: Any) -> list[str]:
        """Build the frozen-prefix cache of the phases that ask for one (schedule key or ``overrides``), kept as
        :attr:`caches` when any phase caches; ``settings`` go to :class:`~phasetune.features.prefix_cache.phases.PrefixCachePhases`.
        Returns the problems for the front end's setup error (none: ready, or no phase caches)."""
        self.close_caches()
        if overrides is None and all(p.prefix_cache is None for p in self.schedule):
            return []
        try:
            caches = PrefixCachePhases(self.schedule, model, overrides=overrides, info=self.env.info, **settings)
        except PrefixCacheError as e:
            return list(e.problems)
        if caches.enabled:
            self.caches = caches
        else:
            caches.close()
        return []

    def restore(self: PhaseRun, host: Host, state: Mapping[str, Any], where: Any = None, *, audit: bool = False,
                **resume: Any) -> None:
        """Continue a saved run (:meth:`~PhaseRun.resume` with ``resume``'s keywords) and install the saved phase in
        the host before it loads optimizer state; the run's :class:`Patience` takes its saved state. ``audit``: the
        run had begun already (a strategy restores callbacks late): audit the rebuilt phase now."""
        optimizer, schedulers = host.optimizer_and_schedulers()
        new_opt, scheds, cfg = self.resume(state, optimizer, schedulers, where, **resume)
        host.install(optimizer=None if new_opt is optimizer else new_opt, scheduler=scheds[0] if cfg is not None else
                     None, scheduler_cfg=cfg, thawed=self.depth > 0)
        if isinstance(self.patience, Patience) and "tracker" in state:
            self.patience.load_state_dict(state)
        if audit:
            self.audit_host(host, "resume")

    def begin(self: PhaseRun, host: Host, *, epoch: int, step: int | None, resumed: bool = False,
              reserve: bool = True) -> None:
        """Start recording and the clocks, audit the phase as installed, and (``reserve``: a front end whose training
        has an end) raise dynamo's recompile limit for a compiled model until :meth:`finish`."""
        self.start(epoch=epoch, step=step)
        self.audit_host(host, "resume" if resumed else "start")
        if reserve:
            self.reserve_recompiles()

    def begin_training(self: PhaseRun, host: Host, *, epoch: int, step: int, early_stopped: bool = False,
                       dataset: Any = None) -> bool:
        """Training (re)starts at ``step``: enter the phase's prefix cache (``dataset``: the training set, when the
        front end has it only now) and make the transition a checkpoint saved at a step cap still owes. Returns
        False, saying so, when the checkpoint's schedule was already complete (its :class:`Patience` ended the run,
        or the final phase's ``early_stopped``)."""
        stopped = isinstance(self.patience, Patience) and self.patience.stopped
        if stopped or (self.is_final and self.decide(epoch, early_stopped) is not None):
            self.env.info(ALREADY_COMPLETE)
            return False
        if self.caches is not None:
            self.caches.enter(self.depth, dataset=dataset)
        at_cap = self.begin_steps(step)  # a checkpoint saved at a step cap, before its transition
        if at_cap is not None:
            self.advance(host, epoch=epoch, step=step, reason=at_cap.reason)
        return True

    def advance(self: PhaseRun, host: Host, *, epoch: int, step: int | None, reason: str) -> Transition:
        """Move to the next phase: leave the prefix cache -> transition -> install -> reset patience -> audit ->
        enter the next phase's cache."""
        optimizer, schedulers = host.optimizer_and_schedulers()
        if self.caches is not None:  # before the next phase thaws any of the prefix
            self.caches.leave(self.history)
        t = self.transition(epoch=epoch, step=step, reason=reason, optimizer=optimizer, schedulers=schedulers)
        host.install(optimizer=t.optimizer if t.new_optimizer else None, scheduler=t.new_scheduler,
                     scheduler_cfg=t.scheduler_cfg, thawed=True)
        if self.patience is not None:
            self.patience.start_phase()
        self.audit_host(host, "transition", thawed=t.thawed)
        if self.caches is not None:
            self.caches.enter(self.depth)
        return t

    def start_epoch(self: PhaseRun, host: Host, *, epoch: int, step: int | None, early_stopped: bool = False) -> None:
        """Before ``epoch`` trains: move to the next phase when the current one ended (its ``max_transition_epoch``,
        or early stopping: ``early_stopped`` or the run's :class:`Patience`)."""
        done = early_stopped or (isinstance(self.patience, Patience) and self.patience.done)
        decision = self.decide(epoch, done)
        if decision is not None and decision.transition:
            self.advance(host, epoch=epoch, step=step, reason=decision.reason)

    def end_evaluation(self: PhaseRun, host: Host, value: Any, *, epoch: int, step: int | None,
                       next_epoch: int | None = None, how_to_report: str | None = None) -> Decision | None:
        """After an evaluation of ``epoch``: observe ``value`` (None: not reported) -> the run's :class:`Patience`
        -> decide before ``next_epoch`` (None: the front end decides at the next epoch start). A stop finishes the
        run; a transition advances it (``Decision.applied``). ``how_to_report``: a phase that ends only by the
        metric cannot run without it, so a missing value raises, saying this."""
        optimizer, schedulers = host.optimizer_and_schedulers()
        phase = self.engine.phase
        agreed = self.observe(value, epoch=epoch, step=step, optimizer=optimizer, schedulers=schedulers)
        if agreed is None:
            if how_to_report and max(phase.max_transition_epoch, phase.max_transition_step) < 0 and not self.is_final:
                raise ConfigurationError(metric_missing(phase.index, how_to_report))
        elif isinstance(self.patience, Patience):
            why = self.patience.update(agreed)
            if why is not None:
                return self._stop(epoch, step, why)
        if next_epoch is None:
            return None
        decision = self.decide(next_epoch, isinstance(self.patience, Patience) and self.patience.done)
        if decision is None:
            return None
        if decision.stop:
            return self._stop(epoch, step, decision.reason)
        return dataclasses.replace(decision, applied=self.advance(host, epoch=next_epoch, step=step,
                                                                  reason=decision.reason))

    def _stop(self: PhaseRun, epoch: int, step: int | None, reason: str) -> Decision:
        if isinstance(self.patience, Patience):
            self.patience.stopped = True
        self.finish(epoch=epoch + 1, step=step, reason=reason)
        self.env.info(f"final phase {self.depth} ended after epoch {epoch} ({reason})" if self.is_final
                      else f"training ended after epoch {epoch} ({reason})")
        return Decision(transition=False, reason=reason)

    def audit_host(self: PhaseRun, host: Host, stage: str, thawed: Sequence[str] | None = None) -> None:
        """Audit the phase as the host installed it (a collective): its optimizer, schedulers and trained model."""
        optimizer, schedulers = host.optimizer_and_schedulers()
        self.audit_phase(optimizer, schedulers, stage=stage, thawed=thawed, model=host.trained_model())

    def close_caches(self: PhaseRun) -> None:
        """Drop the prefix cache (its entries, hooks and spill files; its line goes into the phase's record)."""
        if self.caches is not None:
            self.caches.leave(self.history)
            self.caches.close()
            self.caches = None

    def close(self: PhaseRun) -> None:
        """Give back everything the run holds (prefix cache, audit hooks, dynamo's limit), also after an exception."""
        self.close_caches()
        self.release()


__all__ = ["ALREADY_COMPLETE", "RunSequence", "metric_missing"]

