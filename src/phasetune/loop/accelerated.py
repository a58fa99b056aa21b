"""Scheduled fine-tuning in your own Hugging Face Accelerate loop (docs/accelerate.md).

:class:`AcceleratedFinetuning` is the plain loop's :class:`~phasetune.loop.ScheduledFinetuning` (the same calls:
``step_end()`` after each optimizer step, ``step(epoch, metric=...)`` after each evaluation, ``done``) with an
``accelerate.Accelerator`` as the :class:`~phasetune.run.Host`: it freezes the model to phase 0 before
``accelerator.prepare`` (DDP registers only the parameters that require grad when it is built), passes a transition's
optimizer, lr scheduler and rebuilt DDP through ``prepare``, and saves its state with ``save_state`` / ``load_state``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim import Optimizer

from phasetune.core.engine import Transition
from phasetune.errors import ConfigurationError
from phasetune.loop import finetuning, run_facts
from phasetune.run import Patience, PhaseRun, RunEnv, RunOptions, inject_adapters, model_params
from phasetune.run.files import STATE_FILE, read_state_file, save_state_file, write_implicit_schedule

UNSUPPORTED = ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA")  # they shard the model or own the optimizer


class AcceleratedFinetuning(finetuning.ScheduledFinetuning):
    """A schedule over ``model``, ``optimizer`` and ``lr_scheduler`` given *before* ``accelerator.prepare`` (which this
    calls): train with ``ft.model``, ``ft.optimizer``, ``ft.lr_scheduler``, which a transition may replace. Arguments:
    :class:`~phasetune.loop.ScheduledFinetuning`'s; ``schedule=None`` generates one over ``total_steps`` optimizer steps."""

    def __init__(self, schedule: str | Mapping[Any, Any] | None, accelerator: Accelerator, model: nn.Module,
                 optimizer: Optimizer, lr_scheduler: Any = None, *, options: RunOptions | None = None,
                 mode: Literal["min", "max"] = "min", patience: int = 3, min_delta: float = 0.0, check_finite: bool = True,
                 no_decay: Sequence[str] | None = None, total_steps: int | None = None, **knobs: Any) -> None:
        options = RunOptions.merged(options, knobs, type(self).__init__)
        problems = options.problems(explicit_schedule=schedule is not None) + Patience.problems(patience, mode)
        if problems := problems + input_problems(schedule, total_steps, accelerator, model, optimizer, lr_scheduler):
            raise ConfigurationError(problems)
        self.accelerator, self.train_loader, self.global_step, self._epoch = accelerator, None, None, 0
        inject_adapters(model, schedule)  # the LoRA adapters a peft section asks for, before DDP wraps the model
        facts = None if schedule is not None else run_facts.loop_facts(optimizer, total_steps, who=type(self).__name__,
                                                                       takes_epochs=False)  # a warning without one
        self.run = PhaseRun(schedule, *model_params(model), options=options, model=model, no_decay=no_decay, mode=mode,
                            env=RunEnv.of_model(model, device=accelerator.device), facts=facts)  # frozen to phase 0
        self.run.patience = Patience(patience, min_delta, check_finite, mode)
        write_implicit_schedule(self.run, None, self.run.env.info)  # says the generated schedule's budget, if any
        run_facts.check_accelerator(self.run, model, optimizer, accelerator)  # memory_check; lr schedulers' stepping
        self.model, self.optimizer, *self.schedulers = accelerator.prepare(model, optimizer, *[s for s in [lr_scheduler] if s is not None])
        self.run.prepare(self, expected=True)  # the optimizer fitted to phase 0, phase 0's lr scheduler
        accelerator.register_save_state_pre_hook(  # rank 0's state, as Lightning saves it; written atomically
            lambda _, __, out: save_state_file(self.state_dict(), out) if accelerator.is_main_process else None)
        accelerator.register_load_state_pre_hook(lambda _, folder: self.load_state_dict(read_state(folder)))
        self.run.begin(self, epoch=0, step=0, reserve=False)
        self.run.begin_training(self, epoch=0, step=0)

    def optimizer_and_schedulers(self) -> tuple[Optimizer, list[Any]]:
        return unwrap_optimizer(self.optimizer), [s.scheduler if isinstance(s, AcceleratedScheduler) else s for s in self.schedulers]

    def install(self, *, optimizer: Optimizer | None, scheduler: Any, scheduler_cfg: Any, thawed: bool) -> None:
        if optimizer is not None:
            self.optimizer = self._prepare(optimizer, self.optimizer)
        if scheduler is not None:
            self.schedulers = [self._prepare(scheduler, self.lr_scheduler)]
        if thawed and any(isinstance(m, DDP) for m in self.model.modules()):  # a new DDP over the trainable ones
            module = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False, keep_torch_compile=False)
            self.model = self._prepare(module, module)  # Accelerate holds a DDP's module, not the DDP

    def _prepare(self, new: Any, old: Any) -> Any:
        """``accelerator.prepare(new)`` in ``old``'s place in the lists whose order names ``save_state``'s files
        (Accelerate appends it and has no public call to drop ``old``)."""
        prepared = self.accelerator.prepare(new)
        for held in (self.accelerator._models, self.accelerator._optimizers, self.accelerator._schedulers):
            at = next((i for i, x in enumerate(held[:-1]) if x is old), None)
            if at is not None and held[-1] in (prepared, new):
                held[at] = held.pop()
        return prepared

    def step_end(self, global_step: int | None = None) -> Transition | None:
        """:meth:`ScheduledFinetuning.step_end`; no step while Accelerate accumulates (not ``sync_gradients``)."""
        return super().step_end(global_step) if self.accelerator.sync_gradients else None

    def state_dict(self) -> dict[str, Any]:
        """The run's state (``save_state`` keeps the random state and the prepared data loaders' own)."""
        return {**self.run.state_dict(), "global_step": self.global_step, "epoch": self._epoch}


def read_state(folder: str) -> dict[str, Any]:
    """The run's state in a ``save_state`` folder, or a one-line error saying why there is none."""
    return read_state_file(folder, missing="save_state of an Accelerator with an AcceleratedFinetuning writes it")


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer`` (the one phasetune regroups)."""
    return optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer


def input_problems(schedule: Any, total_steps: Any, accelerator: Any, model: Any, optimizer: Any,
                   lr_scheduler: Any) -> list[str]:
    """What is wrong with :class:`AcceleratedFinetuning`'s arguments, each with how to fix it."""
    found = run_facts.budget_problems(schedule, total_steps, None)
    mode = getattr(getattr(accelerator, "distributed_type", None), "name", None)
    if not isinstance(accelerator, Accelerator) or mode in UNSUPPORTED:
        found.append(f"accelerator must be an accelerate.Accelerator on one process or DDP, got "
                     f"{type(accelerator).__name__}" + (f" running {mode}" if mode in UNSUPPORTED else ""))
    for name, value, kind, what in (("model", model, nn.Module, "a torch.nn.Module"), ("optimizer", optimizer,
                                    Optimizer, "a torch.optim.Optimizer"), ("lr_scheduler", lr_scheduler, object, "")):
        if isinstance(value, (DDP, AcceleratedOptimizer, AcceleratedScheduler)) or hasattr(value, "_is_accelerate_prepared"):
            found.append(f"{name} was already prepared by Accelerate; pass it before accelerator.prepare (phasetune "
                         "freezes the model to phase 0 first: DDP registers only the parameters that require grad)")
        elif not isinstance(value, kind):
            found.append(f"{name} must be {what}, got {type(value).__name__}")
    return found


__all__ = ["STATE_FILE", "AcceleratedFinetuning", "input_problems", "read_state", "unwrap_optimizer"]
