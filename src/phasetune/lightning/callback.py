"""FinetuningScheduler: the Lightning callback that runs a fine-tuning schedule.

The callback is a thin adapter from Trainer hooks to the core: :mod:`phasetune.schedule` (what each
phase trains), :class:`phasetune.engine.PhaseEngine` (thawing, parameter groups, optimizers),
:mod:`phasetune.transitions` (when a phase ends) and :mod:`phasetune.snapshots` (restore-best).

Hook order in a fit: ``setup`` (check the strategy, add/upgrade FTSEarlyStopping and FTSCheckpoint,
resolve the schedule, freeze all but phase 0) -> ``load_state_dict`` when resuming -> ``on_fit_start``
(fit the optimizer to phase 0, replay a resumed run's transitions before Lightning loads optimizer
state) -> per epoch: ``on_train_epoch_start`` (transition if the phase ended) ... ``on_validation_end``
(snapshot the best state of the phase) ... ``on_train_epoch_end`` (end the run after the final phase).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from phasetune import generate, snapshots, thaw, transitions
from phasetune.engine import PhaseEngine
from phasetune.errors import ConfigurationError, ScheduleError, ScheduleGenerated
from phasetune.io import atomic_torch_save
from phasetune.lightning.adapters import StrategyAdapter, select_adapter
from phasetune.lightning.checkpoint import FTSCheckpoint
from phasetune.lightning.early_stopping import FTSEarlyStopping
from phasetune.memory import PeakMemory
from phasetune.report import covering_modules, fmt_count
from phasetune.schedule import Schedule, diff_fingerprints, resolve_schedule

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger("phasetune")
if not logging.getLogger().hasHandlers() and not log.handlers:
    log.addHandler(logging.StreamHandler())
    log.setLevel(logging.INFO)

STATE_FORMAT = 1
DEFAULT_MONITOR = "val_loss"


@dataclass
class PhaseRecord:
    """What happened in one phase (``FinetuningScheduler.history`` holds one per phase started)."""

    depth: int
    start_epoch: int
    start_step: int
    lr: float | None
    trainable_params: int
    total_params: int
    end_epoch: int | None = None
    end_step: int | None = None
    end_reason: str | None = None
    best_value: float | None = None
    best_epoch: int | None = None
    restored_best: bool = False
    wall_time: float = 0.0
    peak_memory: int | None = None  # bytes; what was measured: peak_memory_kind (see phasetune.memory)
    peak_memory_kind: str | None = None

    @property
    def epochs(self) -> int | None:
        return None if self.end_epoch is None else self.end_epoch - self.start_epoch

    @property
    def steps(self) -> int | None:
        return None if self.end_step is None else self.end_step - self.start_step


class FinetuningScheduler(Callback):
    """Run a multi-phase fine-tuning schedule (gradual unfreezing) in a Lightning ``Trainer``.

    Args:
        ft_schedule: schedule YAML path or dict; ``None`` generates one from the model (see
            ``schedule_style``) and runs it.
        max_depth: last phase to run; -1 runs every phase.
        base_max_lr: lr of phases >= 1 that set no ``lr``; ``None`` uses a tenth of phase 0's lr.
        restore_best: before each transition, restore the best state (by the FTSCheckpoint monitor)
            seen in the phase that is ending.
        gen_ft_sched_only: write the generated schedule to the log dir and stop before training
            (raises :class:`~phasetune.errors.ScheduleGenerated`, a clean ``SystemExit``).
        epoch_transitions_only: phases end only at their ``max_transition_epoch`` (required in every
            phase); early stopping is not used.
        schedule_style: implicit schedule style, ``"blocks"`` (modules whole, head first) or ``"pairs"``.
        reinit_optim_cfg: for implicit schedules, a ``new_optimizer`` mapping applied at every transition.
        reinit_lr_cfg: for implicit schedules, a ``new_lr_scheduler`` mapping applied at every transition.
        enforce_phase0_params: rebuild the groups of the optimizer from ``configure_optimizers`` over
            exactly phase 0's parameters (True), or only warn when they differ (False).
        apply_lambdas_new_pgs: groups added to a LambdaLR/MultiplicativeLR follow its last lambda
            instead of keeping their lr.
        frozen_bn_track_running_stats: frozen BatchNorm layers keep updating running statistics (True,
            the default) or are put in eval mode while frozen (False).
        snapshot_storage: where restore-best keeps its snapshot: ``"memory"`` (CPU memory, also saved in
            checkpoints so a resumed run restores exactly) or ``"disk"`` (a file under the log dir per
            improvement, written atomically; checkpoints only reference it).
        strategy_adapter_cfg: options for the strategy adapter (FSDP/FSDP2 adapters take some).
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
        schedule_style: str = "blocks",
        reinit_optim_cfg: Mapping[str, Any] | None = None,
        reinit_lr_cfg: Mapping[str, Any] | None = None,
        enforce_phase0_params: bool = True,
        apply_lambdas_new_pgs: bool = False,
        frozen_bn_track_running_stats: bool = True,
        snapshot_storage: str = "memory",
        strategy_adapter_cfg: Mapping[str, Any] | None = None,
    ) -> None:
        problems = []
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < -1:
            problems.append(f"max_depth must be -1 (all phases) or an integer >= 0, got {max_depth!r}")
        if base_max_lr is not None and (
            isinstance(base_max_lr, bool) or not isinstance(base_max_lr, (int, float)) or not base_max_lr > 0
        ):
            problems.append(f"base_max_lr must be a positive number or None, got {base_max_lr!r}")
        if schedule_style not in generate.STYLES:
            problems.append(f"schedule_style must be one of {generate.STYLES}, got {schedule_style!r}")
        if snapshot_storage not in ("memory", "disk"):
            problems.append(f"snapshot_storage must be 'memory' or 'disk', got {snapshot_storage!r}")
        if (reinit_optim_cfg or reinit_lr_cfg) and ft_schedule is not None:
            problems.append(
                "reinit_optim_cfg/reinit_lr_cfg apply to implicit schedules only; with an explicit schedule "
                "put 'new_optimizer'/'new_lr_scheduler' in the phases that need them"
            )
        if problems:
            raise ConfigurationError(problems)
        self.ft_schedule = ft_schedule
        self.max_depth = max_depth
        self.base_max_lr = base_max_lr
        self.restore_best = restore_best
        self.gen_ft_sched_only = gen_ft_sched_only
        self.epoch_transitions_only = epoch_transitions_only
        self.schedule_style = schedule_style
        self.reinit_optim_cfg = reinit_optim_cfg
        self.reinit_lr_cfg = reinit_lr_cfg
        self.enforce_phase0_params = enforce_phase0_params
        self.apply_lambdas_new_pgs = apply_lambdas_new_pgs
        self.frozen_bn_track_running_stats = frozen_bn_track_running_stats
        self.snapshot_storage = snapshot_storage
        self.strategy_adapter_cfg = dict(strategy_adapter_cfg or {})

        self.engine: PhaseEngine | None = None
        self.adapter: StrategyAdapter | None = None
        self.history: list[PhaseRecord] = []
        self.early_stopping: FTSEarlyStopping | None = None
        self.checkpoint: FTSCheckpoint | None = None
        self.monitor: str | None = None
        self.monitor_mode = "min"
        self._snapshot: snapshots.Snapshot | None = None
        self._snapshot_ref: dict[str, Any] | None = None
        self._restored_state: dict[str, Any] | None = None
        self._resumed_early = False
        self._phase_clock: float | None = None
        self._memory: PeakMemory | None = None
        self._log_dir: str | None = None
        self._validated_this_epoch = False
        self._fit_started = False

    # ------------------------------------------------------------------ public read-only state
    @property
    def schedule(self) -> Schedule | None:
        """The resolved schedule (exact parameter names per phase)."""
        return self.engine.schedule if self.engine else None

    @property
    def curr_depth(self) -> int | None:
        """Index of the phase being trained."""
        return self.engine.depth if self.engine else None

    @property
    def final_depth(self) -> int | None:
        return self.engine.final_depth if self.engine else None

    @property
    def depth_remaining(self) -> int | None:
        """Phases left after the current one (within ``max_depth``)."""
        return self.engine.depth_remaining if self.engine else None

    @property
    def is_final_phase(self) -> bool:
        return self.engine is not None and self.engine.is_final

    @property
    def thawed_params(self) -> list[str]:
        """Names of the parameters trained in the current phase (phases 0..curr_depth)."""
        return self.engine.schedule.params_through(self.engine.depth) if self.engine else []

    @property
    def snapshot(self) -> snapshots.Snapshot | None:
        """The best-state snapshot of the current phase (restore-best), if any."""
        return self._snapshot

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._fit_started = False
        self._resumed_early = False
        self._restored_state = None  # a checkpoint loaded by an earlier validate/test is not a resume
        self.adapter = select_adapter(trainer.strategy, self.strategy_adapter_cfg)
        self.adapter.connect(trainer)
        self._log_dir = self._resolve_log_dir(trainer)
        if self.gen_ft_sched_only:
            path = self._write_generated(trainer, pl_module)
            raise ScheduleGenerated(path)
        self._configure_callbacks(trainer)
        _show_phase_in_progress_bar(trainer, self)
        if not self.adapter.defer_init(pl_module):
            self._init_engine(trainer, pl_module)

    @staticmethod
    def _resolve_log_dir(trainer: pl.Trainer) -> str:
        log_dir = trainer.log_dir  # a collective under DDP: every rank must read it
        return str(log_dir if log_dir is not None else trainer.default_root_dir)

    def _generated_raw(self, pl_module: pl.LightningModule) -> dict[int, dict[str, Any]]:
        assert self.adapter is not None
        raw = generate.generate_schedule(self.adapter.structure_module(pl_module), self.schedule_style)
        for k in range(1, len(raw)):
            if self.reinit_optim_cfg:
                raw[k]["new_optimizer"] = dict(self.reinit_optim_cfg)
            if self.reinit_lr_cfg:
                raw[k]["new_lr_scheduler"] = dict(self.reinit_lr_cfg)
        return raw

    def _schedule_file(self, pl_module: pl.LightningModule, suffix: str) -> Path:
        assert self._log_dir is not None
        return Path(self._log_dir) / f"{type(pl_module).__name__}_{suffix}.yaml"

    def _write_generated(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        raw = self._generated_raw(pl_module)
        names = self.adapter.named_parameters(pl_module)  # type: ignore[union-attr]
        schedule = resolve_schedule(raw, list(names), epoch_transitions_only=False)
        path = self._schedule_file(pl_module, "ft_schedule")
        if trainer.is_global_zero:
            schedule.dump(path, resolved=False, header=f"phasetune schedule generated for {type(pl_module).__name__} "
                          f"(style {self.schedule_style!r}); edit it and pass it as ft_schedule")
            log.info("phasetune: wrote generated schedule (%d phases) to %s", len(schedule), path)
        return str(path)

    def _configure_callbacks(self, trainer: pl.Trainer) -> None:
        cbs = trainer.callbacks
        stoppers = [c for c in cbs if isinstance(c, EarlyStopping)]
        if self.epoch_transitions_only:
            for c in stoppers:
                cbs.remove(c)
            if stoppers:
                rank_zero_warn(
                    f"epoch_transitions_only=True: removed {len(stoppers)} EarlyStopping callback(s); phases end "
                    "at their max_transition_epoch and the run ends after the final phase's."
                )
            self.early_stopping = None
        else:
            odd = [type(c).__name__ for c in stoppers if not isinstance(c, FTSEarlyStopping) and type(c) is not EarlyStopping]
            if odd:
                raise ConfigurationError(
                    f"{', '.join(odd)} subclasses EarlyStopping but not FTSEarlyStopping; phase transitions need "
                    "FTSEarlyStopping (derive from it instead)"
                )
            if len(stoppers) > 1:
                raise ConfigurationError(
                    f"found {len(stoppers)} EarlyStopping callbacks; FinetuningScheduler uses exactly one to end phases"
                )
            if stoppers:
                es = stoppers[0]
                if not isinstance(es, FTSEarlyStopping):
                    up = FTSEarlyStopping.upgrade(es)
                    cbs[cbs.index(es)] = up
                    es = up
            else:
                es = FTSEarlyStopping(monitor=DEFAULT_MONITOR, mode="min", patience=3)
                first_ckpt = next((i for i, c in enumerate(cbs) if isinstance(c, ModelCheckpoint)), len(cbs))
                cbs.insert(first_ckpt, es)
                rank_zero_warn(
                    f"FinetuningScheduler added FTSEarlyStopping(monitor={DEFAULT_MONITOR!r}, patience=3) to end "
                    "phases; pass your own FTSEarlyStopping to choose the metric and patience."
                )
            es.scheduler_callback = self
            self.early_stopping = es

        ckpts = [c for c in cbs if isinstance(c, ModelCheckpoint)]
        monitor = self.early_stopping.monitor if self.early_stopping else DEFAULT_MONITOR
        mode = self.early_stopping.mode if self.early_stopping else "min"
        self.checkpoint = None
        for c in ckpts:
            if isinstance(c, FTSCheckpoint):
                up = c
            elif type(c) is ModelCheckpoint:
                overrides = {}
                if c.monitor is None:
                    overrides = {"monitor": monitor, "mode": mode}
                    rank_zero_warn(
                        f"FinetuningScheduler upgraded ModelCheckpoint(monitor=None) to FTSCheckpoint(monitor="
                        f"{monitor!r}, mode={mode!r}) so checkpoints and restore-best follow the phase metric; "
                        "pass an FTSCheckpoint to choose otherwise."
                    )
                up = FTSCheckpoint.upgrade(c, **overrides)
                cbs[cbs.index(c)] = up
            else:
                continue
            up.scheduler_callback = self
            if self.checkpoint is None:
                self.checkpoint = up
        if self.checkpoint is None and ckpts:
            rank_zero_warn(
                f"{type(ckpts[0]).__name__} is not an FTSCheckpoint; checkpoint depths are not recorded."
            )
        self.monitor = self.checkpoint.monitor if self.checkpoint and self.checkpoint.monitor else monitor
        self.monitor_mode = self.checkpoint.mode if self.checkpoint and self.checkpoint.monitor else mode
        if self.restore_best and self.epoch_transitions_only and not (self.checkpoint and self.checkpoint.monitor):
            rank_zero_warn(
                f"restore_best=True with epoch_transitions_only=True: the best state is judged by {self.monitor!r}; "
                "pass an FTSCheckpoint(monitor=...) to choose the metric."
            )

    def _init_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.adapter is not None
        params = self.adapter.named_parameters(pl_module)
        shapes = self.adapter.param_shapes(pl_module)
        source = self.ft_schedule if self.ft_schedule is not None else self._generated_raw(pl_module)
        schedule = resolve_schedule(source, shapes, epoch_transitions_only=self.epoch_transitions_only)
        for note in schedule.warnings:
            rank_zero_warn(f"schedule {schedule.source}: {note}")
        if schedule.unscheduled:
            rank_zero_warn(
                f"{len(schedule.unscheduled)} of {len(params)} parameters are in no phase and stay frozen for the "
                f"whole run (e.g. {schedule.unscheduled[0]!r}); add them to a phase to train them."
            )
        if self.max_depth > len(schedule) - 1:
            rank_zero_warn(f"max_depth={self.max_depth} exceeds the last phase ({len(schedule) - 1}); running all phases.")
        no_decay = getattr(pl_module, "no_decay", None)
        if no_decay is not None and (isinstance(no_decay, str) or not all(isinstance(s, str) for s in no_decay)):
            raise ConfigurationError(
                f"{type(pl_module).__name__}.no_decay must be a list of parameter-name substrings, got {no_decay!r}"
            )
        self.engine = PhaseEngine(
            schedule,
            params,
            base_lr=self.base_max_lr,
            max_depth=self.max_depth,
            no_decay=no_decay,
            apply_lambdas_new_pgs=self.apply_lambdas_new_pgs,
        )
        self.engine.start()
        thaw.apply_frozen_batchnorm_mode(pl_module, self.frozen_bn_track_running_stats)
        self._check_epochs(trainer)
        if trainer.is_global_zero:
            if self.ft_schedule is None:
                schedule.dump(self._schedule_file(pl_module, "ft_schedule"), resolved=False,
                              header=f"phasetune implicit schedule (style {self.schedule_style!r})")
            schedule.dump(
                self._schedule_file(pl_module, "ft_schedule_resolved"),
                header=f"resolved from {schedule.source}: exact parameter names per phase",
            )

    def _check_epochs(self, trainer: pl.Trainer) -> None:
        assert self.engine is not None
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            return
        run = self.engine.schedule.phases[: self.engine.final_depth + 1]
        late = [p for p in run if p.max_transition_epoch > max_epochs]
        if late:
            rank_zero_warn(
                f"max_epochs={max_epochs} ends training before phase {late[0].index}'s max_transition_epoch "
                f"({late[0].max_transition_epoch}); later phases may not run."
            )

    # ------------------------------------------------------------------ resume and fit start
    def state_dict(self) -> dict[str, Any]:
        if self.engine is None:
            return {}
        self._close_clock()
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "depth": self.engine.depth,
            "fingerprint": self.engine.schedule.fingerprint(),
            "history": [asdict(r) for r in self.history],
            "monitor": self.monitor,
            "snapshot": None,
        }
        if self._snapshot is not None:
            assert self.adapter is not None  # sharded strategies keep each rank's snapshot (all ranks call this)
            if self.snapshot_storage == "memory":
                state["snapshot"] = self.adapter.rank_local_state(self._snapshot.to_state())
            elif self._snapshot_ref is not None:
                state["snapshot_ref"] = self.adapter.rank_local_state(dict(self._snapshot_ref))
        return state

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning restores a callback's state only when the checkpoint has it; without it, the optimizer
        # state of a plain run would be loaded into phase 0's groups and fail with an opaque size mismatch.
        if trainer.state.fn == TrainerFn.FITTING and self.state_key not in (checkpoint.get("callbacks") or {}):
            raise checkpoint_without_state(trainer.ckpt_path)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("format") != STATE_FORMAT:
            raise ConfigurationError(
                f"this checkpoint's FinetuningScheduler state has format {state_dict.get('format')!r}; this "
                f"phasetune reads format {STATE_FORMAT}"
            )
        if self._resumed_early:  # resume_early already applied this checkpoint's state
            self._resumed_early = False
            return
        trainer = self.adapter.trainer if self.adapter is not None else None
        if trainer is not None and trainer.state.fn != TrainerFn.FITTING:
            return  # validate/test with ckpt_path after a fit: they load weights; the phase state is fit's alone
        self._restored_state = dict(state_dict)
        if self._fit_started and trainer is not None:
            # Strategies with restore_checkpoint_after_setup (FSDP, ModelParallel) restore callbacks after
            # on_fit_start. Rebuild the saved phase's thawed set and groups now, before Lightning loads the
            # optimizer state; plain Lightning would silently drop them.
            optimizer, schedulers = self._optimizer_and_schedulers(trainer)
            self._resume(trainer, trainer.lightning_module, optimizer, schedulers)

    def resume_early(self, state_dict: dict[str, Any]) -> None:
        """Apply a checkpoint's state now, after ``on_fit_start``: strategy adapters call this when the strategy
        loads optimizer state before restoring callbacks (ModelParallel). Lightning's later
        ``load_state_dict`` with the same state is then skipped."""
        self.load_state_dict(state_dict)
        self._resumed_early = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.adapter is not None
        deferred = self.engine is None
        if deferred:
            self._init_engine(trainer, pl_module)
        assert self.engine is not None
        optimizer, schedulers = self._optimizer_and_schedulers(trainer)
        report = self.engine.prepare_optimizer(optimizer, schedulers, enforce=self.enforce_phase0_params)
        self._warn_phase0(report, expected=deferred, is_zero=trainer.is_global_zero)
        # the adapter first: it may set how groups are split, which the engine's group count depends on
        problems = self.adapter.check(self, trainer)
        problems += self.engine.check_setup(optimizer, schedulers)
        if problems:
            raise ConfigurationError(problems)
        if self._restored_state is not None:
            self._resume(trainer, pl_module, optimizer, schedulers)
        else:
            self.history = [self._new_record(trainer, 0)]
        self._memory = PeakMemory(pl_module.device)
        self._start_clock()
        self._fit_started = True

    def _optimizer_and_schedulers(self, trainer: pl.Trainer) -> tuple[torch.optim.Optimizer, list[Any]]:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ConfigurationError(
                f"FinetuningScheduler drives exactly one optimizer, but configure_optimizers returned "
                f"{len(optimizers)}; return one optimizer (with as many param groups as you like)"
            )
        return optimizers[0], [c.scheduler for c in trainer.lr_scheduler_configs]

    def _warn_phase0(self, report: Any, expected: bool = False, is_zero: bool = True) -> None:
        """Say how the optimizer from configure_optimizers differed from phase 0 (and what was done).

        ``expected``: the schedule was resolved after configure_optimizers (sharded strategies), so the
        optimizer could not know the frozen set; fitting it to phase 0 is routine and said at INFO level.
        """
        if not report.changed:
            return
        if expected and self.enforce_phase0_params and not report.unnamed:
            if is_zero:
                log.info(
                    "phasetune: fitted the optimizer from configure_optimizers to phase 0 (it was built before the "
                    "strategy wrapped the model, so it also held %d tensors of later phases)", len(report.extra),
                )
            return
        parts = []
        if report.extra:
            parts.append(f"{len(report.extra)} parameter(s) outside phase 0 (e.g. {report.extra[0]!r})")
        if report.missing:
            parts.append(f"lacked {len(report.missing)} phase-0 parameter(s) (e.g. {report.missing[0]!r})")
        if report.unnamed:
            parts.append(f"{report.unnamed} tensor(s) that are not parameters of the model")
        what = "; ".join(parts)
        if self.enforce_phase0_params:
            extra = (f"; groups {report.empty_groups} are now empty and kept so lr scheduler lists stay aligned"
                     if report.empty_groups else "")
            rank_zero_warn(
                f"the optimizer from configure_optimizers held {what}. phasetune rebuilt its groups over exactly "
                f"phase 0's parameters, keeping the optimizer, its hyperparameters and the lr scheduler{extra}."
            )
        else:
            rank_zero_warn(
                f"the optimizer from configure_optimizers held {what}; enforce_phase0_params=False leaves it as it "
                "is: parameters of later phases already in it will train with its settings, not their phase's."
            )

    def _resume(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any, schedulers: list[Any]) -> None:
        assert self.engine is not None and self.adapter is not None and self._restored_state is not None
        state, self._restored_state = self._restored_state, None
        blocking, benign = diff_fingerprints(state["fingerprint"], self.engine.schedule.fingerprint())
        if blocking:
            details = "".join(f"\n  - {b}" for b in blocking)
            raise ConfigurationError(
                f"cannot resume from {trainer.ckpt_path}: the checkpoint was trained with a different schedule or "
                f"model:{details}\nresume with the schedule and model the checkpoint was saved with, or start a new "
                "fit without ckpt_path"
            )
        for b in benign:
            rank_zero_warn(f"resuming with a changed schedule value: {b}; later phases use the current value")
        depth = int(state["depth"])
        if depth > self.engine.final_depth:
            raise ConfigurationError(
                f"the checkpoint was saved in phase {depth}, beyond max_depth={self.max_depth}; raise max_depth to "
                "at least the checkpoint's phase to resume it"
            )
        if depth > 0:
            new_opt, scheds, cfg = self.engine.replay(depth, optimizer, schedulers)
            if new_opt is not optimizer:
                self.adapter.install_optimizer(trainer, new_opt)
            if cfg is not None:
                self.adapter.install_scheduler(trainer, scheds[0], cfg)
            self.adapter.after_thaw(trainer)
            thaw.apply_frozen_batchnorm_mode(pl_module, self.frozen_bn_track_running_stats)
        self.history = [PhaseRecord(**r) for r in state.get("history", [])] or [self._new_record(trainer, depth)]
        snap = self.adapter.own_rank_state(state.get("snapshot"))
        ref = self.adapter.own_rank_state(state.get("snapshot_ref"))
        if snap is not None:
            self._snapshot = snapshots.Snapshot.from_state(snap)
        elif ref:
            self._snapshot = self._load_snapshot_ref(ref)
        if self._snapshot is not None and self._snapshot.depth != depth:
            self._snapshot = None
        if trainer.is_global_zero:
            log.info("phasetune: resumed in phase %d of %d (%d trainable tensors)", depth, self.engine.final_depth,
                     len(self.thawed_params))

    def _load_snapshot_ref(self, ref: Mapping[str, Any]) -> snapshots.Snapshot | None:
        path = Path(ref["path"])
        if not path.exists():
            rank_zero_warn(f"restore-best snapshot {path} is gone; the phase restores the best state seen after resuming")
            return None
        snap = snapshots.Snapshot.from_state(torch.load(path, map_location="cpu", weights_only=True))
        if snap.step != ref.get("step"):
            rank_zero_warn(
                f"restore-best snapshot {path} was overwritten after this checkpoint (step {snap.step}, checkpoint "
                f"expects {ref.get('step')}); the phase restores the best state seen after resuming"
            )
            return None
        return snap

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.engine is not None
        es = self.early_stopping
        stopped = es is not None and es.wait_count >= es.patience  # restored from a run early stopping ended
        if self.engine.is_final and (stopped or self._end_reason(trainer.current_epoch)):
            trainer.should_stop = True
            log.info("phasetune: the schedule was already complete in the checkpoint; nothing left to train")

    # ------------------------------------------------------------------ per epoch
    def _end_reason(self, next_epoch: int) -> str | None:
        assert self.engine is not None
        record = self.history[-1]
        es = self.early_stopping
        return transitions.phase_end_reason(
            next_epoch=next_epoch,
            phase_start_epoch=record.start_epoch,
            max_transition_epoch=self.engine.phase.max_transition_epoch,
            early_stopping_done=bool(es and es.phase_done),
            epoch_transitions_only=self.epoch_transitions_only,
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.engine is not None
        self._validated_this_epoch = False
        if not self.engine.is_final:
            reason = self._end_reason(trainer.current_epoch)
            if reason:
                self._transition(trainer, pl_module, reason)
        if trainer.loggers:
            pl_module.log("ft_phase", float(self.engine.depth), on_step=False, on_epoch=True, prog_bar=False,
                          logger=True, sync_dist=False, rank_zero_only=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.engine is None or not trainer.training:
            return
        self._validated_this_epoch = True
        self._observe(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.engine is not None
        if not self._validated_this_epoch and self.monitor in trainer.callback_metrics:
            self._observe(trainer, pl_module)
        if self.engine.is_final and not trainer.should_stop:
            reason = self._end_reason(trainer.current_epoch + 1)
            if reason == transitions.EPOCH:
                trainer.should_stop = True
                if trainer.is_global_zero:
                    log.info("phasetune: final phase %d reached max_transition_epoch %d; training ends",
                             self.engine.depth, self.engine.phase.max_transition_epoch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.engine is None or not self.history:
            return
        rec = self.history[-1]
        if rec.end_epoch is None:
            rec.end_epoch = trainer.current_epoch
            rec.end_step = trainer.global_step
            es = self.early_stopping
            rec.end_reason = (
                "early stopping" if es is not None and es.stopped_epoch else
                "max_transition_epoch reached" if self._end_reason(trainer.current_epoch) == transitions.EPOCH else
                "trainer stopped (max_epochs, max_steps or should_stop)"
            )
        self._close_clock()
        if trainer.is_global_zero and self.engine.depth < self.engine.final_depth:
            rank_zero_warn(
                f"training ended in phase {self.engine.depth} of {self.engine.final_depth}: {rec.end_reason}; raise "
                "max_epochs or lower the phases' max_transition_epoch to run the whole schedule"
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.adapter is not None:
            self.adapter.release()

    # ------------------------------------------------------------------ restore-best bookkeeping
    def _observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the monitored value of this check; snapshot the state if it is the phase's best."""
        assert self.engine is not None and self.adapter is not None
        value = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        local = float(value) if value is not None else math.nan
        value_f = trainer.strategy.broadcast(local, src=0)  # every rank takes rank 0's decision
        if value_f is None or math.isnan(value_f):
            return
        rec = self.history[-1]
        better = rec.best_value is None or (value_f < rec.best_value if self.monitor_mode == "min" else value_f > rec.best_value)
        if not better:
            return
        rec.best_value = value_f
        rec.best_epoch = trainer.current_epoch
        if self.restore_best:
            self._take_snapshot(trainer, pl_module, value_f)

    def _take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, value: float) -> None:
        assert self.engine is not None and self.adapter is not None
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._snapshot = snapshots.take_snapshot(
            depth=self.engine.depth,
            epoch=trainer.current_epoch,
            step=trainer.global_step,
            value=value,
            params=self.engine.trainable(),
            buffers=self.adapter.named_buffers(pl_module),
            optimizer=optimizer,
            schedulers=[c.scheduler for c in trainer.lr_scheduler_configs],
        )
        if self.snapshot_storage == "disk":
            path = Path(self._log_dir or ".") / "phasetune_snapshots" / f"rank{trainer.global_rank}_phase{self.engine.depth}.pt"
            atomic_torch_save(self._snapshot.to_state(), path)
            self._snapshot_ref = {"path": str(path), "step": trainer.global_step, "depth": self.engine.depth}

    # ------------------------------------------------------------------ transitions
    def _transition(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        assert self.engine is not None and self.adapter is not None
        old = self.engine.depth
        rec = self.history[-1]
        rec.end_epoch, rec.end_step, rec.end_reason = trainer.current_epoch, trainer.global_step, reason
        self._close_clock()
        optimizer, schedulers = self._optimizer_and_schedulers(trainer)
        if self.restore_best:
            rec.restored_best = self._restore_snapshot(trainer, pl_module, optimizer, schedulers)
        t = self.engine.advance(optimizer, schedulers)
        if t.new_optimizer:
            self.adapter.install_optimizer(trainer, t.optimizer)
        if t.new_scheduler is not None:
            self.adapter.install_scheduler(trainer, t.new_scheduler, t.scheduler_cfg)
        self.adapter.after_thaw(trainer)
        thaw.apply_frozen_batchnorm_mode(pl_module, self.frozen_bn_track_running_stats)
        if self.early_stopping is not None:
            self.early_stopping.reset_for_phase()
        self._snapshot = None
        self._snapshot_ref = None
        self.history.append(self._new_record(trainer, t.depth))
        self._start_clock()
        if trainer.is_global_zero:
            if rec.restored_best:
                state = f"restored phase {old}'s best state (epoch {rec.best_epoch}, {self.monitor}={rec.best_value:.4g})"
            else:
                state = "kept the last state (" + ("no best state was recorded" if self.restore_best else "restore_best=False") + ")"
            now = self.history[-1]
            extras = []
            if t.new_optimizer:
                extras.append(f"new optimizer {type(t.optimizer).__name__}")
            if t.new_scheduler is not None:
                extras.append(f"new lr scheduler {type(t.new_scheduler).__name__}")
            if t.already_in_optimizer:
                extras.append(f"{len(t.already_in_optimizer)} already in the optimizer")
            log.info(
                "phasetune: phase %d -> %d at epoch %d (%s): %s; thawed %s (%s params in %d tensors) at lr %.3g; "
                "%.1f%% of the parameters now train%s",
                old, t.depth, trainer.current_epoch, reason, state, covering_modules(t.thawed, list(self.engine.params)),
                fmt_count(now.trainable_params - rec.trainable_params), len(t.thawed), t.lr,
                100.0 * now.trainable_params / max(now.total_params, 1), "; " + ", ".join(extras) if extras else "",
            )

    def _restore_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any, schedulers: Sequence[Any]) -> bool:
        assert self.engine is not None and self.adapter is not None
        snap = self._snapshot
        if snap is None or snap.depth != self.engine.depth:
            rank_zero_warn(
                f"restore_best: no best state was recorded in phase {self.engine.depth} (is {self.monitor!r} logged "
                "during validation?); continuing from the current state"
            )
            return False
        problems = snapshots.restore_snapshot(
            snap,
            params=self.engine.trainable(),
            buffers=self.adapter.named_buffers(pl_module),
            optimizer=optimizer,
            schedulers=schedulers,
            copy_into=self.adapter.snapshot_copy,
        )
        for p in problems:
            rank_zero_warn(f"restore_best in phase {self.engine.depth}: {p}")
        return not problems

    # ------------------------------------------------------------------ records
    def _new_record(self, trainer: pl.Trainer, depth: int) -> PhaseRecord:
        assert self.engine is not None
        names = self.engine.schedule.params_through(depth)
        shapes = self.engine.schedule.shapes  # logical shapes: tensors may be shards or shared FlatParameters
        trainable = sum(math.prod(shapes[n]) for n in names)
        total = sum(math.prod(s) for s in shapes.values())
        lr = None if depth == 0 else self.engine.lr_for(depth)
        return PhaseRecord(depth, trainer.current_epoch, trainer.global_step, lr, trainable, total)

    def _start_clock(self) -> None:
        self._phase_clock = time.perf_counter()
        if self._memory is not None:
            self._memory.reset()

    def _close_clock(self) -> None:
        if self._phase_clock is not None and self.history:
            now = time.perf_counter()
            rec = self.history[-1]
            rec.wall_time += now - self._phase_clock
            self._phase_clock = now
            peak = self._memory.read() if self._memory is not None else None
            if peak is not None:
                rec.peak_memory = max(rec.peak_memory or 0, peak)
                rec.peak_memory_kind = self._memory.kind  # type: ignore[union-attr]


def checkpoint_without_state(path: Any) -> ConfigurationError:
    """The error for resuming a fit from a checkpoint that holds no FinetuningScheduler state."""
    return ConfigurationError(
        f"cannot resume from {path}: it holds no FinetuningScheduler state (it was saved by a run without "
        "phasetune, or with save_weights_only=True). To start a scheduled fine-tune from its weights, load them "
        "into the model (YourModule.load_from_checkpoint(path), or load_state_dict of its 'state_dict') and call "
        "fit without ckpt_path."
    )


def _show_phase_in_progress_bar(trainer: pl.Trainer, fts: FinetuningScheduler) -> None:
    """Add ``phase k/n`` and the trainable parameter count and share to the progress bar's metrics.

    ``ProgressBar.get_metrics`` is the documented place to customise what a bar shows; wrapping it on the
    bar instance costs nothing per step beyond the bar's own refresh (logging the phase every step would).
    """
    bar = trainer.progress_bar_callback
    if bar is None or getattr(bar, "_phasetune_metrics", False):
        return
    original = bar.get_metrics

    def get_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = original(trainer, pl_module)
        if fts.engine is not None and fts.history:
            rec = fts.history[-1]
            metrics["phase"] = f"{fts.engine.depth}/{fts.engine.final_depth}"
            share = 100.0 * rec.trainable_params / max(rec.total_params, 1)
            metrics["trainable"] = f"{fmt_count(rec.trainable_params)} ({share:.1f}%)"
        return metrics

    bar.get_metrics = get_metrics  # type: ignore[method-assign]
    bar._phasetune_metrics = True  # type: ignore[attr-defined]


__all__ = ["FinetuningScheduler", "PhaseRecord", "ScheduleError"]
