"""Scheduled fine-tuning in your own loop with Hugging Face Accelerate.

:class:`AcceleratedFinetuning` is a :class:`~phasetune.run.Host` of :class:`~phasetune.run.PhaseRun` around an
``accelerate.Accelerator``. Give it the model, optimizer and lr scheduler *before* ``accelerator.prepare``: it freezes
the model to phase 0 and fits the optimizer first (DDP registers only the parameters that require grad when it is
built), then prepares them. Train with ``ft.model``, ``ft.optimizer``, ``ft.lr_scheduler``: a transition may replace
each (a new optimizer or scheduler, and DDP rebuilt over the thawed parameters, all through ``accelerator.prepare``)::

    ft = AcceleratedFinetuning("schedule.yaml", accelerator, model, optimizer, lr_scheduler)
    for epoch in range(max_epochs):
        for x, y in loader:                               # loader = accelerator.prepare(loader)
            accelerator.backward(loss_fn(ft.model(x), y))
            ft.optimizer.step(); ft.lr_scheduler.step(); ft.optimizer.zero_grad()
            ft.step_end()                                 # a max_transition_step may thaw the next phase here
        ft.step(epoch, metric=validate(ft.model))         # or here (max_transition_epoch, early stopping)
        if ft.done:
            break

``accelerator.save_state(dir)`` writes phasetune's state (``phasetune_state.pt``) with Accelerate's, and
``accelerator.load_state(dir)`` rebuilds the saved phase before Accelerate loads the optimizer and scheduler state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from phasetune.core.engine import Transition
from phasetune.errors import ConfigurationError
from phasetune.run import Patience, PhaseRun, RunEnv, RunOptions, RunView

STATE_FILE = "phasetune_state.pt"
METRIC_HINT = "pass metric=... to step() (e.g. the validation loss), or set one of them in the phase"
#: Accelerate's modes that shard the model or own the optimizer; phasetune re-wraps only DDP
UNSUPPORTED = ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA")


class AcceleratedFinetuning(RunView):
    """Run a fine-tuning schedule over ``model``, ``optimizer`` and ``lr_scheduler`` (not yet prepared) in a loop
    that ``accelerator`` runs. ``schedule``, ``options`` (or its fields as keywords), ``mode``, ``patience``,
    ``min_delta``, ``check_finite`` and ``no_decay`` are :class:`~phasetune.loop.ScheduledFinetuning`'s."""

    def __init__(self, schedule: str | Mapping[Any, Any], accelerator: Accelerator, model: nn.Module,
                 optimizer: Optimizer, lr_scheduler: Any = None, *, options: RunOptions | None = None,
                 mode: Literal["min", "max"] = "min", patience: int = 3, min_delta: float = 0.0,
                 check_finite: bool = True, no_decay: Sequence[str] | None = None, **knobs: Any) -> None:
        options = RunOptions.merged(options, knobs, type(self).__init__)
        problems = options.problems(explicit_schedule=True) + Patience.problems(patience, mode)
        problems += input_problems(schedule, accelerator, model, optimizer, lr_scheduler)
        if problems:
            raise ConfigurationError(problems)
        self.accelerator, self.model, self.optimizer, self.lr_scheduler = accelerator, model, optimizer, lr_scheduler
        self.global_step, self._epoch, self._prepared = 0, 0, False  # optimizer steps; the epoch being trained
        params = dict(model.named_parameters())
        env = RunEnv(named_buffers=lambda: dict(model.named_buffers()), device=accelerator.device)  # rank 0 saves
        self.run = PhaseRun(schedule, params, {n: tuple(p.shape) for n, p in params.items()}, options=options,
                            env=env, model=model, no_decay=no_decay, mode=mode)
        self.run.patience = Patience(patience, min_delta, check_finite, mode)
        self.run.prepare(self, expected=True)  # frozen to phase 0, the optimizer fitted, phase 0's lr scheduler
        held = accelerator.prepare(model, self.optimizer, *[s for s in [self.lr_scheduler] if s is not None])
        self.model, self.optimizer, self.lr_scheduler = (*held, None)[:3]
        self._prepared = True
        accelerator.register_save_state_pre_hook(lambda models, weights, out: accelerator.save(
            self.state_dict(), Path(out) / STATE_FILE))  # the main process writes it
        accelerator.register_load_state_pre_hook(self._load_hook)
        self.run.begin(self, epoch=0, step=0, reserve=False)
        self.run.begin_training(self, epoch=0, step=0)

    # ------------------------------------------------------------------ the Host
    def optimizer_and_schedulers(self) -> tuple[Optimizer, list[Any]]:
        opt, sched = self.optimizer, self.lr_scheduler
        return (opt.optimizer if isinstance(opt, AcceleratedOptimizer) else opt,
                [] if sched is None else [sched.scheduler if isinstance(sched, AcceleratedScheduler) else sched])

    def install(self, *, optimizer: Optimizer | None, scheduler: Any, scheduler_cfg: Any, thawed: bool) -> None:
        if optimizer is not None:
            self.optimizer = self._prepare(optimizer)
        if scheduler is not None:
            self.lr_scheduler = self._prepare(scheduler, old=self.lr_scheduler)
        if thawed and any(isinstance(m, DistributedDataParallel) for m in self.model.modules()):
            self.model = self._prepare(self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False,
                                                                     keep_torch_compile=False))

    def trained_model(self) -> nn.Module:
        return self.model

    def _prepare(self, new: Any, old: Any = None) -> Any:
        """``new`` through ``accelerator.prepare``, in the place of what it replaces in the lists ``save_state`` and
        ``load_state`` number their files by (Accelerate appends it; it has no public call to drop one)."""
        if not self._prepared:
            return new
        prepared = self.accelerator.prepare(new)
        old = self.optimizer if isinstance(prepared, AcceleratedOptimizer) else old
        for held in (self.accelerator._models, self.accelerator._optimizers, self.accelerator._schedulers):
            if len(held) > 1 and any(held[-1] is x for x in (prepared, new)):
                last = held.pop()  # a re-wrapped model's module is held once already (Accelerate holds it unwrapped)
                at = next((i for i, x in enumerate(held) if x is old or x is last), None)
                if at is None:
                    held.append(last)
                else:
                    held[at] = last
        return prepared

    # ------------------------------------------------------------------ the loop's calls
    @property
    def done(self) -> bool:
        """The run has ended (the final phase's patience, or a non-finite metric)."""
        return self.run.patience.stopped  # type: ignore[union-attr]

    def lrs(self) -> dict[str, float]:
        """Each optimizer group's lr by a readable name (``phase1/layers.2-3``): log them as ``lr/<name>``."""
        return self.run.lrs(self.optimizer_and_schedulers()[0])

    def step_end(self) -> Transition | None:
        """After each ``ft.optimizer.step()`` (and the lr scheduler's): the Transition at a ``max_transition_step``,
        else None. Calls while Accelerate accumulates gradients (not ``accelerator.sync_gradients``) count no step."""
        if not self.accelerator.sync_gradients or self.done:
            return None
        self.global_step += 1
        decision = self.run.step_end(self.global_step)
        return None if decision is None else self.run.advance(self, epoch=self._epoch, step=self.global_step,
                                                              reason=decision.reason)

    def step(self, epoch: int, metric: float | torch.Tensor | None = None) -> Transition | None:
        """The end of ``epoch`` (0-based) and the monitored value after it (every rank calls it; rank 0's value
        decides): the Transition when the next phase starts with epoch ``epoch + 1``, else None; may set :attr:`done`."""
        if self.done:
            return None
        self._epoch = epoch + 1
        decision = self.run.end_evaluation(self, metric, epoch=epoch, step=self.global_step, next_epoch=epoch + 1,
                                           how_to_report=METRIC_HINT)
        return None if decision is None else decision.applied

    def close(self) -> None:
        """End a run that stopped before ``done``: remove the audit's hooks."""
        self.run.close()

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The run's state (Accelerate's ``save_state`` keeps the random state and the loaders' own)."""
        return {**self.run.state_dict(), "global_step": self.global_step, "epoch": self._epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a saved run: replay its transitions (thaw, groups, optimizer, scheduler, DDP) and bookkeeping,
        before the optimizer and scheduler state is loaded (``accelerator.load_state`` calls it first)."""
        if self.run.depth != 0 or len(self.run.history) != 1 or self.run.history[0].end_epoch is not None:
            raise ConfigurationError("load_state needs an AcceleratedFinetuning that has not transitioned yet; build "
                                     "a new one (with a new model, optimizer and Accelerator) to resume")
        self.run.restore(self, state, audit=True)
        self.global_step, self._epoch = int(state["global_step"]), int(state["epoch"])
        self.run.begin_training(self, epoch=self._epoch, step=self.global_step)

    def _load_hook(self, models: list[nn.Module], input_dir: str) -> None:
        path = Path(input_dir) / STATE_FILE
        if not path.is_file():
            raise ConfigurationError(f"{input_dir} has no {STATE_FILE}: it was not saved by accelerator.save_state "
                                     "with an AcceleratedFinetuning; resume from a folder that was")
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def input_problems(schedule: Any, accelerator: Any, model: Any, optimizer: Any, lr_scheduler: Any) -> list[str]:
    """What is wrong with :class:`AcceleratedFinetuning`'s objects, each named with how to fix it."""
    found = [] if schedule is not None else ["schedule is required (a YAML path or dict); `phasetune schedule "
                                             "generate --recipe lpft ...` writes one"]
    before = "pass it before accelerator.prepare: AcceleratedFinetuning freezes the model to phase 0 and then prepares"
    if not isinstance(accelerator, Accelerator):
        found.append(f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}")
    elif accelerator.distributed_type.name in UNSUPPORTED:
        found.append(f"accelerator runs {accelerator.distributed_type.name}, which shards the model or owns the "
                     "optimizer; AcceleratedFinetuning supports one process and DDP (multi-GPU, multi-CPU)")
    for name, value, kind, wrapped in (("model", model, nn.Module, DistributedDataParallel),
                                       ("optimizer", optimizer, Optimizer, AcceleratedOptimizer)):
        if isinstance(value, wrapped) or getattr(value, "_is_accelerate_prepared", False):
            found.append(f"{name} was already prepared by Accelerate; {before} (DDP registers only the parameters "
                         "that require grad when it is built)")
        elif not isinstance(value, kind):
            found.append(f"{name} must be a {kind.__module__}.{kind.__name__}, got {type(value).__name__}")
    if isinstance(lr_scheduler, AcceleratedScheduler):
        found.append(f"lr_scheduler was already prepared by Accelerate; {before}")
    return found


__all__ = ["STATE_FILE", "AcceleratedFinetuning", "input_problems"]
