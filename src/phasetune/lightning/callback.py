"""FinetuningScheduler: the Lightning callback that runs a fine-tuning schedule.

A :class:`~phasetune.run.Host` of :class:`phasetune.run.PhaseRun`, which drives the run. Lightning's alone: the
companion callbacks, the strategy adapter (installing optimizers and schedulers), the hook order: ``setup`` (adapter,
companions, the run) -> ``load_state_dict`` when resuming -> ``on_fit_start`` (an implicit schedule is generated
here; prepare, replay a resumed phase before Lightning loads optimizer state, begin) -> ``on_train_start`` (prefix
cache, a transition a step-cap checkpoint owes) -> ``on_train_epoch_start`` (transition if the phase ended) ...
``on_train_batch_end`` (transition at a ``max_transition_step``) ... ``on_validation_end`` -> ``on_train_end``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Callback

from phasetune.core import generate, transitions
from phasetune.errors import ConfigurationError, ScheduleError, ScheduleGenerated
from phasetune.lightning import _compat, fts_compat, memory_facts, messages, run_facts
from phasetune.lightning.adapters import StrategyAdapter, select_adapter
from phasetune.lightning.callback_resume import LightningResume
from phasetune.lightning.companions import configure_companions
from phasetune.lightning.early_stopping import FTSEarlyStopping
from phasetune.lightning.fts_checkpoint import FTSCheckpoint
from phasetune.lightning.sharded import ShardedStrategyAdapter
from phasetune.run import (
    STATE_FORMAT,
    PhaseRecord,
    PhaseRun,
    RunEnv,
    RunOptions,
    RunView,
    prefix_cache_problems,
)
from phasetune.run.lora_glue import inject_adapters

if TYPE_CHECKING:
    import lightning.pytorch as pl

TRAINER_STOPPED = "trainer stopped (max_epochs, max_steps or should_stop)"


class FinetuningScheduler(LightningResume, RunView, Callback):
    """Run a multi-phase fine-tuning schedule (gradual unfreezing) in a Lightning ``Trainer``.

    Args:
        ft_schedule: schedule YAML path or dict; ``None`` generates one from the model (see
            ``schedule_style``) at the start of the fit, over the fit's step budget
            (``trainer.estimated_stepping_batches``: ``max_steps``, or ``max_epochs`` x batches per epoch after
            ``limit_train_batches`` and gradient accumulation) with the default settings
            (:func:`phasetune.core.recipes.default_settings`), and runs it; the file it writes to the log dir says
            the budget, the settings and where they came from.
        gen_ft_sched_only: write the generated schedule to the log dir and stop before training
            (raises :class:`~phasetune.errors.ScheduleGenerated`, a clean ``SystemExit``) at the start of the
            fit, where the budget and the optimizer's lr are known.
        max_depth, base_max_lr, restore_best, epoch_transitions_only, schedule_style, schedule_options, reinit_optim_cfg,
        reinit_lr_cfg, enforce_phase0_params, apply_lambdas_new_pgs, frozen_bn_track_running_stats,
        snapshot_storage, resume_rng, audit, audit_zero_lr, memory_check: the knobs every front end shares, with one
            meaning and default each: see :class:`phasetune.RunOptions` (``self.options``). ``audit="raise"`` (the
            default) checks each phase at its start and after its first optimizer step and raises
            :class:`~phasetune.AuditError` naming what did not take effect (see docs/audit.md). ``memory_check``
            (on for a CUDA device) plans the fit's memory before its first step (docs/memory_plan.md).
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
        memory_check: Any = None,
        strategy_adapter_cfg: Mapping[str, Any] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        logging_level: int | str | None = None,
        allow_untested: bool = False,
        custom_strategy_adapters: Mapping[str, str | type[StrategyAdapter]] | None = None,
        prefix_cache: Mapping[int, Any] | None = None,
    ) -> None:
        given = locals()  # FTS's flat keywords, mapped to the one RunOptions here
        self.options = RunOptions(**{f.name: given[f.name] for f in fields(RunOptions)})
        problems = self.options.problems(explicit_schedule=ft_schedule is not None) + prefix_cache_problems(prefix_cache)
        fts_args = fts_compat.FTSArgs.parse(log_dir, logging_level, allow_untested, custom_strategy_adapters)
        problems += fts_args.problems
        if problems:
            raise ConfigurationError(problems)
        fts_args.apply_logging_level()
        self._log_dir_arg, self._custom_adapters = fts_args.log_dir, fts_args.adapters
        self.ft_schedule, self.gen_ft_sched_only = ft_schedule, gen_ft_sched_only
        self.strategy_adapter_cfg = dict(strategy_adapter_cfg or {})
        self.logging_level, self.allow_untested = logging_level, allow_untested
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
        self._resumed_early = self._resumed_mid_epoch = False
        self._log_dir: str | None = None
        self._validated_this_epoch = self._fit_started = False
        self._steps: Any = None  # the optimizer-step counter on_train_batch_end reads (set in on_train_start)
        # the per-batch hook exists only while a phase caches (an instance attribute): other fits do no work per step
        self.__dict__.pop("on_train_batch_start", None)

    # ------------------------------------------------------------------ public read-only state
    @property
    def curr_depth(self) -> int | None:
        """Index of the phase being trained (``depth``, by the name ``FinetuningScheduler`` users know)."""
        return self.depth

    @property
    def depth_remaining(self) -> int | None:
        """Phases left after the current one (within ``max_depth``)."""
        return self.run.depth_remaining if self.run else None

    is_final_phase = property(lambda self: self.run is not None and self.run.is_final)

    @property
    def log_dir(self) -> str | None:
        """Where generated schedules and snapshot files of this fit go (``log_dir=...``, else the trainer's)."""
        return self._log_dir if self._log_dir is not None else self._log_dir_arg

    # ------------------------------------------------------------------ the Host
    def optimizer_and_schedulers(self) -> tuple[torch.optim.Optimizer, list[Any]]:
        trainer = self.adapter.trainer  # type: ignore[union-attr]
        if len(trainer.optimizers) != 1:
            raise ConfigurationError(
                f"FinetuningScheduler drives exactly one optimizer, but configure_optimizers returned "
                f"{len(trainer.optimizers)}; return one optimizer (with as many param groups as you like)")
        return trainer.optimizers[0], [c.scheduler for c in trainer.lr_scheduler_configs]

    def install(self, *, optimizer: torch.optim.Optimizer | None, scheduler: Any,
                scheduler_cfg: Mapping[str, Any] | None, thawed: bool) -> None:
        adapter = self.adapter
        assert adapter is not None and adapter.trainer is not None
        if optimizer is not None:
            adapter.install_optimizer(adapter.trainer, optimizer)
        if scheduler is not None:
            adapter.install_scheduler(adapter.trainer, scheduler, scheduler_cfg or {})
        if thawed:
            adapter.after_thaw(adapter.trainer)  # DDP is rebuilt here, FSDP2 units refreshed: the audit comes after

    def trained_model(self) -> torch.nn.Module:
        return self.adapter.trainer.strategy.model  # type: ignore[union-attr]

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset()
        self.adapter = select_adapter(trainer.strategy, self.strategy_adapter_cfg, custom=self._custom_adapters,
                                      allow_untested=self.allow_untested)
        self.adapter.connect(trainer)
        self._watch_data_iterator(trainer)
        if self._log_dir_arg is not None:  # log_dir=...: the same on every rank, so no collective is skipped
            self._log_dir = self._log_dir_arg
        else:  # trainer.log_dir is a collective under DDP: every rank reads it, once
            log_dir = trainer.log_dir
            self._log_dir = str(log_dir if log_dir is not None else trainer.default_root_dir)
        if self.gen_ft_sched_only:
            return  # on_fit_start writes the generated schedule (the budget and the optimizer are known there) and stops
        found = configure_companions(trainer, pl_module, stage, self, restore_best=self.options.restore_best,
                                     epoch_transitions_only=self.options.epoch_transitions_only)
        self.early_stopping, self.checkpoint = found.early_stopping, found.checkpoint
        self.monitor, self.monitor_mode = found.monitor, found.mode
        inject_adapters(pl_module, self.ft_schedule)  # LoRA adapters before configure_model/the strategy shard
        if self.adapter.defer_init(pl_module):
            return
        if self.ft_schedule is None:  # generated at on_fit_start; configure_optimizers sees phase 0 trainable already
            run_facts.freeze_to_implicit_phase0(self.adapter, pl_module, self.options)
        else:
            self._init_run(trainer, pl_module)

    def _init_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        adapter = self.adapter
        assert adapter is not None
        no_decay = getattr(pl_module, "no_decay", None)
        if no_decay is not None and (isinstance(no_decay, str) or not all(isinstance(s, str) for s in no_decay)):
            raise ConfigurationError(
                f"{type(pl_module).__name__}.no_decay must be a list of parameter-name substrings, got {no_decay!r}")
        env = RunEnv(broadcast=lambda value: trainer.strategy.broadcast(value, src=0), warn=messages.warn,
                     info=messages.info, named_buffers=lambda: adapter.named_buffers(pl_module),
                     copy_into=adapter.snapshot_copy, rank_local_snapshots=adapter.rank_local_snapshots,
                     snapshot_dir=self._log_dir, optimizer_source="the optimizer from configure_optimizers")
        facts = None if self.ft_schedule is not None else run_facts.trainer_facts(
            trainer, generate.needs_run_budget(self.options))
        self.run = PhaseRun(
            self.ft_schedule, adapter.named_parameters(pl_module), adapter.param_shapes(pl_module),
            options=self.options, env=env, model=pl_module, structure=adapter.structure_module(pl_module),
            no_decay=no_decay, monitor=self.monitor, mode=self.monitor_mode, facts=facts)
        self.run.patience = self.early_stopping
        run_facts.reach_every_phase(trainer, self.run)
        run_facts.write_schedules(trainer, pl_module, self.run, self._log_dir)

    # ------------------------------------------------------------------ fit start
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.adapter is not None
        if self.gen_ft_sched_only:
            raise ScheduleGenerated(run_facts.write_generated(trainer, pl_module, self.adapter, self.options,
                                                              self._log_dir))
        # the phase as an integer in the progress bar (logged as a float, as Lightning logs every value)
        self.adapter.keep_undo(_compat.progress_bar_integer(trainer, "ft_phase"))
        deferred = self.run is None  # sharded strategies and implicit schedules: the run is built now
        if deferred:
            self._init_run(trainer, pl_module)
        run = self.run
        assert run is not None
        run.env.device = pl_module.device
        # the adapter first: it may set how groups are split, which the engine's group count depends on
        run.prepare(self, expected=deferred, checks=[lambda: self.adapter.check(self, trainer),  # type: ignore[union-attr]
                                                     lambda: self._prepare_caches(trainer, pl_module)])
        resumed = self._restored_state is not None
        if resumed:
            self._resume(trainer)
        run.begin(self, epoch=trainer.current_epoch, step=trainer.global_step, resumed=resumed)
        self._fit_started = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.run is not None
        memory_facts.check_at_train_start(self, trainer, pl_module)  # memory_check: before the first training step
        self._after_data_iterator(trainer)
        es = self.early_stopping
        stopped = es is not None and es.wait_count >= es.patience  # restored from a run early stopping ended
        if not self.run.begin_training(self, epoch=trainer.current_epoch, step=trainer.global_step,
                                       early_stopped=stopped, dataset=getattr(trainer.train_dataloader, "dataset", None)):
            trainer.should_stop = True
        # the optimizer-step counter on_train_batch_end reads (Lightning's progress counter: see _compat)
        self._steps = _compat.optimizer_steps(trainer, pl_module)

    # ------------------------------------------------------------------ per optimizer step
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # optimizer steps, as trainer.global_step counts them (it repeats under gradient accumulation, and step_end
        # ignores repeats), read from the progress counter itself: the property costs ~10x the rest of this hook
        decision = self.run.step_end(self._steps.completed)  # type: ignore[union-attr]
        if decision is not None:
            self.run.advance(self, epoch=trainer.current_epoch, step=trainer.global_step, reason=decision.reason)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ per epoch
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.run is not None
        # the random state the epoch's data iterator will draw its order from (saved with mid-epoch checkpoints)
        self.run.random.note_epoch_start(self._data_generators(trainer))
        self._validated_this_epoch = False
        self.run.start_epoch(self, epoch=trainer.current_epoch, step=trainer.global_step,
                             early_stopped=bool(self.early_stopping and self.early_stopping.phase_done))
        # the phase in the progress bar and the loggers (shown from the end of the phase's first epoch); every rank
        # logs the same values, synced (one small all-reduce an epoch) under several processes, where Lightning
        # otherwise warns; each group's lr once an epoch (LearningRateMonitor(logging_interval="epoch"))
        sync, logger = trainer.world_size > 1, bool(trainer.loggers)
        pl_module.log("ft_phase", float(self.run.depth), on_step=False, on_epoch=True, prog_bar=True, logger=logger,
                      sync_dist=sync)
        for name, lr in self.run.lrs(trainer.optimizers[0]).items():
            pl_module.log(f"lr/{name}", lr, on_step=False, on_epoch=True, logger=logger, sync_dist=sync)

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
        stopped = self.early_stopping is not None and self.early_stopping.stopped_epoch
        reason = transitions.EARLY_STOPPING if stopped else TRAINER_STOPPED
        self.run.finish(epoch=trainer.current_epoch, step=trainer.global_step, reason=reason)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.__dict__.pop("on_train_batch_start", None)
        if self.run is not None:  # after an exception too (on_train_end did not run): hooks and spill files go
            self.run.close()
        if self.adapter is not None:
            self.adapter.release()

    # ------------------------------------------------------------------ helpers
    def _observe(self, trainer: pl.Trainer) -> None:
        """Record the monitored value (FTSEarlyStopping, a callback of its own, keeps the patience)."""
        value = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        self.run.end_evaluation(self, value, epoch=trainer.current_epoch, step=trainer.global_step)  # type: ignore[union-attr]

    def _prepare_caches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        """Check the phases' prefix_cache settings against the model and strategy; the per-batch hook is installed
        only when a phase caches. Problems are returned for the fit-start error."""
        assert self.run is not None
        sharded = None
        if isinstance(self.adapter, ShardedStrategyAdapter):
            kind = "FSDP2" if type(trainer.strategy).__name__ == "ModelParallelStrategy" else "FSDP1"
            sharded = f"{kind}, {type(trainer.strategy).__name__}"
        problems = self.run.use_prefix_cache(pl_module, self.prefix_cache, spill_dir=self.log_dir, sharded=sharded)
        if self.run.caches is not None:
            self.on_train_batch_start = self._before_batch  # type: ignore[method-assign]
        return problems

    def _before_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """``on_train_batch_start`` while a phase caches: the cache learns the batch's samples; a dict batch
        loses its ``sample_index`` before ``training_step`` sees it."""
        self.run.caches.before_batch(batch)  # type: ignore[union-attr]


# the shared knobs live in self.options (one RunOptions, as in the plain loop), under their FTS names
for _name in RunOptions.names():
    setattr(FinetuningScheduler, _name, fts_compat.option_property(_name))

__all__ = ["STATE_FORMAT", "FinetuningScheduler", "PhaseRecord", "ScheduleError"]
