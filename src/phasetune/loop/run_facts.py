"""What an implicit schedule of the plain loop is generated from, and what is wrong with the budget arguments."""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from phasetune.core.generate import RunFacts


def loop_facts(optimizer: Optimizer, total_steps: int | None, max_epochs: int | None, train_loader: Any) -> RunFacts:
    """What an implicit schedule of the plain loop is generated from: the budget (``total_steps``, or ``max_epochs``
    x the loader's length) and the optimizer's lr and group count."""
    first = optimizer.param_groups[0]
    lr, groups = float(first.get("initial_lr", first["lr"])), len(optimizer.param_groups)
    if total_steps is not None:
        return RunFacts(total_steps, "ScheduledFinetuning(total_steps=...)", optimizer_lr=lr, optimizer_groups=groups)
    batches = None
    if max_epochs is not None and train_loader is not None:
        try:
            batches = len(train_loader)
        except TypeError:  # an iterable without a length
            batches = None
    if max_epochs is not None and batches:
        return RunFacts(max_epochs * batches, f"ScheduledFinetuning(max_epochs={max_epochs}) x len(train_loader)="
                        f"{batches}", optimizer_lr=lr, optimizer_groups=groups)
    why = ("max_epochs is given but train_loader has no length" if max_epochs is not None
           else "ScheduledFinetuning got neither total_steps nor max_epochs")
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


__all__ = ["budget_problems", "loop_facts"]
