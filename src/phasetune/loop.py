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

Phases with a ``max_transition_step`` end between two optimizer steps: report each optimizer step with
:meth:`~ScheduledFinetuning.step_end` (after ``optimizer.step()`` and the lr scheduler's ``step()``), and
re-read ``ft.optimizer`` / ``ft.lr_scheduler`` after it returns a transition.

A phase may install a new optimizer or lr scheduler: always use ``ft.optimizer`` and ``ft.lr_scheduler``.
The bookkeeping (history, restore-best snapshots, checkpoint state, when a phase ends) is
:class:`phasetune.run.PhaseRun`'s, the same the Lightning callback uses, with the same defaults.
Its :meth:`~ScheduledFinetuning.state_dict` goes into checkpoints (``FSDP2Strategy.save_ckpt`` takes the
object itself and restores it before the optimizer state, which needs the saved phase's groups to exist).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer

from phasetune import generate, rng, transitions
from phasetune.engine import Transition
from phasetune.errors import ConfigurationError
from phasetune.generate import RunFacts
from phasetune.prefix_phases import PrefixCachePhases
from phasetune.run import PhaseRecord, PhaseRun, RunEnv, RunOptions
from phasetune.run_view import RunView
from phasetune.sharding.groups import split_groups
from phasetune.sharding.names import logical_name, logical_view

#: the loop's history records are the run's (kept under their 0.1 name)
PhaseSummary = PhaseRecord
NON_FINITE = "the monitored value is not finite"


class ScheduledFinetuning(RunView):
    """Run a fine-tuning schedule over ``model`` and ``optimizer`` in a plain PyTorch loop.

    Args:
        schedule: YAML path or dict, validated like the Lightning callback's ``ft_schedule``; ``None``
            generates a schedule from the model (``schedule_style``) over the run's step budget (``total_steps``, or
            ``max_epochs`` x ``len(train_loader)``) with the default settings
            (:func:`phasetune.recipes.default_settings`; the optimizer's lr is ``optimizer``'s); without a budget
            a warning says that phases end by early stopping. ``ft.run.implicit`` holds the generated schedule's
            notes (budget, settings) for the file you write with ``ft.schedule.dump(path, header=...)``.
        model: the model (plain, or prepared by ``FSDP2Strategy.prepare_model``).
        optimizer: an optimizer over the model's parameters. Build it over every parameter you may train
            (e.g. before this object freezes the model): its groups are the template later phases copy
            hyperparameters from. It is fitted to phase 0's parameters here.
        lr_scheduler: an lr scheduler of ``optimizer`` (or a list of them), extended when groups are added.
        mode, patience, min_delta, check_finite: phase-aware early stopping on the ``metric`` passed to
            :meth:`step`: a phase ends after ``patience`` epochs without an improvement of at least
            ``min_delta``; a non-finite metric ends the run (``check_finite=True``, as Lightning's
            ``EarlyStopping``).
        no_decay: parameter-name substrings (e.g. ``["bias", "norm"]``) whose parameters get
            ``weight_decay=0`` groups in every phase (not needed when ``optimizer`` already separates them).
        snapshot_dir: where ``snapshot_storage="disk"`` writes its files (default: the working directory).
        prefix_cache: phase index -> ``True`` / ``False`` / ``{prefix_end, limit_mb, deterministic_inputs}``: sets or
            overrides the phases' ``prefix_cache`` schedule key (cache the frozen prefix's outputs within a phase;
            see docs/prefix_cache.md). A phase that caches needs :meth:`before_batch` before each training forward
            and a training set built with ``IndexedDataset``.
        train_dataset: the training dataset, checked for random transforms when a phase caches.
        train_loader: the training data loader (or a list / dict of them): the generators its samplers keep of
            their own (``DataLoader(generator=g)``, as PyTorch's reproducibility notes suggest; a sampler's
            ``generator``) are saved by :meth:`state_dict` and restored by :meth:`load_state_dict`, so that a
            resumed run draws the epoch orders of the uninterrupted one. Build it before resuming.
        spill_dir: where cache entries beyond a phase's ``limit_mb`` go (default: the system temp dir).
        total_steps: the run's optimizer steps, the budget an implicit schedule is split over (with gradient
            accumulation: optimizer steps, not batches). Only with ``schedule=None``.
        max_epochs: the run's epochs; with a ``train_loader`` that has a length, the budget is ``max_epochs`` x
            ``len(train_loader)`` (one optimizer step per batch; give ``total_steps`` otherwise). Only with
            ``schedule=None``.

    The other keyword arguments are the Lightning callback's, with the same meaning and default
    (:class:`phasetune.run.RunOptions`): ``max_depth``, ``base_max_lr``, ``restore_best``,
    ``epoch_transitions_only``, ``schedule_style``, ``schedule_options``, ``reinit_optim_cfg``, ``reinit_lr_cfg``,
    ``enforce_phase0_params``, ``apply_lambdas_new_pgs``, ``frozen_bn_track_running_stats``,
    ``snapshot_storage``, ``resume_rng``, ``audit``, ``audit_zero_lr``.

    The thaw audit (:mod:`phasetune.audit`, ``audit="raise"`` by default) checks each phase at its start and
    after its first ``optimizer.step()``: a phase that did not take effect raises :class:`~phasetune.AuditError`
    from that step, naming the parameters and the probable cause. :meth:`lrs` gives each group's lr by a readable
    name, for your logger.
    """

    def __init__(
        self,
        schedule: str | os.PathLike[str] | Mapping[Any, Any] | None,
        model: nn.Module,
        optimizer: Optimizer,
        lr_scheduler: Any = None,
        *,
        max_depth: int = -1,
        base_max_lr: float | None = 1e-5,
        restore_best: bool = True,
        epoch_transitions_only: bool = False,
        mode: Literal["min", "max"] = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        check_finite: bool = True,
        schedule_style: str = generate.DEFAULT_STYLE,
        schedule_options: Mapping[str, Any] | None = None,
        reinit_optim_cfg: Mapping[str, Any] | None = None,
        reinit_lr_cfg: Mapping[str, Any] | None = None,
        enforce_phase0_params: bool = True,
        no_decay: Sequence[str] | None = None,
        apply_lambdas_new_pgs: bool = False,
        frozen_bn_track_running_stats: bool = True,
        snapshot_storage: str = "memory",
        snapshot_dir: str | os.PathLike[str] | None = None,
        resume_rng: str = "exact",
        audit: str = "raise",
        audit_zero_lr: str = "fail",
        base_lr: float | None = None,
        prefix_cache: Mapping[int, Any] | None = None,
        train_dataset: Any = None,
        spill_dir: str | os.PathLike[str] | None = None,
        train_loader: Any = None,
        total_steps: int | None = None,
        max_epochs: int | None = None,
    ) -> None:
        if base_lr is not None:
            warnings.warn("ScheduledFinetuning(base_lr=...) is now base_max_lr=..., the Lightning callback's name; "
                          "base_lr will be removed", DeprecationWarning, stacklevel=2)
            base_max_lr = base_lr
        options = RunOptions(
            max_depth=max_depth, base_max_lr=base_max_lr, restore_best=restore_best,
            epoch_transitions_only=epoch_transitions_only, schedule_style=schedule_style,
            schedule_options=schedule_options,
            reinit_optim_cfg=reinit_optim_cfg, reinit_lr_cfg=reinit_lr_cfg,
            enforce_phase0_params=enforce_phase0_params, apply_lambdas_new_pgs=apply_lambdas_new_pgs,
            frozen_bn_track_running_stats=frozen_bn_track_running_stats, snapshot_storage=snapshot_storage,
            resume_rng=resume_rng, audit=audit, audit_zero_lr=audit_zero_lr,
        )
        problems = options.problems(explicit_schedule=schedule is not None)
        if mode not in ("min", "max"):
            problems.append(f"mode must be 'min' (e.g. a loss) or 'max' (e.g. an accuracy), got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            problems.append(f"patience must be an integer >= 1, got {patience!r}")
        if not isinstance(optimizer, Optimizer):
            problems.append(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        problems += _budget_problems(schedule, total_steps, max_epochs)
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
        self.check_finite = check_finite
        self.tracker = transitions.PatienceTracker(mode=mode, patience=patience, min_delta=min_delta)
        self.done = False
        #: optimizer steps of the fit so far, as counted or given by :meth:`step_end` (None: never called)
        self.global_step: int | None = None
        self._epoch = 0  # the epoch being trained: one after the last one step() reported
        self.train_loader = train_loader

        # names as written in the model, without the segments wrappers insert (activation checkpointing)
        params = {logical_name(n): p for n, p in model.named_parameters()}
        env = RunEnv(
            named_buffers=lambda: dict(model.named_buffers()),
            rank_local_snapshots=True,  # sharded models snapshot their shards; each rank saves its own state
            state_saved_per_rank=True,
            snapshot_dir=None if snapshot_dir is None else str(snapshot_dir),
            device=next((p.device for p in params.values()), None),
        )
        self.run = PhaseRun(
            schedule, params, {n: tuple(p.shape) for n, p in params.items()}, options=options, env=env,
            model=model, structure=logical_view(model),  # a stand-in of the unwrapped tree: logical names
            no_decay=no_decay, group_splitter=_homogeneous, mode=mode,
            facts=None if schedule is not None or not isinstance(optimizer, Optimizer) else
            loop_facts(optimizer, total_steps, max_epochs, train_loader),
        )
        if self.run.implicit is not None:
            self.run.env.info(f"implicit schedule ({len(self.run.schedule)} phases; {self.run.implicit.budget_line})")
        self.run.fit_optimizer(optimizer, self.schedulers, expected=True)
        first = self.run.first_scheduler(optimizer, self.schedulers)
        if first is not None:
            self.schedulers = [first[0]]
        problems = self.run.check(optimizer, self.schedulers)
        if problems:
            raise ConfigurationError(problems)
        #: the frozen-prefix cache of each phase that asks for one (schedule key or ``prefix_cache``)
        self.caches = PrefixCachePhases(self.run.schedule, model, spill_dir=spill_dir, dataset=train_dataset,
                                        overrides=prefix_cache, info=self.run.env.info)
        self.run.start(epoch=0, step=0)
        self.run.audit_phase(optimizer, self.schedulers, stage="start", model=model)
        self.caches.enter(self.run.depth)

    # ------------------------------------------------------------------ read-only state
    @property
    def lr_scheduler(self) -> Any:
        """The (first) lr scheduler; a phase with ``new_lr_scheduler`` replaces it."""
        return self.schedulers[0] if self.schedulers else None

    def lrs(self) -> dict[str, float]:
        """Each optimizer group's lr by a readable name, its phase and blocks (``phase1/layers.2-3``): log them as
        ``lr/<name>``."""
        return self.run.lrs(self.optimizer)

    # ------------------------------------------------------------------ the per-epoch call
    def step(self, epoch: int, metric: float | torch.Tensor | None = None, global_step: int | None = None) -> Transition | None:
        """Report the end of ``epoch`` (0-based) and, optionally, the monitored value measured after it.

        Returns the :class:`~phasetune.engine.Transition` when the next phase starts with epoch
        ``epoch + 1``, else None. Sets :attr:`done` when the final phase has ended. Under
        ``torch.distributed`` every rank must call it; rank 0's ``metric`` decides for all of them.
        ``global_step`` (optional) is recorded in the history.
        """
        if self.done:
            return None
        self._epoch = epoch + 1
        global_step = self.global_step if global_step is None else global_step
        phase = self.run.engine.phase
        value = self.run.observe(metric, epoch=epoch, step=global_step, optimizer=self.optimizer,
                                 schedulers=self.schedulers)
        if value is None and phase.max_transition_epoch < 0 and phase.max_transition_step < 0 and not self.run.is_final:
            raise ConfigurationError(
                f"phase {phase.index} has no max_transition_epoch or max_transition_step, so it ends when the metric "
                "stops improving; pass metric=... to step() (e.g. the validation loss), or set one of them in the phase"
            )
        if value is not None and self.check_finite and not math.isfinite(value):
            self._finish(epoch, global_step, NON_FINITE)
            return None
        if value is not None:
            self.tracker.update(value)
        decision = self.run.decide(epoch + 1, self.tracker.done)
        if decision is None:
            return None
        if decision.stop:
            self._finish(epoch, global_step, decision.reason)
            return None
        return self._transition(epoch + 1, global_step, decision.reason)

    # ------------------------------------------------------------------ the per-step calls
    def before_batch(self, batch: Any) -> Any:
        """Call it with each training batch before the forward when a phase caches its frozen prefix
        (``prefix_cache``): tells the cache which samples come and returns the batch without its sample indices (a
        dict batch loses ``"sample_index"`` in place; ``(item, indices)`` comes back as ``item``). Without any
        cached phase it returns the batch untouched."""
        return self.caches.before_batch(batch)

    def step_end(self, global_step: int | None = None) -> Transition | None:
        """Report an optimizer step (call it after ``optimizer.step()`` and the lr scheduler's ``step()``).

        ``global_step``: the optimizer steps of the fit so far (default: one more than the last call's). Returns
        the :class:`~phasetune.engine.Transition` when the phase's ``max_transition_step`` is reached (the next
        step trains the next phase: use ``ft.optimizer`` / ``ft.lr_scheduler`` again), else None. Under
        ``torch.distributed`` every rank must call it alike.
        """
        step = self.global_step = (self.global_step or 0) + 1 if global_step is None else global_step
        decision = self.run.step_end(step)
        if decision is None or self.done:
            return None
        return self._transition(self._epoch, step, decision.reason)

    def _transition(self, epoch: int, step: int | None, reason: str) -> Transition:
        self.caches.leave(self.run.history)  # before the next phase thaws any of the prefix
        t = self.run.transition(epoch=epoch, step=step, reason=reason, optimizer=self.optimizer,
                                schedulers=self.schedulers)
        self.optimizer = t.optimizer
        if t.new_scheduler is not None:
            self.schedulers = [t.new_scheduler]
        self.tracker.start_phase()
        self.run.audit_phase(self.optimizer, self.schedulers, thawed=t.thawed, stage="transition", model=self.model)
        self.caches.enter(self.run.depth)
        return t

    def close(self) -> None:
        """End a run that stopped before its schedule ended (``done`` not set): drop the prefix cache, its hooks and
        spill files, and give back what the run holds (the audit's hooks). Ending with ``done`` does this itself."""
        self.caches.leave(self.run.history)
        self.caches.close()
        self.run.release()

    def _finish(self, epoch: int, global_step: int | None, reason: str) -> None:
        self.done = True
        self.caches.leave(self.run.history)
        self.caches.close()
        self.run.finish(epoch=epoch + 1, step=global_step, reason=reason)
        self.run.env.info(f"final phase {self.depth} ended after epoch {epoch} ({reason})" if self.run.is_final
                          else f"training ended after epoch {epoch} ({reason})")

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the schedule exactly (this rank's part of the snapshot and its random
        state included: call it where the run continues, e.g. after the epoch's validation)."""
        # this rank's random state (each rank saves its own), with the loader's generators
        state = self.run.state_dict(random_state=True, generators=rng.loader_generators(self.train_loader))
        state.update(tracker=self.tracker.state_dict(), done=self.done, global_step=self.global_step, epoch=self._epoch)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a saved run: replay its transitions (thaw, groups, optimizer, scheduler) and bookkeeping.

        Call it on a freshly built object, before loading optimizer and lr scheduler state (the saved
        phase's groups must exist for that); ``FSDP2Strategy.load_ckpt`` does this in the right order.
        """
        if self.run.depth != 0 or len(self.run.history) != 1 or self.run.history[0].end_epoch is not None:
            raise ConfigurationError("load_state_dict needs a ScheduledFinetuning that has not transitioned yet; "
                                     "build a new one (with a new optimizer) to resume")
        self.optimizer, self.schedulers, _ = self.run.resume(state, self.optimizer, self.schedulers,
                                                             generators=rng.loader_generators(self.train_loader))
        self.tracker.load_state_dict(state["tracker"])
        self.done = bool(state["done"])
        self.global_step, self._epoch = state.get("global_step"), int(state.get("epoch", self.run.history[-1].start_epoch))
        self.caches.enter(self.run.depth)  # the restored phase's cache, empty (none once done)
        if self.done:
            self.caches.close()
        decision = self.run.begin_steps(self.global_step or 0)
        if decision is not None and not self.done:  # saved right at a step cap, before the transition
            self._transition(self._epoch, self.global_step, decision.reason)  # audits the next phase
        else:
            self.run.audit_phase(self.optimizer, self.schedulers, stage="resume", model=self.model)


# ---------------------------------------------------------------------------------------------- helpers


def loop_facts(optimizer: Optimizer, total_steps: int | None, max_epochs: int | None, train_loader: Any) -> RunFacts:
    """What an implicit schedule of the plain loop is generated from: the budget (``total_steps``, or ``max_epochs``
    x the loader's length) and the optimizer's lr and group count."""
    first = optimizer.param_groups[0]
    lr, groups = float(first.get("initial_lr", first["lr"])), len(optimizer.param_groups)
    if total_steps is not None:
        return RunFacts(total_steps, "ScheduledFinetuning(total_steps=...)", optimizer_lr=lr, optimizer_groups=groups)
    batches = None
    if max_epochs is not None and train_loader is not None:
        try:
            batches = len(train_loader)
        except TypeError:  # an iterable without a length
            batches = None
    if max_epochs is not None and batches:
        return RunFacts(max_epochs * batches, f"ScheduledFinetuning(max_epochs={max_epochs}) x len(train_loader)="
                        f"{batches}", optimizer_lr=lr, optimizer_groups=groups)
    why = ("max_epochs is given but train_loader has no length" if max_epochs is not None
           else "ScheduledFinetuning got neither total_steps nor max_epochs")
    return RunFacts(no_budget=f"{why}: pass total_steps=N (the run's optimizer steps), or max_epochs with a "
                    "train_loader that has a length", optimizer_lr=lr, optimizer_groups=groups)


def _budget_problems(schedule: Any, total_steps: Any, max_epochs: Any) -> list[str]:
    found = []
    for name, value in (("total_steps", total_steps), ("max_epochs", max_epochs)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            found.append(f"{name} must be an integer >= 1, got {value!r}")
        elif schedule is not None:
            found.append(f"{name} sets the budget of an implicit schedule (schedule=None); with a schedule, write "
                         "the phases' max_transition_step / max_transition_epoch in it")
    return found


def _homogeneous(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Split phase groups so each holds one dtype and one device mesh (foreach/fused kernels need that)."""
    return split_groups(groups)[0]
