"""What a Lightning fit tells an implicit schedule: its step budget and the optimizer's lr.

The budget is ``trainer.estimated_stepping_batches`` (Lightning's own count of optimizer steps, from
``max_steps``, ``max_epochs``, the batches per epoch after ``limit_train_batches`` and gradient accumulation),
read at ``on_fit_start``, once the optimizer exists and before the first step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from phasetune.generate import RunFacts

if TYPE_CHECKING:
    import lightning.pytorch as pl

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
