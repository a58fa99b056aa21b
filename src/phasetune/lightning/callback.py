"""FinetuningScheduler: the Lightning callback that runs a fine-tuning schedule.

A thin mapping of Trainer hooks onto :class:`phasetune.run.PhaseRun`, which owns the run (schedule,
engine, history, snapshots, checkpoint state, the end-of-epoch decision). What is Lightning's alone lives
here: finding the companion callbacks, installing optimizers and schedulers in the strategy (through the
strategy adapter), and the hook order.

Hook order in a fit: ``setup`` (reset per-fit state, pick the strategy adapter, configure FTSEarlyStopping
and FTSCheckpoint, resolve the schedule and freeze all but phase 0) -> ``load_state_dict`` when resuming
-> ``on_fit_start`` (an implicit schedule is generated here, from the run's step budget and the optimizer's
lr, both known only now; fit the optimizer to phase 0, replay a resumed run's transitions before Lightning
loads optimizer state) -> per epoch: ``on_train_epoch_start`` (transition if the phase ended) ...
``on_train_batch_end`` (after each optimizer step: transition when the phase's ``max_transition_step`` is
reached; one compare otherwise) ... ``on_validation_end`` (record the monitored value; snapshot the phase's
best state) ... ``on_train_epoch_end`` (end the run after the final phase).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from phasetune import generate, rng, thaw, transitions
from phasetune.errors import ConfigurationError, ScheduleError, ScheduleGenerated
from phasetune.lightning import _compat, fts_compat, messages, resume_checks
from phasetune.lightning.adapters import StrategyAdapter, select_adapter
from phasetune.lightning.companions import configure_companions
from phasetune.lightning.early_stopping import FTSEarlyStopping
from phasetune.lightning.fts_checkpoint import FTSCheckpoint
from phasetune.lightning.run_facts import trainer_facts
from phasetune.lightning.sharded import ShardedStrategyAdapter
from phasetune.prefix_cache import PrefixCacheError
from phasetune.prefix_phases import PrefixCachePhases
from phasetune.run import STATE_FORMAT, PhaseRecord, PhaseRun, RunEnv, RunOptions
from phasetune.run_view import RunView
from phasetune.schedule import resolve_schedule

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger("phasetune")


def _option(name: str) -> property:
    """A callback attribute that reads and writes ``self.options.<name>``."""
    return property(lambda self: getattr(self.options, name), lambda self, value: setattr(self.options, name, value))


class FinetuningScheduler(RunView, Callback):
    """Run a multi-phase fine-tuning schedule (gradual unfreezing) in a Lightning ``Trainer``.

    Args:
        ft_schedule: schedule YAML path or dict; ``None`` generates one from the model (see
            ``schedule_style``) at the start of the fit, over the fit's step budget
            (``trainer.estimated_stepping_batches``: ``max_steps``, or ``max_epochs`` x batches per epoch after
            ``limit_train_batches`` and gradient accumulation) with the default settings
            (:func:`phasetune.recipes.default_settings`), and runs it; the file it writes to the log dir says
            the budget, the settings and where they came from.
        gen_ft_sched_only: write the generated schedule to the log dir and stop before training
            (raises :class:`~phasetune.errors.ScheduleGenerated`, a clean ``SystemExit``) at the start of the
            fit, where the budget and the optimizer's lr are known.
        max_depth, base_max_lr, restore_best, epoch_transitions_only, schedule_style, schedule_options, reinit_optim_cfg,
        reinit_lr_cfg, enforce_phase0_params, apply_lambdas_new_pgs, frozen_bn_track_running_stats,
        snapshot_storage, resume_rng, audit, audit_zero_lr: the knobs every front end shares, with one meaning and
            default each: see :class:`phasetune.RunOptions` (``self.options``). ``audit="raise"`` (the default)
            checks each phase at its start and after its first optimizer step and raises
            :class:`~phasetune.AuditError` naming what did not take effect (see docs/audit.md).
        strategy_adapter_cfg: options for the strategy adapter (FSDP/FSDP2 adapters take some).
        log_dir: where generated schedules, the resolved schedule and snapshot files go; ``None`` uses
            ``trainer.log_dir`` (or ``default_root_dir``).
        logging_level: level of the ``phasetune`` logger (``logging.DEBUG``, ``"INFO"``, ...); ``None`` leaves it.
        allow_untested: run a strategy phasetune has no adapter for with the default adapter and a warning
            instead of refusing it.
        custom_strategy_adapters: strategy name (``"ddp"``, ``"fsdp"``, ``"ModelParallelStrategy"``, ...) ->
            a :class:`~phasetune.lightning.StrategyAdapter` subclass or its import path; looked up before the
            built-in adapters.
        prefix_cache: phase index -> ``true`` / ``false`` / ``{prefix_end, limit_mb, deterministic_inputs}``: sets
            or overrides the phases' ``prefix_cache`` schedule key (cache the frozen prefix's outputs within the
            phase; the training set must be an ``IndexedDataset``; see docs/prefix_cache.md). Refused under the
            FSDP1 and FSDP2 strategies and with a compiled model.
    """

    def __init__(
        self,
        ft_schedule: str | os.PathLike[str] | Mapping[Any, Any] | None = None,
        max_depth: int = -1,
        base_max_lr: float | None = 1e-5,
        restore_best: bool = True,
        gen_ft_sched_only: bool = False,
        epoch_transitions_only: bool = False,
        *,
        schedule_style: str = generate.DEFAULT_STYLE,
        schedule_options: Mapping[str, Any] | None = None,
        reinit_optim_cfg: Mapping[str, Any] | None = None,
        reinit_lr_cfg: Mapping[str, Any] | None = None,
        enforce_phase0_params: bool = True,
        apply_lambdas_new_pgs: bool = False,
        frozen_bn_track_running_stats: bool = True,
        snapshot_storage: str = "memory",
        resume_rng: str = "exact",
        audit: str = "raise",
        audit_zero_lr: str = "fail",
        strategy_adapter_cfg: Mapping[str, Any] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        logging_level: int | str | None = None,
        allow_untested: bool = False,
        custom_strategy_adapters: Mapping[str, str | type[StrategyAdapter]] | None = None,
        prefix_cache: Mapping[int, Any] | None = None,
    ) -> None:
        self.options = RunOptions(
            max_depth=max_depth, base_max_lr=base_max_lr, restore_best=restore_best,
            epoch_transitions_only=epoch_transitions_only, schedule_style=schedule_style,
            schedule_options=schedule_options,
            reinit_optim_cfg=reinit_optim_cfg, reinit_lr_cfg=reinit_lr_cfg,
            enforce_phase0_params=enforce_phase0_params, apply_lambdas_new_pgs=apply_lambdas_new_pgs,
            frozen_bn_track_running_stats=frozen_bn_track_running_stats, snapshot_storage=snapshot_storage,
            resume_rng=resume_rng, audit=audit, audit_zero_lr=audit_zero_lr,
        )
        problems = self.options.problems(explicit_schedule=ft_schedule is not None)
        fts_args = fts_compat.FTSArgs.parse(log_dir, logging_level, allow_untested, custom_strategy_adapters)
        problems += fts_args.problems
        if prefix_cache is not None and not isinstance(prefix_cache, Mapping):
            problems.append(f"prefix_cache must map phase indices to true, false or {{prefix_end: ...}} (e.g. "
                            f"{{0: true}}), got {type(prefix_cache).__name__}")
        if problems:
            raise ConfigurationError(problems)
        fts_args.apply_logging_level()
        self._log_dir_arg, self._custom_adapters = fts_args.log_dir, fts_args.adapters
        self.ft_schedule = ft_schedule
        self.gen_ft_sched_only = gen_ft_sched_only
        self.strategy_adapter_cfg = dict(strategy_adapter_cfg or {})
        self.logging_level = logging_level
        self.allow_untested = allow_untested
        self.custom_strategy_adapters = dict(custom_strategy_adapters or {})
        self.prefix_cache = dict(prefix_cache) if prefix_cache else None
        self._reset()

    def _reset(self) -> None:
        """Forget everything of a previous fit (a callback may serve several fits)."""
        self.run: PhaseRun | None = None
        self.adapter: StrategyAdapter | None = None
        self.early_stopping: FTSEarlyStopping | None = None
        self.checkpoint: FTSCheckpoint | None = None
        self.monitor: str | None = None
        self.monitor_mode = "min"
        self._restored_state: dict[str, Any] | None = None
        self._resumed_early = False
        self._resumed_mid_epoch = False
        self._log_dir: str | None = None
        self._validated_this_epoch = False
        self._fit_started = False
        self._steps: Any = None  # the optimizer-step counter on_train_batch_end reads (set in on_train_start)
        self._caches: PrefixCachePhases | None = None  # the frozen-prefix cache controller, when a phase caches
        # the per-batch hook exists only while a phase caches (an instance attribute): other fits do no work per step
        self.__dict__.pop("on_train_batch_start", None)

    # the shared knobs live in self.options (one RunOptions, as in the plain loop), under their FTS names
    max_depth = _option("max_depth")
    base_max_lr = _option("base_max_lr")
    restore_best = _option("restore_best")
    epoch_transitions_only = _option("epoch_transitions_only")
    schedule_style = _option("schedule_style")
    schedule_options = _option("schedule_options")
    reinit_optim_cfg = _option("reinit_optim_cfg")
    reinit_lr_cfg = _option("reinit_lr_cfg")
    enforce_phase0_params = _option("enforce_phase0_params")
    apply_lambdas_new_pgs = _option("apply_lambdas_new_pgs")
    frozen_bn_track_running_stats = _option("frozen_bn_track_running_stats")
    snapshot_storage = _option("snapshot_storage")
    resume_rng = _option("resume_rng")
    audit = _option("audit")
    audit_zero_lr = _option("audit_zero_lr")

    # ------------------------------------------------------------------ public read-only state
    @property
    def curr_depth(self) -> int | None:
        """Index of the phase being trained (``depth``, by the name ``FinetuningScheduler`` users know)."""
        return self.depth

    @property
    def depth_remaining(self) -> int | None:
        """Phases left after the current one (within ``max_depth``)."""
        return self.run.engine.depth_remaining if self.run else None

    @property
    def is_final_phase(self) -> bool:
        return self.run is not None and self.run.is_final

    @property
    def log_dir(self) -> str | None:
        """Where generated schedules and snapshot files of this fit go (``log_dir=...``, else the trainer's)."""
        return self._log_dir if self._log_dir is not None else self._log_dir_arg

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset()
        self.adapter = select_adapter(trainer.strategy, self.strategy_adapter_cfg, custom=self._custom_adapters,
                                      allow_untested=self.allow_untested)
        self.adapter.connect(trainer)
        # a resume: the random state (and a mid-epoch one's sampler epoch) set as the interrupted run had them
        # when it created its data iterator, before Lightning creates (and fast-forwards) the resumed run's
        self._train_loaders: list[Any] = []
        self._redraw_undos: list[_compat.Undo] = []
        self.adapter.keep_undo(_compat.before_train_iterator(trainer, self._before_data_iterator))
        if self._log_dir_arg is not None:  # log_dir=...: the same on every rank, so no collective is skipped
            self._log_dir = self._log_dir_arg
        else:
            log_dir = trainer.log_dir  # a collective under DDP: every rank must read it
            self._log_dir = str(log_dir if log_dir is not None else trainer.default_root_dir)
        if self.gen_ft_sched_only:
            return  # on_fit_start writes the generated schedule (the budget and the optimizer are known there) and stops
        found = configure_companions(trainer, pl_module, stage, self, restore_best=self.options.restore_best,
                                     epoch_transitions_only=self.options.epoch_transitions_only)
        self.early_stopping, self.checkpoint = found.early_stopping, found.checkpoint
        self.monitor, self.monitor_mode = found.monitor, found.mode
        if self.adapter.defer_init(pl_module):
            return
        if self.ft_schedule is None:  # generated at on_fit_start; configure_optimizers sees phase 0 trainable already
            self._freeze_to_implicit_phase0(pl_module)
        else:
            self._init_run(trainer, pl_module)

    def _freeze_to_implicit_phase0(self, pl_module: pl.LightningModule) -> None:
        """Freeze all but phase 0 of the implicit schedule (its parameters do not depend on the budget)."""
        assert self.adapter is not None
        raw = generate.generate_implicit(self.adapter.structure_module(pl_module), self.options,
                                         parameters_only=True).raw
        params = dict(self.adapter.named_parameters(pl_module))
        schedule = resolve_schedule(raw, self.adapter.param_shapes(pl_module), epoch_transitions_only=False)
        thaw.freeze(params)
        thaw.thaw(params, schedule[0].params)

    def _schedule_file(self, pl_module: pl.LightningModule, suffix: str) -> Path:
        return Path(self._log_dir or ".") / f"{type(pl_module).__name__}_{suffix}.yaml"

    def _write_generated(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        assert self.adapter is not None
        generated = generate.generate_implicit(self.adapter.structure_module(pl_module), self.options,
                                               trainer_facts(trainer, generate.needs_run_budget(self.options)))
        schedule = resolve_schedule(generated.raw, list(self.adapter.named_parameters(pl_module)),
                                    epoch_transitions_only=False)
        path = self._schedule_file(pl_module, "ft_schedule")
        if trainer.is_global_zero:
            header = [f"phasetune schedule generated for {type(pl_module).__name__} (style "
                      f"{self.options.schedule_style!r}); edit it and pass it as ft_schedule", *generated.notes[1:]]
            schedule.dump(path, resolved=False, header="\n".join(header))
            log.info("phasetune: wrote generated schedule (%d phases) to %s", len(schedule), path)
        return str(path)

    def _init_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        adapter = self.adapter
        assert adapter is not None
        no_decay = getattr(pl_module, "no_decay", None)
        if no_decay is not None and (isinstance(no_decay, str) or not all(isinstance(s, str) for s in no_decay)):
            raise ConfigurationError(
                f"{type(pl_module).__name__}.no_decay must be a list of parameter-name substrings, got {no_decay!r}"
            )

        env = RunEnv(
            broadcast=lambda value: trainer.strategy.broadcast(value, src=0),
            warn=messages.warn,
            info=messages.info,
            named_buffers=lambda: adapter.named_buffers(pl_module),
            copy_into=adapter.snapshot_copy,
            rank_local_snapshots=adapter.rank_local_snapshots,
            snapshot_dir=self._log_dir,
            optimizer_source="the optimizer from configure_optimizers",
        )
        self.run = PhaseRun(
            self.ft_schedule, adapter.named_parameters(pl_module), adapter.param_shapes(pl_module),
            options=self.options, env=env, model=pl_module, structure=adapter.structure_module(pl_module),
            no_decay=no_decay, monitor=self.monitor, mode=self.monitor_mode,
            facts=trainer_facts(trainer, generate.needs_run_budget(self.options)) if self.ft_schedule is None else None,
        )
        self._reach_every_phase(trainer)
        if trainer.is_global_zero:
            schedule = self.run.schedule
            if self.run.implicit is not None:
                path = self._schedule_file(pl_module, "ft_schedule")
                schedule.dump(path, resolved=False, header="\n".join(self.run.implicit.notes))
                messages.info(f"implicit schedule ({len(schedule)} phases; {self.run.implicit.budget_line}): {path}")
            schedule.dump(self._schedule_file(pl_module, "ft_schedule_resolved"),
                          header=f"resolved from {schedule.source}: exact parameter names per phase")

    def _reach_every_phase(self, trainer: pl.Trainer) -> None:
        """Raise ``max_epochs`` / ``max_steps`` to the largest ``max_transition_epoch`` / ``max_transition_step`` of
        the phases to run (with a warning), so that every phase gets its length; the final phase then runs until
        early stopping or the Trainer's limits."""
        assert self.run is not None
        phases = self.run.schedule.phases[: self.run.final_depth + 1]
        max_epochs = trainer.max_epochs
        latest = max(p.max_transition_epoch for p in phases)
        if max_epochs is not None and 0 <= max_epochs < latest:
            messages.warn(f"max_epochs={max_epochs} would end training before the schedule's max_transition_epoch "
                           f"{latest}; raised max_epochs to {latest} so that every phase runs")
            trainer.fit_loop.max_epochs = latest
        latest_step = max(p.max_transition_step for p in phases)
        if 0 <= trainer.max_steps < latest_step:
            messages.warn(f"max_steps={trainer.max_steps} would end training before the schedule's "
                           f"max_transition_step {latest_step}; raised max_steps to {latest_step} so that every phase runs")
            trainer.fit_loop.epoch_loop.max_steps = latest_step

    # ------------------------------------------------------------------ resume and fit start
    def state_dict(self) -> dict[str, Any]:
        # every rank's random state is gathered here (Lightning calls this on every rank, writes rank 0's)
        if self.run is None:
            return {}
        assert self.adapter is not None and self.adapter.trainer is not None  # set in setup, before the run
        return self.run.state_dict(random_state=True, generators=self._data_generators(self.adapter.trainer))

    @staticmethod
    def _data_generators(trainer: pl.Trainer) -> list[torch.Generator]:
        """The generators the training loader's samplers keep of their own (none before the loader exists)."""
        return rng.loader_generators(trainer.train_dataloader)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # refuse what cannot resume before any state is loaded
            self._resumed_mid_epoch = resume_checks.check_resumable(checkpoint, self.state_key, trainer.ckpt_path)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._resumed_early:  # resume_early already applied this checkpoint's state
            self._resumed_early = False
            return
        trainer = self.adapter.trainer if self.adapter is not None else None
        if trainer is not None and trainer.state.fn != TrainerFn.FITTING:
            return  # validate/test with ckpt_path after a fit: they load weights; the phase state is fit's alone
        if self.run is not None:
            self.run.check_state(state_dict, trainer.ckpt_path if trainer is not None else None)
        self._restored_state = dict(state_dict)
        if self._fit_started and trainer is not None:
            # Strategies with restore_checkpoint_after_setup (FSDP, ModelParallel) restore callbacks after
            # on_fit_start. Rebuild the saved phase's thawed set and groups now, before Lightning loads the
            # optimizer state; plain Lightning would silently drop them.
            self._resume(trainer)

    def resume_early(self, state_dict: dict[str, Any], mid_epoch: bool = False) -> None:
        """Apply a checkpoint's state now, after ``on_fit_start``: strategy adapters call this when the strategy
        loads optimizer state before restoring callbacks (ModelParallel). Lightning's later
        ``load_state_dict`` with the same state is then skipped. ``mid_epoch``: the checkpoint was saved inside
        a training epoch (its random state then comes back after Lightning re-creates the data iterator)."""
        self._resumed_mid_epoch = mid_epoch
        self.load_state_dict(state_dict)
        self._resumed_early = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.adapter is not None
        if self.gen_ft_sched_only:
            raise ScheduleGenerated(self._write_generated(trainer, pl_module))
        # the phase as an integer in the progress bar (logged as a float, as Lightning logs every value)
        self.adapter.keep_undo(_compat.progress_bar_integer(trainer, "ft_phase"))
        deferred = self.run is None  # sharded strategies and implicit schedules: the run is built now
        if deferred:
            self._init_run(trainer, pl_module)
        run = self.run
        assert run is not None
        run.env.device = pl_module.device
        optimizer, schedulers = self._optimizer_and_schedulers(trainer)
        run.fit_optimizer(optimizer, schedulers, expected=deferred)
        first = run.first_scheduler(optimizer, schedulers)
        if first is not None:
            self.adapter.install_scheduler(trainer, *first)
            schedulers = [first[0]]
        # the adapter first: it may set how groups are split, which the engine's group count depends on
        problems = self.adapter.check(self, trainer)
        problems += run.check(optimizer, schedulers)
        problems += self._prepare_caches(trainer, pl_module)
        if problems:
            raise ConfigurationError(problems)
        resumed = self._restored_state is not None
        if resumed:
            self._resume(trainer)
        run.start(epoch=trainer.current_epoch, step=trainer.global_step)
        run.reserve_recompiles()  # a compiled model: every phase's graphs within dynamo's limit, until the fit ends
        self._fit_started = True
        self._audit(trainer, "resume" if resumed else "start")

    def _resume(self, trainer: pl.Trainer) -> None:
        assert self.run is not None and self.adapter is not None and self._restored_state is not None
        state, self._restored_state = self._restored_state, None
        optimizer, schedulers = self._optimizer_and_schedulers(trainer)
        # mid-epoch, Lightning creates the data iterator (drawing from the generators) after this, the
        # interrupted run before its save: the random state then comes back in on_train_start, after it
        new_opt, scheds, cfg = self.run.resume(state, optimizer, schedulers, where=trainer.ckpt_path,
                                               defer_random_state=True, mid_epoch=self._resumed_mid_epoch)
        if new_opt is not optimizer:
            self.adapter.install_optimizer(trainer, new_opt)
        if cfg is not None:
            self.adapter.install_scheduler(trainer, scheds[0], cfg)
        if self.run.depth > 0:
            self.adapter.after_thaw(trainer)
        if self._fit_started:  # restored after on_fit_start (FSDP, ModelParallel): audit the rebuilt phase now
            self._audit(trainer, "resume")

    def _before_data_iterator(self, dataloader: Any) -> None:
        if self.run is None or not self.run.random.awaiting_data_iterator:  # not a resume, or done with it
            return
        self._train_loaders.append(dataloader)
        generators = rng.loader_generators(self._train_loaders)
        random = self.run.random
        random.before_data_iterator(generators)
        if self._resumed_mid_epoch and generators:  # each redraw of a wrapped sampler's order starts where it did
            undo = _compat.before_each_sampler_redraw(
                dataloader, lambda: random.before_data_iterator(generators, generators_only=True))
            self._redraw_undos.append(undo)
            self.adapter.keep_undo(undo)

    def _optimizer_and_schedulers(self, trainer: pl.Trainer) -> tuple[torch.optim.Optimizer, list[Any]]:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ConfigurationError(
                f"FinetuningScheduler drives exactly one optimizer, but configure_optimizers returned "
                f"{len(optimizers)}; return one optimizer (with as many param groups as you like)"
            )
        return optimizers[0], [c.scheduler for c in trainer.lr_scheduler_configs]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.run is not None
        # a resume's random state (a mid-epoch one's as it was saved, after Lightning created the data iterator)
        self.run.random.after_data_iterator(self._data_generators(trainer))
        for undo in self._redraw_undos:
            undo()
        self._train_loaders, self._redraw_undos = [], []
        if self._caches is not None:  # the training set exists now: the phase's cache starts (or none)
            self._caches.enter(self.run.depth, dataset=getattr(trainer.train_dataloader, "dataset", None))
        es = self.early_stopping
        stopped = es is not None and es.wait_count >= es.patience  # restored from a run early stopping ended
        decision = self.run.decide(trainer.current_epoch, stopped)
        if self.run.is_final and decision is not None:
            trainer.should_stop = True
            log.info("phasetune: the schedule was already complete in the checkpoint; nothing left to train")
        at_cap = self.run.begin_steps(trainer.global_step)  # a checkpoint saved at a step cap, before its transition
        if at_cap is not None:
            self._transition(trainer, at_cap.reason)
        # the optimizer-step counter on_train_batch_end reads (Lightning's progress counter: see _compat)
        self._steps = _compat.optimizer_steps(trainer, pl_module)

    # ------------------------------------------------------------------ per optimizer step
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # optimizer steps, as trainer.global_step counts them (it repeats under gradient accumulation, and step_end
        # ignores repeats), read from the progress counter itself: the property costs ~10x the rest of this hook
        decision = self.run.step_end(self._steps.completed)  # type: ignore[union-attr]
        if decision is not None:
            self._transition(trainer, decision.reason)

    # ------------------------------------------------------------------ per epoch
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.run is not None
        # the random state the epoch's data iterator will draw its order from (saved with mid-epoch checkpoints)
        self.run.random.note_epoch_start(self._data_generators(trainer))
        self._validated_this_epoch = False
        es_done = bool(self.early_stopping and self.early_stopping.phase_done)
        decision = self.run.decide(trainer.current_epoch, es_done)
        if decision is not None and decision.transition:
            self._transition(trainer, decision.reason)
        # the phase in the progress bar and the loggers (shown from the end of the phase's first epoch)
        # every rank logs the same values; synced (one small all-reduce each an epoch) under several processes,
        # where Lightning otherwise warns that epoch-level values are not
        sync = trainer.world_size > 1
        pl_module.log("ft_phase", float(self.run.depth), on_step=False, on_epoch=True, prog_bar=True,
                      logger=bool(trainer.loggers), sync_dist=sync)
        # each group's lr as the epoch starts, by phase and block (lr/phase1/layers.2-3): once an epoch, like
        # LearningRateMonitor(logging_interval="epoch"), so ordinary steps do no work
        for name, lr in self.run.lrs(trainer.optimizers[0]).items():
            pl_module.log(f"lr/{name}", lr, on_step=False, on_epoch=True, logger=bool(trainer.loggers),
                          sync_dist=sync)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.run is None or not trainer.training:
            return
        self._validated_this_epoch = True
        self._observe(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.run is not None
        if not self._validated_this_epoch and self.monitor in trainer.callback_metrics:
            self._observe(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run is None or not self.run.history:
            return
        self._leave_cache()
        es = self.early_stopping
        stopped = es is not None and es.stopped_epoch
        reason = transitions.EARLY_STOPPING if stopped else "trainer stopped (max_epochs, max_steps or should_stop)"
        self.run.finish(epoch=trainer.current_epoch, step=trainer.global_step, reason=reason)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._caches is not None:  # after an exception too: hooks and spill files go
            self._caches.close()
            self._caches = None
            self.__dict__.pop("on_train_batch_start", None)
        if stage == "fit" and self.run is not None:
            self.run.release()  # after an exception too (on_train_end did not run)
        if stage == "fit" and self.adapter is not None:
            self.adapter.release()

    # ------------------------------------------------------------------ helpers
    def _observe(self, trainer: pl.Trainer) -> None:
        assert self.run is not None
        value = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.run.observe(value, epoch=trainer.current_epoch, step=trainer.global_step, optimizer=optimizer,
                         schedulers=[c.scheduler for c in trainer.lr_scheduler_configs])

    def _transition(self, trainer: pl.Trainer, reason: str) -> None:
        assert self.run is not None and self.adapter is not None
        optimizer, schedulers = self._optimizer_and_schedulers(trainer)
        self._leave_cache()  # before the next phase thaws any of the prefix
        t = self.run.transition(epoch=trainer.current_epoch, step=trainer.global_step, reason=reason,
                                optimizer=optimizer, schedulers=schedulers)
        if t.new_optimizer:
            self.adapter.install_optimizer(trainer, t.optimizer)
        if t.new_scheduler is not None:
            self.adapter.install_scheduler(trainer, t.new_scheduler, t.scheduler_cfg)
        self.adapter.after_thaw(trainer)  # DDP is rebuilt here: the audit comes after it
        if self._caches is not None:
            self._caches.enter(self.run.depth)
        self._audit(trainer, "transition", thawed=t.thawed)
        if self.early_stopping is not None:
            self.early_stopping.reset_for_phase()

    def _prepare_caches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        """Check the phases' prefix_cache settings against the model and strategy; keep the controller when a phase
        caches (the per-batch hook is installed then only). Problems are returned for the fit-start error."""
        assert self.run is not None
        if self.prefix_cache is None and all(p.prefix_cache is None for p in self.run.schedule):
            return []
        sharded = None
        if isinstance(self.adapter, ShardedStrategyAdapter):
            kind = "FSDP2" if type(trainer.strategy).__name__ == "ModelParallelStrategy" else "FSDP1"
            sharded = f"{kind}, {type(trainer.strategy).__name__}"
        try:
            caches = PrefixCachePhases(self.run.schedule, pl_module, spill_dir=self.log_dir, overrides=self.prefix_cache,
                                       sharded=sharded, info=self.run.env.info)
        except PrefixCacheError as e:
            return e.problems
        if caches.enabled:
            self._caches = caches
            self.on_train_batch_start = self._before_batch  # type: ignore[method-assign]
        return []

    def _before_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """``on_train_batch_start`` while a phase caches: the cache learns the batch's samples; a dict batch
        loses its ``sample_index`` before ``training_step`` sees it."""
        self._caches.before_batch(batch)  # type: ignore[union-attr]

    def _leave_cache(self) -> None:
        """Drop the phase's prefix cache (and its spill files); its line goes into the phase's record."""
        if self._caches is not None and self.run is not None:
            self._caches.leave(self.run.history)

    def _audit(self, trainer: pl.Trainer, stage: str, thawed: list[str] | None = None) -> None:
        """Audit the phase as installed (a collective): the current optimizer and schedulers, the model as trained."""
        assert self.run is not None
        optimizer, schedulers = self._optimizer_and_schedulers(trainer)
        self.run.audit_phase(optimizer, schedulers, stage=stage, thawed=thawed, model=trainer.strategy.model)


__all__ = ["STATE_FORMAT", "FinetuningScheduler", "PhaseRecord", "ScheduleError"]
