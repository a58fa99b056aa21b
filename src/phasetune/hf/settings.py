"""Trainer settings a schedule cannot work with, found before training: each problem names the setting.

Pure functions of ``TrainingArguments`` (read by attribute) and the resolved schedule, so they are tested
without building a Trainer.
"""

from __future__ import annotations

import math
from typing import Any

from phasetune.core.schedule import Schedule

#: ``optim`` choices whose optimizers do not train through param groups that can be added later: GaLore and
#: APOLLO group parameters by target module when built, LOMO/AdaLomo update inside the backward pass.
NO_NEW_GROUPS = ("galore", "apollo", "lomo", "adalomo")


def metric_key(args: Any) -> str | None:
    """The key of ``metric_for_best_model`` in the evaluation metrics (the Trainer adds ``eval_``)."""
    name = getattr(args, "metric_for_best_model", None)
    if not name:
        return None
    return name if name.startswith("eval_") else f"eval_{name}"


def metric_driven_phases(schedule: Schedule, final_depth: int, epoch_transitions_only: bool) -> list[int]:
    """Phases before the final one that end only when the metric stops improving (no max_transition_epoch nor
    max_transition_step)."""
    if epoch_transitions_only:
        return []
    return [p.index for p in schedule.phases[:final_depth] if max(p.max_transition_epoch, p.max_transition_step) < 0]


def trainer_problems(
    args: Any,
    schedule: Schedule,
    final_depth: int,
    *,
    restore_best: bool,
    epoch_transitions_only: bool,
    find_unused_parameters: bool | None,
    world_size: int,
    fsdp: bool = False,
    deepspeed: bool = False,
) -> list[str]:
    """What in ``args`` keeps the schedule from running as written, each naming the TrainingArguments field."""
    problems = []
    evaluates = str(getattr(args, "eval_strategy", "no")) not in ("no", "IntervalStrategy.NO")
    metric = metric_key(args)
    by_metric = metric_driven_phases(schedule, final_depth, epoch_transitions_only)
    if by_metric:
        which = ", ".join(str(k) for k in by_metric)
        if metric is None:
            problems.append(
                f"TrainingArguments.metric_for_best_model is unset, but phase(s) {which} end only when the evaluation "
                "metric stops improving: set metric_for_best_model (e.g. 'eval_loss') or give those phases a "
                "max_transition_epoch or max_transition_step"
            )
        if not evaluates:
            problems.append(
                f"TrainingArguments.eval_strategy='no', but phase(s) {which} end only when the evaluation metric "
                "stops improving: set eval_strategy='epoch' (and an eval_dataset) or give those phases a "
                "max_transition_epoch or max_transition_step"
            )
    elif restore_best and final_depth > 0 and (metric is None or not evaluates):
        setting = "metric_for_best_model is unset" if metric is None else "eval_strategy='no'"
        problems.append(
            f"restore_best=True restores the best state by the evaluation metric before each transition, but TrainingArguments."
            f"{setting}: set metric_for_best_model (e.g. 'eval_loss') with eval_strategy='epoch', or pass "
            "restore_best=False to PhasetuneTrainerCallback"
        )
    optim = str(getattr(args, "optim", ""))
    optim = optim.split(".")[-1].lower() if optim.startswith("OptimizerNames.") else optim.lower()
    if final_depth > 0 and optim.startswith(NO_NEW_GROUPS):
        problems.append(
            f"TrainingArguments.optim={optim!r} builds an optimizer that cannot take the parameter groups later phases "
            "add (it groups parameters when built, or updates them inside backward); use an optimizer such as "
            "'adamw_torch' or 'sgd', or a one-phase schedule"
        )
    if fsdp:
        problems.append(
            "TrainingArguments.fsdp is set, but phasetune.hf does not support the Trainer's FSDP yet (Accelerate "
            "replaces the parameters the schedule holds when it shards the model); use DDP, or phasetune's FSDP2 "
            "front ends (the Lightning ModelParallelStrategyAdapter or phasetune.FSDP2Strategy)"
        )
    if deepspeed:
        problems.append(
            "TrainingArguments.deepspeed is set, but phasetune.hf does not support DeepSpeed (it builds and owns the "
            "optimizer and its groups); use DDP"
        )
    if world_size > 1 and final_depth > 0 and find_unused_parameters is False:
        problems.append(
            "TrainingArguments.ddp_find_unused_parameters is False (the Trainer's choice with activation "
            "checkpointing), but under DDP phasetune registers every scheduled parameter with DDP while only the "
            "current phase's get gradients: set ddp_find_unused_parameters=True"
        )
    return problems


def scheduler_notes(schedule: Schedule, final_depth: int) -> list[str]:
    """Warnings for schedule keys the Trainer reads differently from Lightning (it steps every optimizer step)."""
    notes = []
    for phase in schedule.phases[: final_depth + 1]:
        spec = phase.new_lr_scheduler
        if spec is None:
            continue
        interval = spec.pl_lrs_cfg.get("interval", "epoch")
        if interval != "step":
            notes.append(
                f"phase {phase.index}, key 'new_lr_scheduler': the Trainer steps lr schedulers after every optimizer "
                f"step, not per {interval!r} (pl_lrs_cfg is Lightning's); size the scheduler in steps"
            )
    return notes


def epochs_note(args: Any, schedule: Schedule, final_depth: int) -> str | None:
    """A warning when ``num_train_epochs`` ends training before a phase's ``max_transition_epoch``.

    The Trainer fixes its step count before phasetune sees the schedule, so unlike the Lightning callback
    (which raises ``max_epochs``) this only warns.
    """
    max_steps = getattr(args, "max_steps", -1)
    if max_steps > 0:  # the Trainer's step count, when given, wins over its epochs
        arg, limit, cap = "max_steps", max_steps, "max_transition_step"
    else:
        arg, limit, cap = "num_train_epochs", math.ceil(getattr(args, "num_train_epochs", 0)), "max_transition_epoch"
    late = [p for p in schedule.phases[: final_depth + 1] if getattr(p, cap) > limit]
    if not late:
        return None
    return (f"TrainingArguments.{arg}={limit} ends training before phase {late[0].index}'s {cap} "
            f"({getattr(late[0], cap)}); raise {arg} to at least {max(getattr(p, cap) for p in late)} so that every "
            "phase runs")


def prefix_cache_problems(args: Any, phases: list[int]) -> list[str]:
    """What in ``args`` keeps the frozen-prefix cache of ``phases`` from working, each naming the field."""
    if phases and getattr(args, "remove_unused_columns", False):
        which = ", ".join(map(str, phases))
        return [f"prefix_cache is on in phase(s) {which}, but TrainingArguments.remove_unused_columns=True drops the "
                "'sample_index' column the cache keys its entries by: set remove_unused_columns=False (the model "
                "never sees the index), or turn prefix_cache off"]
    return []
