"""Scheduled fine-tuning in your own training loop (no Lightning).

:class:`ScheduledFinetuning` is a :class:`~phasetune.run.Host` of :class:`~phasetune.run.PhaseRun`, which drives the
run as under Lightning and the Hugging Face Trainer::

    ft = ScheduledFinetuning("schedule.yaml", model, optimizer, lr_scheduler)
    for epoch in range(max_epochs):
        train_one_epoch(model, ft.optimizer)     # with ft.step_end() after each optimizer step for step caps
        ft.step(epoch, metric=validate(model))   # may thaw the next phase: always use ft.optimizer, ft.lr_scheduler
        if ft.done:
            break

:meth:`~ScheduledFinetuning.state_dict` goes into checkpoints (``FSDP2Strategy.save_ckpt`` takes the object itself
and restores it before the optimizer state, which needs the saved phase's groups to exist).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer

from phasetune.core.engine import Transition
from phasetune.errors import ConfigurationError
from phasetune.features import random_state as rng
from phasetune.loop.run_facts import budget_problems, check_loop_memory, loop_facts
from phasetune.run import Patience, PhaseRecord, PhaseRun, RunEnv, RunOptions, RunView, prefix_cache_problems
from phasetune.run.files import write_implicit_schedule
from phasetune.run.lora_glue import inject_adapters
from phasetune.sharding.groups import split_groups
from phasetune.sharding.names import logical_name, logical_view
from phasetune.sharding.plan import refresh_unit_dtypes

#: the loop's history records are the run's (kept under their 0.1 name)
PhaseSummary = PhaseRecord
METRIC_HINT = "pass metric=... to step() (e.g. the validation loss), or set one of them in the phase"


class ScheduledFinetuning(RunView):
    """Run a fine-tuning schedule over ``model`` and ``optimizer`` in a plain PyTorch loop.

    Args:
        schedule: YAML path or dict, validated like the Lightning callback's ``ft_schedule``; ``None`` generates
            one from the model (``options.schedule_style``) over the run's step budget (``total_steps``, or
            ``max_epochs`` x ``len(train_loader)``) with the default settings (the optimizer's lr is
            ``optimizer``'s); without a budget a warning says that phases end by early stopping.
            ``ft.run.implicit`` holds its notes for the file you write with ``ft.schedule.dump(path, header=...)``.
        model: the model (plain, or prepared by ``FSDP2Strategy.prepare_model(model, schedule=...)``); the LoRA
            adapters a ``peft`` section asks for are injected into a plain one here (docs/peft.md).
        optimizer, lr_scheduler: an optimizer over every parameter you may train (its groups are the template later
            phases copy hyperparameters from), fitted to phase 0 here; its lr scheduler(s), extended as groups are added.
        options: the knobs every front end shares (:class:`phasetune.RunOptions`); each may also be given as a
            keyword of its own name (``restore_best=False``), overriding ``options``.
        mode, patience, min_delta, check_finite: phase-aware early stopping on the ``metric`` passed to
            :meth:`step` (:class:`phasetune.run.Patience`).
        no_decay: parameter-name substrings whose parameters get ``weight_decay=0`` groups in every phase.
        snapshot_dir: where ``snapshot_storage="disk"`` writes its files (default: the working directory).
        prefix_cache, train_dataset: phase index -> ``True`` / ``False`` / ``{prefix_end, limit_mb, ...}`` sets or
            overrides the phases' ``prefix_cache`` key (docs/prefix_cache.md; call :meth:`before_batch` before each
            training forward); the ``IndexedDataset`` training set, checked for random transforms.
        train_loader: the training data loader (or a list / dict of them): the generators its samplers keep of
            their own are saved by :meth:`state_dict` and restored by :meth:`load_state_dict`. Build it first.
        spill_dir: where cache entries beyond a phase's ``limit_mb`` go (default: the system temp dir).
        total_steps, max_epochs: the run's optimizer steps, or epochs (x ``len(train_loader)``): the budget of an
            implicit schedule (only with ``schedule=None``).

    The thaw audit (``audit="raise"``) raises :class:`~phasetune.AuditError` naming what did not take effect.
    """

    def __init__(
        self,
        schedule: str | os.PathLike[str] | Mapping[Any, Any] | None,
        model: nn.Module,
        optimizer: Optimizer,
        lr_scheduler: Any = None,
        *,
        options: RunOptions | None = None,
        mode: Literal["min", "max"] = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        check_finite: bool = True,
        no_decay: Sequence[str] | None = None,
        snapshot_dir: str | os.PathLike[str] | None = None,
        prefix_cache: Mapping[int, Any] | None = None,
        train_dataset: Any = None,
        spill_dir: str | os.PathLike[str] | None = None,
        train_loader: Any = None,
        total_steps: int | None = None,
        max_epochs: int | None = None,
        **knobs: Any,
    ) -> None:
        options = RunOptions.merged(options, knobs, type(self).__init__)
        problems = options.problems(explicit_schedule=schedule is not None) + Patience.problems(patience, mode)
        if not isinstance(optimizer, Optimizer):
            problems.append(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        problems += prefix_cache_problems(prefix_cache) + budget_problems(schedule, total_steps, max_epochs)
        if problems:
            raise ConfigurationError(problems)
        self.schedulers: list[Any] = [] if lr_scheduler is None else list(lr_scheduler) if isinstance(
            lr_scheduler, (list, tuple)) else [lr_scheduler]
        self.model, self.optimizer, self.train_loader, self.global_step, self._epoch = model, optimizer, train_loader, None, 0
        inject_adapters(model, schedule)  # the LoRA adapters a peft section asks for, before parameters are read
        params = {logical_name(n): p for n, p in model.named_parameters()}  # without wrappers' segments
        env = RunEnv(named_buffers=lambda: dict(model.named_buffers()), snapshot_dir=None if snapshot_dir is None
                     else str(snapshot_dir), device=next((p.device for p in params.values()), None),
                     rank_local_snapshots=True, state_saved_per_rank=True)  # each rank saves its own state
        self.run = PhaseRun(
            schedule, params, {n: tuple(p.shape) for n, p in params.items()}, options=options, env=env,
            model=model, structure=logical_view(model),  # a stand-in of the unwrapped tree: logical names
            no_decay=no_decay, group_splitter=lambda groups: split_groups(groups)[0], mode=mode,  # one dtype, one mesh
            facts=None if schedule is not None else loop_facts(optimizer, total_steps, max_epochs, train_loader),
        )
        self.run.patience = Patience(patience, min_delta, check_finite, mode)
        write_implicit_schedule(self.run, None, env.info)  # says the generated schedule's budget (you write its file)
        cache_problems = self.run.use_prefix_cache(model, prefix_cache, spill_dir=spill_dir, dataset=train_dataset)
        self.run.prepare(self, expected=True, checks=[lambda: cache_problems])
        check_loop_memory(self.run, model, optimizer, train_loader)  # options.memory_check: raises before phase 0
        self.run.begin(self, epoch=0, step=0, reserve=False)
        self.run.begin_training(self, epoch=0, step=0)

    # ------------------------------------------------------------------ the Host
    def optimizer_and_schedulers(self) -> tuple[Optimizer, list[Any]]:
        return self.optimizer, self.schedulers

    def install(self, *, optimizer: Optimizer | None, scheduler: Any, scheduler_cfg: Any, thawed: bool) -> None:
        if optimizer is not None:
            self.optimizer = optimizer
        if scheduler is not None:
            self.schedulers = [scheduler]
        if thawed:  # FSDP2 units frozen at their first forward learn the thawed parameters' gradient dtypes
            refresh_unit_dtypes(self.model)

    def trained_model(self) -> nn.Module:
        return self.model

    # ------------------------------------------------------------------ read-only state
    @property
    def lr_scheduler(self) -> Any:
        """The (first) lr scheduler; a phase with ``new_lr_scheduler`` replaces it."""
        return self.schedulers[0] if self.schedulers else None

    @property
    def done(self) -> bool:
        """The run has ended (the final phase's patience, or a non-finite metric)."""
        return self.run.patience.stopped  # type: ignore[union-attr]

    def lrs(self) -> dict[str, float]:
        """Each optimizer group's lr by a readable name (``phase1/layers.2-3``): log them as ``lr/<name>``."""
        return self.run.lrs(self.optimizer)

    # ------------------------------------------------------------------ the per-epoch and per-step calls
    def step(self, epoch: int, metric: float | torch.Tensor | None = None, global_step: int | None = None) -> Transition | None:
        """Report the end of ``epoch`` (0-based) and the monitored value after it (rank 0's decides; every rank calls
        it); returns the :class:`~phasetune.core.engine.Transition` when the next phase starts with epoch ``epoch + 1``,
        else None; sets :attr:`done` when the run has ended. ``global_step`` goes into the history."""
        if self.done:
            return None
        self._epoch = epoch + 1
        decision = self.run.end_evaluation(self, metric, epoch=epoch, step=self.global_step if global_step is None
                                           else global_step, next_epoch=epoch + 1, how_to_report=METRIC_HINT)
        return None if decision is None else decision.applied

    def before_batch(self, batch: Any) -> Any:
        """Call it with each training batch before the forward when a phase caches its frozen prefix: tells the
        cache which samples come and returns the batch without its sample indices. Otherwise a no-op."""
        return batch if self.run.caches is None else self.run.caches.before_batch(batch)

    def step_end(self, global_step: int | None = None) -> Transition | None:
        """Report an optimizer step (after the optimizer's and the lr scheduler's ``step()``; ``global_step``: the
        fit's steps so far, default one more); returns the Transition at a ``max_transition_step``, else None."""
        step = self.global_step = (self.global_step or 0) + 1 if global_step is None else global_step
        decision = self.run.step_end(step)
        if decision is None or self.done:
            return None
        return self.run.advance(self, epoch=self._epoch, step=step, reason=decision.reason)

    def close(self) -> None:
        """End a run that stopped before ``done``: drop the prefix cache (hooks, spill files) and the audit's hooks."""
        self.run.close()

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (this rank's snapshot and random state, the loader's generators)."""
        state = self.run.state_dict(random_state=True, generators=rng.loader_generators(self.train_loader))
        state.update(global_step=self.global_step, epoch=self._epoch)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a saved run: replay its transitions (thaw, groups, optimizer, scheduler) and bookkeeping. Call it
        on a freshly built object before loading optimizer and lr scheduler state (``FSDP2Strategy.load_ckpt``)."""
        if self.run.depth != 0 or len(self.run.history) != 1 or self.run.history[0].end_epoch is not None:
            raise ConfigurationError(f"load_state_dict needs a fresh {type(self).__name__} (one that has not transitioned yet); "
                                     "build a new one (with a new optimizer) to resume")
        self.run.restore(self, state, audit=True, generators=rng.loader_generators(self.train_loader))
        self.global_step, self._epoch = state.get("global_step"), int(state.get("epoch", self.run.history[-1].start_epoch))
        self.run.begin_training(self, epoch=self._epoch, step=self.global_step or 0)
