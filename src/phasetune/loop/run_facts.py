"""What an implicit schedule of the plain loop is generated from, what is wrong with the budget arguments, and what
the memory check at construction knows of the run (:func:`loop_shape`, :func:`accelerator_shape`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from phasetune.core.generate import RunFacts
from phasetune.run.memory_check import RunShape, check_memory, loader_shape, noted_shape
from phasetune.util import dist


def loop_facts(optimizer: Optimizer, total_steps: int | None, max_epochs: int | None = None, train_loader: Any = None,
               *, who: str = "ScheduledFinetuning", takes_epochs: bool = True) -> RunFacts:
    """What an implicit schedule of a loop is generated from: the budget (``total_steps``, or ``max_epochs`` x the
    loader's length where the front end ``who`` takes epochs) and the optimizer's lr and group count."""
    first = optimizer.param_groups[0]
    lr, groups = float(first.get("initial_lr", first["lr"])), len(optimizer.param_groups)
    if total_steps is not None:
        return RunFacts(total_steps, f"{who}(total_steps={total_steps})", optimizer_lr=lr, optimizer_groups=groups)
    if not takes_epochs:
        return RunFacts(no_budget=f"{who} got no total_steps: pass total_steps=N (the run's optimizer steps)",
                        optimizer_lr=lr, optimizer_groups=groups)
    batches = None
    if max_epochs is not None and train_loader is not None:
        try:
            batches = len(train_loader)
        except TypeError:  # an iterable without a length
            batches = None
    if max_epochs is not None and batches:
        return RunFacts(max_epochs * batches, f"{who}(max_epochs={max_epochs}) x len(train_loader)="
                        f"{batches}", optimizer_lr=lr, optimizer_groups=groups)
    why = ("max_epochs is given but train_loader has no length" if max_epochs is not None
           else f"{who} got neither total_steps nor max_epochs")
    return RunFacts(no_budget=f"{why}: pass total_steps=N (the run's optimizer steps), or max_epochs with a "
                    "train_loader that has a length", optimizer_lr=lr, optimizer_groups=groups)


def budget_problems(schedule: Any, total_steps: Any, max_epochs: Any) -> list[str]:
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


def check_loop_memory(run: Any, model: nn.Module, optimizer: Optimizer, train_loader: Any) -> None:
    """The memory check of a plain loop's run (:func:`phasetune.run.memory_check.check_memory`), at construction."""
    check_memory(run, model, optimizer, loop_shape(model, train_loader, run.env.device))


def check_accelerator(run: Any, model: nn.Module, optimizer: Optimizer, accelerator: Any) -> None:
    """An Accelerate loop's run at construction (before ``accelerator.prepare``): the memory check, and one warning
    when the Accelerator would step the schedule's lr schedulers several times per optimizer step."""
    check_memory(run, model, optimizer, accelerator_shape(accelerator))
    note = scheduler_stepping_note(run.schedule.phases[: run.final_depth + 1], accelerator)
    if note:
        run.env.warn(note)


def scheduler_stepping_note(phases: Any, accelerator: Any) -> str | None:
    """Accelerate steps a prepared lr scheduler once per process at each optimizer step (unless
    ``step_scheduler_with_optimizer=False`` or ``split_batches=True``): the lr shapes a schedule's phases bring,
    sized in optimizer steps, would end after 1/N of their steps on N processes."""
    n = int(getattr(accelerator, "num_processes", 1))
    if n < 2 or not getattr(accelerator, "step_scheduler_with_optimizer", True) or getattr(accelerator, "split_batches", False):
        return None
    shaped = [p.index for p in phases if p.new_lr_scheduler is not None]
    if not shaped:
        return None
    return (f"phase(s) {', '.join(map(str, shaped))} bring lr schedulers sized in optimizer steps, but this Accelerator "
            f"steps a prepared lr scheduler {n} times per optimizer step (step_scheduler_with_optimizer=True, "
            f"split_batches=False), so they would end after 1/{n} of their steps: build the Accelerator with "
            "step_scheduler_with_optimizer=False (docs/accelerate.md)")


def loop_shape(model: nn.Module, train_loader: Any, device: torch.device | None) -> RunShape:
    """The plain loop's run for the memory check: FSDP2 (what ``FSDP2Strategy.prepare_model`` noted: its plan,
    precision and batch sizes), DDP or one device by the model's wrapper, and the loader's batches."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    kind = "fsdp2" if isinstance(model, FSDPModule) else "ddp" if isinstance(model, DistributedDataParallel) else "single"
    return RunShape(**{"strategy": kind, "world_size": dist.world_size(), "device": device, **loader_shape(train_loader),
                       **noted_shape(model)})


def accelerator_shape(accelerator: Any) -> RunShape:
    """An Accelerate run for the memory check: DDP over its processes (or one device), its mixed precision and
    gradient accumulation; no loader (give memory_check its micro_batch and seq_len)."""
    world = int(accelerator.num_processes)
    precision = str(accelerator.mixed_precision)
    return RunShape("ddp" if world > 1 else "single", world, mixed_precision=precision if precision in ("bf16", "fp16")
                    else None, accumulation=int(accelerator.gradient_accumulation_steps), device=accelerator.device)


__all__ = ["accelerator_shape", "budget_problems", "check_accelerator", "check_loop_memory", "loop_facts", "loop_shape",
           "scheduler_stepping_note"]
