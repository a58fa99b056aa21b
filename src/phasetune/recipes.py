"""Recipes: lrs, lr shapes and phase lengths laid over a generated phase structure.

A recipe takes the model's *units* (the head, then one repeated block per unit from the top down, then the
stem, as :func:`phasetune.generate.block_units` finds them) and returns an ordinary raw schedule: real
``lr`` values per phase, real ``new_lr_scheduler`` entries, ``max_transition_epoch`` where the phase
lengths are known. Nothing is hidden: the file it writes is the whole story, and can be edited.

* ``"lpft"``: the head first (linear probing), then everything else in one phase (Kumar et al. 2022). The
  head trains at ``configure_optimizers``' lr, and restarts from it in the last phase (unless ``ft_head_lr``):
  give it a linear probe's high lr, well above the body's (bench/quality.py chose 3e-3 for the head with
  ``lr`` 2e-4 for the body of a MiniLM classifier, on the validation split).
* ``"discriminative"``: the head first, then one block per phase from the top down (``blocks_per_phase``
  more at once), each block's lr the block above's times ``lr_decay`` (ULMFiT's discriminative
  fine-tuning with gradual unfreezing), the stem last.
* ``"blocks"``: the same phases, every one at ``lr`` (today's block-wise style, ``lr_decay=1``).

Options shared by the recipes (all optional):

* ``lr``: lr of phase 1's groups (the top of the pretrained body); later phases follow ``lr_decay``.
  Phase 0 trains with the optimizer from ``configure_optimizers``, whose lr is the head's.
* ``lr_decay``: factor from one block to the block below (``discriminative`` only; default
  :data:`DEFAULT_LR_DECAY`).
* ``phase_steps``: optimizer steps per phase (one int for all, or one per phase). With it every phase
  >= 1 gets a :class:`~phasetune.lr_shapes.WarmupLinearDecay` over its own steps, so the lr shape
  restarts at each transition, and every phase ends at its ``max_transition_step`` (the cumulative steps;
  the final phase's is the run's length). Phase 0's shape must come from ``configure_optimizers`` (a
  schedule cannot set phase 0's scheduler): :func:`phase_lr_shape` gives its ``init_args``.
* ``total_steps``: a step budget for the whole run, split into ``phase_steps`` by :func:`split_budget`:
  the head phase gets ``head_fraction`` of it (default: :data:`DEFAULT_HEAD_FRACTION` for ``lpft``, a
  quarter; an equal share for the others), the later phases share the rest equally (the last takes the
  remainder).
* ``warmup_fraction``: share of each phase's steps spent warming up (default 0.1).
* ``steps_per_epoch``: with ``phase_steps`` or ``total_steps``, write each phase's end as
  ``max_transition_epoch`` instead (the cumulative steps must be whole epochs).
* ``include_stem``: schedule the stem (embeddings) in a last phase (default True); False leaves it frozen.
* ``ft_head_lr`` (``lpft`` only, needs ``phase_steps`` or ``total_steps``): the lr the head's groups restart
  from in the final phase, written as the ``init_pg_lrs`` of that phase's ``new_lr_scheduler`` (one value per
  param group the optimizer holds in phase 0, ``head_groups`` of them). Without it the head restarts from the
  lr it was created with (``configure_optimizers``' lr), usually far above the body's; on bench/quality.py's
  validation split that was the better choice (the head at the body's lr lost 2 to 3 points).
* ``head_groups``: how many param groups the optimizer from ``configure_optimizers`` has (default 1; 2 when
  it splits parameters into decayed and not decayed ones). Only read with ``ft_head_lr``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

WARMUP_LINEAR_DECAY = "phasetune.lr_shapes.WarmupLinearDecay"
RECIPES = ("lpft", "discriminative", "blocks")
#: lr factor per block, top down, when ``lr_decay`` is not given (see bench/results/quality.md)
DEFAULT_LR_DECAY = 0.8
DEFAULT_WARMUP_FRACTION = 0.1
#: the head phase's share of a ``total_steps`` budget per recipe, when ``head_fraction`` is not given (the
#: others: an equal share). lpft: a quarter led on the validation split (bench/results/quality.md)
DEFAULT_HEAD_FRACTION = {"lpft": 0.25}
OPTIONS = ("lr", "lr_decay", "phase_steps", "total_steps", "head_fraction", "warmup_fraction", "steps_per_epoch",
           "include_stem", "blocks_per_phase", "ft_head_lr", "head_groups")


def apply_recipe(recipe: str, units: Sequence[Sequence[str]], **options: Any) -> dict[int, dict[str, Any]]:
    """The raw schedule of ``recipe`` over ``units`` (head first, then blocks top down, then the stem).

    ``units[0]`` is the head, ``units[-1]`` the stem when the model has one (``has_stem`` below is read
    from ``options.pop('has_stem', True)``). Raises ``ValueError`` listing every bad option.
    """
    has_stem = bool(options.pop("has_stem", True))
    problems = [f"unknown option {k!r} for recipe {recipe!r}; options: {', '.join(OPTIONS)}"
                for k in options if k not in OPTIONS]
    if recipe not in RECIPES:
        problems.append(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    lr = options.get("lr")
    if lr is not None and not _positive(lr):
        problems.append(f"lr must be a positive number, got {lr!r}")
    decay = options.get("lr_decay", DEFAULT_LR_DECAY if recipe == "discriminative" else 1.0)
    if not _positive(decay) or decay > 1:
        problems.append(f"lr_decay must be a number in (0, 1], got {decay!r}")
    elif recipe != "discriminative" and decay != 1.0:
        problems.append(f"lr_decay applies to the 'discriminative' recipe only (recipe {recipe!r} got {decay!r})")
    warmup = options.get("warmup_fraction", DEFAULT_WARMUP_FRACTION)
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0 <= warmup < 1:
        problems.append(f"warmup_fraction must be a number in [0, 1), got {warmup!r}")
    per_phase = options.get("blocks_per_phase", 1)
    if isinstance(per_phase, bool) or not isinstance(per_phase, int) or per_phase < 1:
        problems.append(f"blocks_per_phase must be an integer >= 1, got {per_phase!r}")
    ft_head_lr, head_groups = options.get("ft_head_lr"), options.get("head_groups", 1)
    if ft_head_lr is not None:
        if recipe != "lpft":
            problems.append(f"ft_head_lr applies to the 'lpft' recipe only (recipe {recipe!r} got {ft_head_lr!r})")
        if not _positive(ft_head_lr):
            problems.append(f"ft_head_lr must be a positive number, got {ft_head_lr!r}")
        if options.get("phase_steps") is None and options.get("total_steps") is None:
            problems.append("ft_head_lr needs phase_steps or total_steps (it sets the head's lr in the final "
                            "phase's new_lr_scheduler, which only those write)")
    if isinstance(head_groups, bool) or not isinstance(head_groups, int) or head_groups < 1:
        problems.append(f"head_groups must be an integer >= 1 (the param groups of phase 0's optimizer), "
                        f"got {head_groups!r}")
    if problems:
        raise ValueError("; ".join(problems))

    units = [list(u) for u in units]
    if not options.get("include_stem", True) and has_stem and len(units) > 1:
        units = units[:-1]
    head, body = units[0], units[1:]
    if recipe == "lpft":
        phases = [head, [n for u in body for n in u]] if body else [head]
        lrs = [None, lr]
    else:
        phases = [head, *([n for u in body[i : i + per_phase] for n in u] for i in range(0, len(body), per_phase))]
        lrs = [None] + [None if lr is None else lr * decay ** (i * per_phase) for i in range(len(phases) - 1)]
    schedule: dict[int, dict[str, Any]] = {}
    for k, params in enumerate(phases):
        schedule[k] = {"params": params}
        if k > 0 and lrs[k] is not None:
            schedule[k]["lr"] = _tidy(lrs[k])
    phase_steps = options.get("phase_steps")
    if options.get("total_steps") is not None or options.get("head_fraction") is not None:
        if phase_steps is not None:
            raise ValueError("give either phase_steps (the steps of each phase) or total_steps (a budget split "
                             "across the phases), not both")
        phase_steps = split_budget(options.get("total_steps"), len(schedule), options.get("head_fraction"), recipe)
    _add_lengths(schedule, phase_steps, warmup, options.get("steps_per_epoch"))
    if ft_head_lr is not None and len(schedule) > 1:
        schedule[len(schedule) - 1]["new_lr_scheduler"]["init_pg_lrs"] = [_tidy(ft_head_lr)] * head_groups
    return schedule


def split_budget(total_steps: Any, n_phases: int, head_fraction: Any = None, recipe: str | None = None) -> list[int]:
    """``total_steps`` optimizer steps split across ``n_phases``: phase 0 (the head) gets ``head_fraction`` of
    them (default: ``recipe``'s :data:`DEFAULT_HEAD_FRACTION`, else ``1 / n_phases``), the later phases share
    the rest equally, the last taking the remainder."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < n_phases:
        raise ValueError(f"total_steps must be an integer >= the number of phases ({n_phases}), got {total_steps!r}")
    if head_fraction is not None and (isinstance(head_fraction, bool) or not isinstance(head_fraction, (int, float))
                                      or not 0 < head_fraction < 1):
        raise ValueError(f"head_fraction must be a number in (0, 1), got {head_fraction!r}")
    if head_fraction is None:
        head_fraction = DEFAULT_HEAD_FRACTION.get(recipe or "", 1.0 / n_phases)
    if n_phases == 1:
        return [total_steps]
    head = min(max(1, round(head_fraction * total_steps)), total_steps - (n_phases - 1))
    each = (total_steps - head) // (n_phases - 1)
    rest = [each] * (n_phases - 1)
    rest[-1] += total_steps - head - each * (n_phases - 1)
    return [head, *rest]


def phase_lr_shape(steps: int, warmup_fraction: float = DEFAULT_WARMUP_FRACTION) -> dict[str, int]:
    """``init_args`` of the :class:`~phasetune.lr_shapes.WarmupLinearDecay` of a phase of ``steps`` steps."""
    warmup = min(round(warmup_fraction * steps), steps - 1)
    return {"total_steps": int(steps), "warmup_steps": max(warmup, 0)}


def _add_lengths(schedule: dict[int, dict[str, Any]], phase_steps: Any, warmup: float, steps_per_epoch: Any) -> None:
    if phase_steps is None:
        if steps_per_epoch is not None:
            raise ValueError("steps_per_epoch needs phase_steps (the optimizer steps of each phase)")
        return
    n = len(schedule)
    steps = [phase_steps] * n if isinstance(phase_steps, int) and not isinstance(phase_steps, bool) else phase_steps
    if not isinstance(steps, (list, tuple)) or len(steps) != n or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
        raise ValueError(f"phase_steps must be an integer >= 1 or a list of {n} of them (one per phase of this "
                         f"recipe), got {phase_steps!r}")
    if steps_per_epoch is not None and (isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int)
                                        or steps_per_epoch < 1):
        raise ValueError(f"steps_per_epoch must be an integer >= 1, got {steps_per_epoch!r}")
    if steps_per_epoch is None:  # phase ends in optimizer steps, absolute like epochs
        done = 0
        for k, s in enumerate(steps):
            done += s
            schedule[k]["max_transition_step"] = done
    done = 0
    for k, s in enumerate(steps):
        done += s
        if k > 0:
            schedule[k]["new_lr_scheduler"] = {
                "lr_scheduler_init": {"class_path": WARMUP_LINEAR_DECAY, "init_args": phase_lr_shape(s, warmup)},
                "pl_lrs_cfg": {"interval": "step"},
            }
        if steps_per_epoch is not None:
            if done % steps_per_epoch:
                raise ValueError(f"phase {k} would end after {done} steps, not a whole number of epochs of "
                                 f"{steps_per_epoch} steps; make every phase's steps a multiple of steps_per_epoch")
            schedule[k]["max_transition_epoch"] = done // steps_per_epoch


def _positive(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and x > 0


def _tidy(x: float) -> float:
    """Round an lr to 4 significant digits, so the schedule file reads 5.12e-05, not 5.120000000000001e-05."""
    return float(f"{x:.4g}")
