"""What a Lightning fit tells its schedule: the step budget and the optimizer's lr of an implicit schedule, the
Trainer limits every phase needs, and the schedule files written to the log dir.

The budget is ``trainer.estimated_stepping_batches`` (Lightning's own count of optimizer steps, from
``max_steps``, ``max_epochs``, the batches per epoch after ``limit_train_batches`` and gradient accumulation),
read at ``on_fit_start``, once the optimizer exists and before the first step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phasetune.core import generate, thaw
from phasetune.core.generate import RunFacts
from phasetune.core.schedule import resolve_schedule
from phasetune.lightning import messages
from phasetune.run.files import write_implicit_schedule

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from phasetune.run import PhaseRun, RunOptions

NO_BUDGET_ADVICE = "give the Trainer max_steps, or max_epochs with a training loader that has a length"


def trainer_facts(trainer: pl.Trainer, budget: bool = True) -> RunFacts:
    """The step budget of ``trainer``'s fit (None when it has none: ``max_epochs=-1`` without ``max_steps``, an
    iterable loader without a length; not read without ``budget``: it loads the training data) and the lr and
    group count of its optimizer."""
    optimizer = trainer.optimizers[0] if len(trainer.optimizers) == 1 else None
    lr, groups = None, 1
    if optimizer is not None and optimizer.param_groups:
        first = optimizer.param_groups[0]
        lr = float(first.get("initial_lr", first["lr"]))  # a scheduler may have moved "lr" already (warm-up)
        groups = len(optimizer.param_groups)
    if not budget:
        return RunFacts(optimizer_lr=lr, optimizer_groups=groups)
    steps = trainer.estimated_stepping_batches
    if not math.isfinite(steps) or steps <= 0:  # inf: no limit; -1: an iterable loader without max_steps
        why = ("max_epochs=-1 and no max_steps" if trainer.max_epochs == -1
               else "the training loader has no length and max_steps is not set")
        return RunFacts(no_budget=f"{why}: {NO_BUDGET_ADVICE}", optimizer_lr=lr, optimizer_groups=groups)
    steps = int(steps)
    if trainer.max_steps > 0 and steps == trainer.max_steps:
        source = f"Trainer(max_steps={trainer.max_steps}) (trainer.estimated_stepping_batches)"
    else:
        batches = trainer.num_training_batches
        accumulate = trainer.accumulate_grad_batches
        per_epoch = f"{batches} batches" + (f" / accumulate_grad_batches={accumulate}" if accumulate > 1 else "")
        source = f"Trainer(max_epochs={trainer.max_epochs}) x {per_epoch} per epoch (trainer.estimated_stepping_batches)"
    return RunFacts(total_steps=steps, budget_source=source, optimizer_lr=lr, optimizer_groups=groups)


def schedule_file(log_dir: str | None, pl_module: pl.LightningModule, suffix: str) -> Path:
    return Path(log_dir or ".") / f"{type(pl_module).__name__}_{suffix}.yaml"


def freeze_to_implicit_phase0(adapter: Any, pl_module: pl.LightningModule, options: RunOptions) -> None:
    """Freeze all but phase 0 of the implicit schedule (its parameters do not depend on the budget), so that
    ``configure_optimizers`` sees phase 0 trainable before the schedule is generated at ``on_fit_start``."""
    raw = generate.generate_implicit(adapter.structure_module(pl_module), options, parameters_only=True).raw
    params = dict(adapter.named_parameters(pl_module))
    schedule = resolve_schedule(raw, adapter.param_shapes(pl_module), epoch_transitions_only=False)
    thaw.freeze(params)
    thaw.thaw(params, schedule[0].params)


def write_generated(trainer: pl.Trainer, pl_module: pl.LightningModule, adapter: Any, options: RunOptions,
                    log_dir: str | None) -> str:
    """``gen_ft_sched_only``: write the schedule generated for this fit (rank 0) and return its path."""
    generated = generate.generate_implicit(adapter.structure_module(pl_module), options,
                                           trainer_facts(trainer, generate.needs_run_budget(options)))
    schedule = resolve_schedule(generated.raw, list(adapter.named_parameters(pl_module)), epoch_transitions_only=False)
    path = schedule_file(log_dir, pl_module, "ft_schedule")
    if trainer.is_global_zero:
        header = [f"phasetune schedule generated for {type(pl_module).__name__} (style {options.schedule_style!r}); "
                  "edit it and pass it as ft_schedule", *generated.notes[1:]]
        schedule.dump(path, resolved=False, header="\n".join(header))
        messages.info(f"wrote generated schedule ({len(schedule)} phases) to {path}")
    return str(path)


def write_schedules(trainer: pl.Trainer, pl_module: pl.LightningModule, run: PhaseRun, log_dir: str | None) -> None:
    """Rank 0 writes the resolved schedule (exact parameter names per phase) and an implicit schedule's file."""
    if not trainer.is_global_zero:
        return
    write_implicit_schedule(run, schedule_file(log_dir, pl_module, "ft_schedule"), messages.info)
    schedule = run.schedule
    schedule.dump(schedule_file(log_dir, pl_module, "ft_schedule_resolved"),
                  header=f"resolved from {schedule.source}: exact parameter names per phase")


def reach_every_phase(trainer: pl.Trainer, run: PhaseRun) -> None:
    """Raise ``max_epochs`` / ``max_steps`` to the largest ``max_transition_epoch`` / ``max_transition_step`` of the
    phases to run (with a warning), so that every phase gets its length; the final phase then runs until early
    stopping or the Trainer's limits."""
    phases = run.schedule.phases[: run.final_depth + 1]
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
