"""PhasetuneTrainerCallback: a fine-tuning schedule under the Hugging Face ``transformers.Trainer``.

A thin mapping of Trainer events onto :class:`phasetune.run.PhaseRun`, which owns the run (schedule,
engine, history, snapshots, checkpoint state, when a phase ends). The Trainer builds its optimizer and lr
scheduler inside ``train()`` and loads their checkpoint state before any callback event, so the callback
needs the Trainer hook of :mod:`phasetune.hf.trainer` (:class:`PhasetuneTrainer`, or
:class:`PhasetuneTrainerMixin` on your own Trainer class), which calls :meth:`setup`,
:meth:`fit_optimizer` and :meth:`after_prepare` at the right moments.

Order in ``train()``: ``create_optimizer`` (hook: build the run, freezing the model to phase 0; the Trainer's
optimizer is built over every scheduled parameter, its groups kept as the template, then fitted to phase 0)
-> Accelerate wraps model (DDP) and optimizer -> ``create_scheduler`` (hook: the Trainer's scheduler is built
over phase 0's groups; a resumed run replays its saved phase here) -> the Trainer loads optimizer and scheduler
state -> ``on_train_begin`` -> per epoch: ``on_epoch_begin`` (transition when the phase ended) ...
``on_step_end`` (after each optimizer step and the scheduler's step: transition when the phase's
``max_transition_step`` is reached; one compare otherwise) ... ``on_evaluate`` (record the metric, snapshot the run's best state; the final phase's patience ends training)
... ``on_save`` (the run's state into the
checkpoint folder) -> ``on_train_end``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import TrainerCallback

from phasetune import generate, io, thaw, transitions
from phasetune.errors import ConfigurationError
from phasetune.generate import RunFacts
from phasetune.hf import settings
from phasetune.prefix_cache import PrefixCacheError
from phasetune.prefix_phases import PrefixCachePhases
from phasetune.run import PhaseRun, RunEnv, RunOptions
from phasetune.run_view import RunView
from phasetune.sharding.names import logical_name

if TYPE_CHECKING:
    from transformers import Trainer

#: the run's state in each Trainer checkpoint folder (written atomically by rank 0 after the Trainer's files)
STATE_FILE = "phasetune_state.pt"
NON_FINITE = "the monitored value is not finite"
TRAINER_STOPPED = "trainer stopped (num_train_epochs, max_steps or should_training_stop)"


class PhasetuneTrainerCallback(RunView, TrainerCallback):
    """Run a multi-phase fine-tuning schedule (gradual unfreezing) in a ``transformers.Trainer``.

    Pass it in ``callbacks=`` of a :class:`~phasetune.hf.PhasetuneTrainer` (or of a Trainer class that mixes
    in :class:`~phasetune.hf.PhasetuneTrainerMixin`). Parameter names in the schedule are the model's own
    ``named_parameters()`` (``bert.encoder.layer.5.output.dense.weight``, ``classifier.weight``).

    Args:
        schedule: YAML path or dict, validated like the Lightning callback's ``ft_schedule``; ``None``
            generates one from the model (``schedule_style``) over the run's step budget (the Trainer's step count
            for this ``train()``, ``state.max_steps``: ``max_steps``, or ``num_train_epochs`` x update steps per
            epoch) with the default settings (:func:`phasetune.recipes.default_settings`, the optimizer's lr being
            ``learning_rate`` or that of the ``optimizers=`` you pass), and writes it to
            ``output_dir/<Model>_ft_schedule.yaml`` with the budget and settings in its header.
        patience, min_delta, check_finite: phase-aware early stopping on the Trainer's
            ``metric_for_best_model`` (``greater_is_better`` gives the direction): a phase ends after
            ``patience`` evaluations without an improvement of at least ``min_delta``; a non-finite value
            ends training (``check_finite=True``). The plain loop's names and defaults.
        no_decay: parameter-name substrings whose parameters get ``weight_decay=0`` groups (not needed with
            the Trainer's own optimizer, whose decay / no-decay groups are the template of every phase).
        prefix_cache: phase index -> ``True`` / ``False`` / ``{prefix_end, limit_mb, deterministic_inputs}``: sets or
            overrides the phases' ``prefix_cache`` schedule key (cache the frozen prefix's outputs within a phase;
            see docs/prefix_cache.md). A phase that caches needs an ``IndexedDataset`` training set and
            ``remove_unused_columns=False``; spill files go under ``output_dir``.

    The other keyword arguments are the Lightning callback's and the plain loop's, with the same meaning
    and default (:class:`phasetune.run.RunOptions`). ``snapshot_storage="disk"`` writes its files under
    ``TrainingArguments.output_dir``. The thaw audit (``audit="raise"``) checks each phase at its start and after
    its first optimizer step and raises :class:`~phasetune.AuditError` naming what did not take effect; each
    group's lr goes into the Trainer's training logs as ``lr/<phase and block>`` (:meth:`lrs`).
    """

    def __init__(
        self,
        schedule: str | os.PathLike[str] | Mapping[Any, Any] | None = None,
        *,
        max_depth: int = -1,
        base_max_lr: float | None = 1e-5,
        restore_best: bool = True,
        epoch_transitions_only: bool = False,
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
        audit: str = "raise",
        audit_zero_lr: str = "fail",
        prefix_cache: Mapping[int, Any] | None = None,
    ) -> None:
        self.options = RunOptions(
            max_depth=max_depth, base_max_lr=base_max_lr, restore_best=restore_best,
            epoch_transitions_only=epoch_transitions_only, schedule_style=schedule_style,
            schedule_options=schedule_options,
            reinit_optim_cfg=reinit_optim_cfg, reinit_lr_cfg=reinit_lr_cfg,
            enforce_phase0_params=enforce_phase0_params, apply_lambdas_new_pgs=apply_lambdas_new_pgs,
            frozen_bn_track_running_stats=frozen_bn_track_running_stats, snapshot_storage=snapshot_storage,
            audit=audit, audit_zero_lr=audit_zero_lr,
        )
        problems = self.options.problems(explicit_schedule=schedule is not None)
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            problems.append(f"patience must be an integer >= 1, got {patience!r}")
        if prefix_cache is not None and not isinstance(prefix_cache, Mapping):
            problems.append(f"prefix_cache must map phase indices to True, False or {{'prefix_end': ...}} (e.g. "
                            f"{{0: True}}), got {type(prefix_cache).__name__}")
        if problems:
            raise ConfigurationError(problems)
        self.prefix_cache = dict(prefix_cache) if prefix_cache else None
        self.caches: PrefixCachePhases | None = None  # the frozen-prefix cache controller of the current train()
        self.schedule_source = schedule
        self.patience, self.min_delta, self.check_finite = patience, min_delta, check_finite
        self.no_decay = list(no_decay) if no_decay else None
        self.run: PhaseRun | None = None
        self.tracker = transitions.PatienceTracker(patience=patience, min_delta=min_delta)
        self.done = False
        self.resume_from: str | None = None  # set by the Trainer hook from train(resume_from_checkpoint=...)
        self._trainer: Trainer | None = None
        self._monitor: str | None = None
        self._stepped = False  # an optimizer step happened in this train() call (evaluations before it are not observed)
        self._prepared = False  # after_prepare ran for the current run

    # ------------------------------------------------------------------ read-only state
    @property
    def monitor(self) -> str | None:
        """The evaluation metric phases end by (``metric_for_best_model`` as the metrics dict names it)."""
        return self._monitor

    # ------------------------------------------------------------------ called by the Trainer hook
    def setup(self, trainer: Trainer, model: torch.nn.Module) -> None:
        """Build the run for this ``train()``: resolve the schedule, freeze the model to phase 0, check the
        Trainer's settings; then leave every scheduled parameter trainable until :meth:`after_prepare`, so that
        the Trainer's optimizer (its groups are the template of later phases) and DDP see all of them."""
        self._trainer = trainer
        args = trainer.args
        self._monitor = settings.metric_key(args)
        mode: Literal["min", "max"] = "max" if self._monitor and args.greater_is_better else "min"
        self.tracker = transitions.PatienceTracker(mode=mode, patience=self.patience, min_delta=self.min_delta)
        self.done, self._stepped, self._prepared = False, False, False
        # names as the model writes them, without the segments wrappers insert (activation checkpointing)
        params = {logical_name(n): p for n, p in model.named_parameters()}
        env = RunEnv(
            named_buffers=lambda: dict(model.named_buffers()),
            snapshot_dir=str(args.output_dir),
            device=next((p.device for p in params.values()), None),
            optimizer_source="the Trainer's optimizer",
        )
        self.run = PhaseRun(
            self.schedule_source, params, {n: tuple(p.shape) for n, p in params.items()}, options=self.options,
            env=env, model=model, no_decay=self.no_decay, monitor=self._monitor, mode=mode,
            facts=trainer_facts(trainer) if self.schedule_source is None else None,
        )
        if self.run.implicit is not None and args.should_save:  # the world's main process writes the file
            path = Path(args.output_dir) / f"{type(model).__name__}_ft_schedule.yaml"
            self.run.schedule.dump(path, resolved=False, header="\n".join(self.run.implicit.notes))
            env.info(f"implicit schedule ({len(self.run.schedule)} phases; {self.run.implicit.budget_line}): {path}")
        ddp = trainer.accelerator.ddp_handler
        problems = settings.trainer_problems(
            args, self.run.schedule, self.run.final_depth, restore_best=self.options.restore_best,
            epoch_transitions_only=self.options.epoch_transitions_only,
            find_unused_parameters=None if ddp is None else ddp.find_unused_parameters,
            world_size=args.world_size, fsdp=trainer.is_fsdp_enabled, deepspeed=trainer.is_deepspeed_enabled,
        )
        problems += self._prepare_caches(trainer, model)
        if problems:
            raise ConfigurationError(problems)
        for note in settings.scheduler_notes(self.run.schedule, self.run.final_depth):
            env.warn(note)
        late = settings.epochs_note(args, self.run.schedule, self.run.final_depth)
        if late:
            env.warn(late)
        # DDP registers only parameters that require grad when it wraps the model (right after this hook), and
        # the Trainer groups only those: every scheduled one is trainable until after_prepare freezes again.
        thaw.thaw(self.run.engine.params, self.run.schedule.params_through(self.run.final_depth))

    def fit_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Take later phases' parameters out of the Trainer's freshly built optimizer (its groups stay the
        template: later phases copy the hyperparameters of the group each parameter was in)."""
        assert self.run is not None
        self.run.fit_optimizer(optimizer, [], expected=True)

    def after_prepare(self, trainer: Trainer) -> None:
        """Freeze to phase 0 again, check the optimizer and scheduler, and replay a resumed run's saved phase
        (thawed set, groups, optimizer, scheduler) before the Trainer loads optimizer and scheduler state."""
        run = self.run
        assert run is not None
        if self._prepared:
            return
        self._prepared = True
        run.engine.start()  # freeze everything, thaw phase 0 (DDP has registered every scheduled parameter)
        optimizer, schedulers = self._optimizer_and_schedulers(trainer)
        first = run.first_scheduler(optimizer, schedulers)
        if first is not None:
            self._install(trainer, None, first[0])
            schedulers = [first[0]]
        problems = run.check(optimizer, schedulers)
        if problems:
            raise ConfigurationError(problems)
        if self.resume_from is None:
            return
        state = read_state(self.resume_from)
        new_opt, scheds, replaced = run.resume(state, optimizer, schedulers, where=self.resume_from)
        self._install(trainer, new_opt if new_opt is not optimizer else None, scheds[0] if replaced is not None else None)
        self.tracker.load_state_dict(state["tracker"])
        self.done = bool(state["done"])

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is None or self._trainer is None or not self._prepared:
            raise ConfigurationError(
                "PhasetuneTrainerCallback needs its Trainer hook to reach the optimizer: use "
                "phasetune.hf.PhasetuneTrainer instead of transformers.Trainer, or mix PhasetuneTrainerMixin into "
                "your Trainer class (class MyTrainer(PhasetuneTrainerMixin, Trainer))"
            )
        self.run.start(epoch=_epoch_starting(state), step=state.global_step)
        self.run.reserve_recompiles()  # a compiled model: every phase's graphs within dynamo's limit, until the end
        if self.caches is not None and not self.done:
            self.caches.enter(self.run.depth)
        if self.done:
            control.should_training_stop = True
            self.run.env.info("the schedule was already complete in the checkpoint; nothing left to train")
            return
        at_cap = self.run.begin_steps(state.global_step)  # a checkpoint saved at a step cap, before its transition
        if at_cap is not None:
            self._transition(_epoch_starting(state), state.global_step, at_cap.reason)  # audits the next phase
        else:
            self._audit("resume" if self.resume_from else "start")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._stepped = True
        decision = self.run.step_end(state.global_step)  # type: ignore[union-attr]
        if decision is not None and not self.done:
            self._transition(_epoch_done(state), state.global_step, decision.reason)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.run is not None and self._trainer is not None
        if self.done:
            return
        epoch = _epoch_starting(state)
        decision = self.run.decide(epoch, self.tracker.done)
        if decision is not None and decision.transition:
            self._transition(epoch, state.global_step, decision.reason)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Mapping[str, Any] | None = None,
                    **kwargs: Any) -> None:
        # only evaluations inside train() after a step: not eval_on_start, nor trainer.evaluate() afterwards
        if self.run is None or self._trainer is None or not self._stepped or self.done or not self.run.history:
            return
        epoch = _epoch_done(state)
        value = None if self._monitor is None else (metrics or {}).get(self._monitor)
        phase = self.run.engine.phase
        optimizer, schedulers = self._optimizer_and_schedulers(self._trainer)
        agreed = self.run.observe(value, epoch=epoch, step=state.global_step, optimizer=optimizer,
                                  schedulers=schedulers)
        if agreed is None:
            if self._monitor is not None and max(phase.max_transition_epoch, phase.max_transition_step) < 0 \
                    and not self.run.is_final:
                raise ConfigurationError(
                    f"metric_for_best_model {self._monitor!r} is not among the evaluation metrics "
                    f"({', '.join(sorted(metrics or {}))}); phase {phase.index} ends only by it: name one of them"
                )
            return
        if self.check_finite and not math.isfinite(agreed):
            self._stop(control, epoch, state.global_step, NON_FINITE)
            return
        self.tracker.update(agreed)
        if self.run.is_final:  # the final phase ends the run as soon as its patience runs out
            decision = self.run.decide(epoch + 1, self.tracker.done)
            if decision is not None and decision.stop:
                self._stop(control, epoch, state.global_step, decision.reason)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():  # every rank holds the same run state under DDP: rank 0 writes it
            io.atomic_torch_save(self.state_dict(), folder / STATE_FILE)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_caches()
        if self.run is not None:
            self.run.release()
        if self.run is None or not self.run.history or self.done:
            return
        reason = transitions.EARLY_STOPPING if self.tracker.done else TRAINER_STOPPED
        self.run.finish(epoch=math.ceil(state.epoch or 0), step=state.global_step, reason=reason)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly (the restore-best snapshot included)."""
        assert self.run is not None
        state = self.run.state_dict()
        state.update(tracker=self.tracker.state_dict(), done=self.done)
        return state

    # ------------------------------------------------------------------ helpers
    def _transition(self, epoch: int, step: int, reason: str) -> None:
        assert self.run is not None and self._trainer is not None
        optimizer, schedulers = self._optimizer_and_schedulers(self._trainer)
        self._leave_cache()  # before the next phase thaws any of the prefix
        t = self.run.transition(epoch=epoch, step=step, reason=reason, optimizer=optimizer, schedulers=schedulers)
        self._install(self._trainer, t.optimizer if t.new_optimizer else None, t.new_scheduler)
        self.tracker.start_phase()
        self._audit("transition", thawed=t.thawed)
        if self.caches is not None:
            self.caches.enter(self.run.depth)

    def _prepare_caches(self, trainer: Trainer, model: torch.nn.Module) -> list[str]:
        """Check the phases' prefix_cache settings against the model and the Trainer's settings; keep the controller
        when a phase caches. Returns the problems for the setup error."""
        assert self.run is not None
        self._close_caches()  # a previous train()'s, if it ended by an exception
        if self.prefix_cache is None and all(p.prefix_cache is None for p in self.run.schedule):
            return []
        args = trainer.args
        try:
            caches = PrefixCachePhases(self.run.schedule, model, spill_dir=args.output_dir,
                                       dataset=trainer.train_dataset, overrides=self.prefix_cache,
                                       sharded="FSDP" if trainer.is_fsdp_enabled else None,
                                       compiled=bool(args.torch_compile), info=self.run.env.info)
        except PrefixCacheError as e:
            return e.problems
        if not caches.enabled:
            caches.close()
            return []
        problems = settings.prefix_cache_problems(args, sorted(caches.prefix_ends))
        if problems:
            caches.close()
            return problems
        self.caches = caches
        return []

    def _leave_cache(self) -> None:
        """Drop the phase's prefix cache (and its spill files); its line goes into the phase's record."""
        if self.caches is not None and self.run is not None:
            self.caches.leave(self.run.history)

    def _close_caches(self) -> None:
        if self.caches is not None:
            self._leave_cache()
            self.caches.close()
            self.caches = None

    def _audit(self, stage: str, thawed: list[str] | None = None) -> None:
        """Audit the phase as installed (a collective): the Trainer's optimizer and scheduler, the wrapped model."""
        assert self.run is not None and self._trainer is not None
        optimizer, schedulers = self._optimizer_and_schedulers(self._trainer)
        self.run.audit_phase(optimizer, schedulers, stage=stage, thawed=thawed, model=self._trainer.model_wrapped)

    def lrs(self) -> dict[str, float]:
        """Each optimizer group's lr by a readable name, its phase and blocks (``phase1/bert.encoder.layer.1``); the
        Trainer hook adds them to every training log as ``lr/<name>``."""
        if self.run is None or self._trainer is None or self._trainer.optimizer is None:
            return {}
        return self.run.lrs(unwrap_optimizer(self._trainer.optimizer))

    def _stop(self, control: Any, epoch: int, step: int, reason: str) -> None:
        assert self.run is not None
        self.done = True
        control.should_training_stop = True
        self._leave_cache()
        self.run.finish(epoch=epoch + 1, step=step, reason=reason)
        self.run.env.info(f"final phase {self.run.depth} ended after epoch {epoch} ({reason})" if self.run.is_final
                          else f"training ended after epoch {epoch} ({reason})")

    @staticmethod
    def _optimizer_and_schedulers(trainer: Trainer) -> tuple[torch.optim.Optimizer, list[Any]]:
        return unwrap_optimizer(trainer.optimizer), [trainer.lr_scheduler] if trainer.lr_scheduler is not None else []

    @staticmethod
    def _install(trainer: Trainer, optimizer: torch.optim.Optimizer | None, scheduler: Any) -> None:
        """Give the Trainer (and the callback handler, which passes them to callbacks) a phase's new optimizer
        or lr scheduler; a new optimizer is wrapped by Accelerate like the Trainer's own."""
        if optimizer is not None:
            trainer.optimizer = trainer.accelerator.prepare_optimizer(optimizer)
            trainer.callback_handler.optimizer = trainer.optimizer
        if scheduler is not None:
            trainer.lr_scheduler = scheduler
            trainer.callback_handler.lr_scheduler = scheduler


def trainer_facts(trainer: Trainer) -> RunFacts:
    """The Trainer's step count for this ``train()`` (``state.max_steps``, computed before the optimizer is built)
    and the lr and group count of the optimizer it will build (or of the ``optimizers=`` passed to it)."""
    args = trainer.args
    given = trainer.optimizer
    if given is not None:
        first = unwrap_optimizer(given).param_groups[0]
        lr, groups = float(first.get("initial_lr", first["lr"])), len(unwrap_optimizer(given).param_groups)
    else:  # the Trainer's create_optimizer builds a weight-decay and a no-decay group at learning_rate
        lr, groups = float(args.learning_rate), 2
    steps = int(getattr(trainer.state, "max_steps", 0) or 0)
    if steps <= 0:
        return RunFacts(no_budget="the Trainer has not computed its step count: set TrainingArguments.max_steps",
                        optimizer_lr=lr, optimizer_groups=groups)
    if args.max_steps > 0:
        source = f"TrainingArguments(max_steps={args.max_steps}) (Trainer.state.max_steps)"
    else:
        source = (f"TrainingArguments(num_train_epochs={args.num_train_epochs:g}) x the update steps per epoch "
                  f"(gradient_accumulation_steps={args.gradient_accumulation_steps}) (Trainer.state.max_steps)")
    return RunFacts(total_steps=steps, budget_source=source, optimizer_lr=lr, optimizer_groups=groups)


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer`` (the one phasetune regroups)."""
    from accelerate.optimizer import AcceleratedOptimizer

    return optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer


def read_state(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The run state saved in a Trainer checkpoint folder, or a one-line error saying why there is none."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise ConfigurationError(
            f"cannot resume from {checkpoint}: it holds no {STATE_FILE} (it was saved by a Trainer without "
            "PhasetuneTrainerCallback, or the run stopped while saving). To start a schedule from its weights, load "
            "them (from_pretrained on that folder) and call train() without resume_from_checkpoint"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def _epoch_starting(state: Any) -> int:
    """The epoch about to run (``state.epoch`` is fractional: completed epochs plus the share of the current)."""
    return math.floor(state.epoch or 0)


def _epoch_done(state: Any) -> int:
    """The epoch being trained or just finished, at an evaluation or an epoch end."""
    return max(math.ceil(state.epoch or 0) - 1, 0)


__all__ = ["STATE_FILE", "PhasetuneTrainerCallback", "read_state", "unwrap_optimizer"]
