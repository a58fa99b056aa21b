"""PhasetuneTrainerCallback: a fine-tuning schedule under the Hugging Face ``transformers.Trainer``.

A :class:`~phasetune.run.Host` of :class:`~phasetune.run.PhaseRun`, which drives the run. The Trainer builds its
optimizer and lr scheduler inside ``train()`` and loads their checkpoint state before any callback event, so the
callback is called at those moments by the Trainer hook of :mod:`phasetune.hf.trainer`; docs/hf_trainer.md gives
the order of events in ``train()``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import TrainerCallback

from phasetune.core.generate import RunFacts
from phasetune.core.transitions import EARLY_STOPPING
from phasetune.errors import ConfigurationError
from phasetune.hf import settings
from phasetune.loop.accelerated import unwrap_optimizer
from phasetune.run import Patience, PhaseRun, RunEnv, RunOptions, RunView, model_params, prefix_cache_problems
from phasetune.run.files import STATE_FILE, read_state_file, save_state_file, write_implicit_schedule
from phasetune.run.lora_glue import base_weights_state, inject_adapters, load_base_weights
from phasetune.run.memory_check import check_trainer_memory

if TYPE_CHECKING:
    from transformers import Trainer

TRAINER_STOPPED = "trainer stopped (num_train_epochs, max_steps or should_training_stop)"


class PhasetuneTrainerCallback(RunView, TrainerCallback):
    """Run a multi-phase fine-tuning schedule (gradual unfreezing) in a ``transformers.Trainer``.

    Pass it in ``callbacks=`` of a :class:`~phasetune.hf.PhasetuneTrainer` (or of a Trainer class that mixes in
    :class:`~phasetune.hf.PhasetuneTrainerMixin`). Schedule names are the model's own ``named_parameters()``.

    Args:
        schedule: YAML path or dict; ``None`` generates one from the model over the Trainer's step count for this
            ``train()`` (``state.max_steps``) and writes it to ``output_dir/<Model>_ft_schedule.yaml``.
        options: the knobs every front end shares (:class:`phasetune.RunOptions`); each may also be given as a
            keyword of its own name, overriding ``options``. ``snapshot_storage="disk"`` writes under
            ``output_dir``; the thaw audit raises :class:`~phasetune.AuditError` naming what did not take effect.
        patience, min_delta, check_finite: phase-aware early stopping on ``metric_for_best_model``
            (``greater_is_better`` gives the direction; :class:`phasetune.run.Patience`).
        no_decay: parameter-name substrings whose parameters get ``weight_decay=0`` groups.
        prefix_cache: phase index -> ``True`` / ``False`` / ``{prefix_end, limit_mb, deterministic_inputs}``
            (docs/prefix_cache.md): needs an ``IndexedDataset`` and ``remove_unused_columns=False``.
    """

    def __init__(self, schedule: str | os.PathLike[str] | Mapping[Any, Any] | None = None, *,
                 options: RunOptions | None = None, patience: int = 3, min_delta: float = 0.0,
                 check_finite: bool = True, no_decay: Sequence[str] | None = None,
                 prefix_cache: Mapping[int, Any] | None = None, **knobs: Any) -> None:
        self.options = RunOptions.merged(options, knobs, type(self).__init__)
        problems = self.options.problems(explicit_schedule=schedule is not None) + Patience.problems(patience)
        problems += prefix_cache_problems(prefix_cache)
        if problems:
            raise ConfigurationError(problems)
        self.schedule_source, self.no_decay = schedule, list(no_decay) if no_decay else None
        self.prefix_cache = dict(prefix_cache) if prefix_cache else None
        self.patience_args = (patience, min_delta, check_finite)
        self.run: PhaseRun | None = None
        self.resume_from: str | None = None  # set by the Trainer hook from train(resume_from_checkpoint=...)
        self._trainer: Trainer | None = None
        self._monitor: str | None = None
        self._stepped = False  # an optimizer step happened in this train() (evaluations before it are not observed)
        self._prepared = False  # after_prepare ran for the current run

    @property
    def monitor(self) -> str | None:
        """The evaluation metric phases end by (``metric_for_best_model`` as the metrics dict names it)."""
        return self._monitor

    @property
    def done(self) -> bool:
        """The run has ended (the final phase's patience, or a non-finite metric)."""
        return self.run is not None and self.run.patience.stopped  # type: ignore[union-attr]

    # ------------------------------------------------------------------ called by the Trainer hook
    def setup(self, trainer: Trainer, model: torch.nn.Module) -> None:
        """Build the run for this ``train()`` and check the Trainer's settings; then leave every scheduled parameter
        trainable until :meth:`after_prepare`, so that the Trainer's optimizer (the template) and DDP see them."""
        self._trainer, args = trainer, trainer.args
        self._monitor = settings.metric_key(args)
        mode: Literal["min", "max"] = "max" if self._monitor and args.greater_is_better else "min"
        self._stepped = self._prepared = False
        if self.run is not None:
            self.run.close()  # a previous train()'s, if it ended by an exception
        inject_adapters(model, self.schedule_source)  # done by train() already, unless model_init built this model
        env = RunEnv.of_model(model, snapshot_dir=str(args.output_dir), optimizer_source="the Trainer's optimizer")
        self.run = run = PhaseRun(
            self.schedule_source, *model_params(model), options=self.options, env=env, model=model,
            no_decay=self.no_decay, monitor=self._monitor, mode=mode,
            facts=trainer_facts(trainer) if self.schedule_source is None else None)
        run.patience = Patience(*self.patience_args, mode=mode)
        if args.should_save:  # the world's main process writes an implicit schedule's file
            write_implicit_schedule(run, Path(args.output_dir) / f"{type(model).__name__}_ft_schedule.yaml", env.info)
        ddp = trainer.accelerator.ddp_handler
        problems = settings.trainer_problems(
            args, run.schedule, run.final_depth, restore_best=self.options.restore_best,
            epoch_transitions_only=self.options.epoch_transitions_only, world_size=args.world_size,
            find_unused_parameters=None if ddp is None else ddp.find_unused_parameters,
            fsdp=trainer.is_fsdp_enabled, deepspeed=trainer.is_deepspeed_enabled)
        problems += run.use_prefix_cache(model, self.prefix_cache, spill_dir=args.output_dir,
                                         dataset=trainer.train_dataset, compiled=bool(args.torch_compile),
                                         sharded="FSDP" if trainer.is_fsdp_enabled else None)
        if run.caches is not None:
            problems += settings.prefix_cache_problems(args, sorted(run.caches.prefix_ends))
        if problems:
            run.close()
            raise ConfigurationError(problems)
        for note in [*settings.scheduler_notes(run.schedule, run.final_depth),
                     settings.epochs_note(args, run.schedule, run.final_depth)]:
            if note:
                env.warn(note)
        run.thaw_every_phase()  # DDP registers (and the Trainer groups) only parameters that require grad

    def fit_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Take later phases' parameters out of the Trainer's freshly built optimizer (its groups stay the
        template: later phases copy the hyperparameters of the group each parameter was in)."""
        self.run.fit_optimizer(optimizer, [], expected=True)  # type: ignore[union-attr]

    def after_prepare(self, trainer: Trainer) -> None:
        """Freeze to phase 0 again, check optimizer and scheduler, and replay a resumed run's saved phase before
        the Trainer loads optimizer and scheduler state."""
        if self._prepared:
            return
        self._prepared = True
        self.run.prepare(self, fitted=True, refreeze=True)  # type: ignore[union-attr]
        if self.resume_from is not None:
            state = read_state(self.resume_from)
            if "lora_base" in state:  # the base weights a PeftModel's checkpoint (its adapters only) does not hold
                load_base_weights(self.run, state["lora_base"])  # type: ignore[arg-type]
            self.run.restore(self, state, where=self.resume_from)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ the Host
    def optimizer_and_schedulers(self) -> tuple[torch.optim.Optimizer, list[Any]]:
        t = self._trainer
        return unwrap_optimizer(t.optimizer), [t.lr_scheduler] if t.lr_scheduler is not None else []  # type: ignore[union-attr]

    def install(self, *, optimizer: torch.optim.Optimizer | None, scheduler: Any, scheduler_cfg: Any,
                thawed: bool) -> None:
        """A phase's new optimizer (wrapped by Accelerate like the Trainer's own) or lr scheduler, given to the
        Trainer and the callback handler (which passes them to callbacks); DDP registered every phase already."""
        t = self._trainer
        if optimizer is not None:
            t.optimizer = t.callback_handler.optimizer = t.accelerator.prepare_optimizer(optimizer)  # type: ignore[union-attr]
        if scheduler is not None:
            t.lr_scheduler = t.callback_handler.lr_scheduler = scheduler  # type: ignore[union-attr]

    def trained_model(self) -> torch.nn.Module:
        return self._trainer.model_wrapped  # type: ignore[union-attr]

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is None or self._trainer is None or not self._prepared:
            raise ConfigurationError(
                "PhasetuneTrainerCallback needs its Trainer hook to reach the optimizer: use "
                "phasetune.hf.PhasetuneTrainer instead of transformers.Trainer, or mix PhasetuneTrainerMixin into "
                "your Trainer class (class MyTrainer(PhasetuneTrainerMixin, Trainer))")
        check_trainer_memory(self.run, self._trainer)  # options.memory_check: raises before any step if a phase won't fit
        epoch = _epoch_starting(state)
        self.run.begin(self, epoch=epoch, step=state.global_step, resumed=self.resume_from is not None)
        if not self.run.begin_training(self, epoch=epoch, step=state.global_step):
            control.should_training_stop = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._stepped = True
        decision = self.run.step_end(state.global_step)  # type: ignore[union-attr]
        if decision is not None and not self.done:
            self.run.advance(self, epoch=_epoch_done(state), step=state.global_step, reason=decision.reason)  # type: ignore[union-attr]

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is not None and not self.done:
            self.run.start_epoch(self, epoch=_epoch_starting(state), step=state.global_step)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Mapping[str, Any] | None = None,
                    **kwargs: Any) -> None:
        # only evaluations inside train() after a step: not eval_on_start, nor trainer.evaluate() afterwards
        if self.run is None or self._trainer is None or not self._stepped or self.done or not self.run.history:
            return
        epoch, found = _epoch_done(state), metrics or {}
        hint = None if self._monitor is None else (f"metric_for_best_model {self._monitor!r} is not among the "
                                                   f"evaluation metrics ({', '.join(sorted(found))}); name one")
        decision = self.run.end_evaluation(  # the final phase ends the run as soon as its patience runs out
            self, found.get(self._monitor) if self._monitor else None, epoch=epoch, step=state.global_step,
            next_epoch=epoch + 1 if self.run.is_final else None, how_to_report=hint)
        if decision is not None and decision.stop:
            control.should_training_stop = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.run is not None and state.is_world_process_zero and folder.is_dir():  # rank 0 writes for all
            saved = self.state_dict()
            if self.run.lora is not None and _saves_adapters_only(self._trainer.model):  # type: ignore[union-attr]
                saved["lora_base"] = base_weights_state(self.run)  # base weights the run trained or merged into
            save_state_file(saved, folder)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is None:
            return
        if self.run.history and not self.done:
            reason = EARLY_STOPPING if self.run.patience.done else TRAINER_STOPPED  # type: ignore[union-attr]
            self.run.finish(epoch=math.ceil(state.epoch or 0), step=state.global_step, reason=reason)
        self.run.close()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly (the restore-best snapshot and the patience included)."""
        return self.run.state_dict()  # type: ignore[union-attr]

    def lrs(self) -> dict[str, float]:
        """Each optimizer group's lr by a readable name (``phase1/bert.encoder.layer.1``), for the training logs."""
        if self.run is None or self._trainer is None or self._trainer.optimizer is None:
            return {}
        return self.run.lrs(unwrap_optimizer(self._trainer.optimizer))


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


def read_state(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The run state saved in a Trainer checkpoint folder, or a one-line error saying why there is none."""
    return read_state_file(checkpoint, missing=(
        "it was saved by a Trainer without PhasetuneTrainerCallback, or the run stopped while saving. To start a "
        "schedule from its weights, load them (from_pretrained on that folder) and call train() without "
        "resume_from_checkpoint"))


def _saves_adapters_only(model: Any) -> bool:
    """The Trainer saves a ``PeftModel`` as its adapters only (base weights a phase trained would be lost)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _epoch_starting(state: Any) -> int:
    """The epoch about to run (``state.epoch`` is fractional: completed epochs plus the share of the current)."""
    return math.floor(state.epoch or 0)


def _epoch_done(state: Any) -> int:
    """The epoch being trained or just finished, at an evaluation or an epoch end."""
    return max(math.ceil(state.epoch or 0) - 1, 0)


__all__ = ["STATE_FILE", "PhasetuneTrainerCallback", "read_state", "unwrap_optimizer"]
