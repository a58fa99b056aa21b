"""Recipes: lrs, lr shapes and phase lengths laid over a generated phase structure.

A recipe takes the model's *units* (the head, then one repeated block per unit from the top down, then the
stem, as :func:`phasetune.core.generate.block_units` finds them) and returns an ordinary raw schedule: real
``lr`` values per phase, real ``new_lr_scheduler`` entries, ``max_transition_epoch`` where the phase
lengths are known. Nothing is hidden: the file it writes is the whole story, and can be edited.

* ``"lpft"``: the head first (linear probing), then everything else in one phase (Kumar et al. 2022). The
  head trains at ``configure_optimizers``' lr, and restarts from it in the last phase (unless ``ft_head_lr``).
* ``"discriminative"``: the head first, then one block per phase from the top down (``blocks_per_phase``
  more at once), each block's lr the block above's times ``lr_decay`` (ULMFiT's discriminative
  fine-tuning with gradual unfreezing), the stem last.
* ``"blocks"``: the same phases, every one at ``lr`` (today's block-wise style, ``lr_decay=1``).

The *implicit default* (no schedule and no ``schedule_options`` given to a front end) is ``lpft`` with the
settings of :data:`DEFAULT_RULE`, applied by :func:`default_settings` to the optimizer's lr and the run's
step budget; every value lands in the generated schedule file, with :func:`default_notes` as its comments.

Options shared by the recipes (all optional):

* ``lr``: lr of phase 1's groups (the top of the pretrained body); later phases follow ``lr_decay``.
  Phase 0 trains with the optimizer from ``configure_optimizers``, whose lr is the head's.
* ``lr_decay``: factor from one block to the block below (``discriminative`` only; default
  :data:`DEFAULT_LR_DECAY`).
* ``phase_steps``: optimizer steps per phase (one int for all, or one per phase). With it every phase
  >= 1 gets a :class:`~phasetune.lr_shapes.WarmupLinearDecay` over its own steps, so the lr shape
  restarts at each transition, and every phase ends at its ``max_transition_step`` (the cumulative steps;
  the final phase's is the run's length). Phase 0's shape comes from ``configure_optimizers``
  (:func:`phase_lr_shape` gives its ``init_args``), or from the schedule with ``phase0_lr_shape``.
* ``total_steps``: a step budget for the whole run, split into ``phase_steps`` by :func:`split_budget`:
  the head phase gets ``head_fraction`` of it (default: :data:`DEFAULT_HEAD_FRACTION` for ``lpft``, a
  quarter; an equal share for the others), the later phases share the rest equally (the last takes the
  remainder). With ``steps_per_epoch`` the split is in whole epochs.
* ``warmup_fraction``: share of each phase's steps spent warming up (default 0.1).
* ``steps_per_epoch``: with ``phase_steps`` or ``total_steps``, write each phase's end as
  ``max_transition_epoch`` instead (the cumulative steps must be whole epochs).
* ``include_stem``: schedule the stem (embeddings) in a last phase (default True); False leaves it frozen.
* ``phase0_lr_shape``: with ``phase_steps`` or ``total_steps``, phase 0 gets its ``WarmupLinearDecay`` as its
  ``new_lr_scheduler`` too (replacing the scheduler of ``configure_optimizers``, if any).
* ``head_lr`` (``lpft`` only, needs ``phase0_lr_shape``): the head's lr in phase 0 instead of the optimizer's,
  written as the ``init_pg_lrs`` of phase 0's ``new_lr_scheduler`` (``head_groups`` values).
* ``ft_head_lr`` (``lpft`` only, needs ``phase_steps`` or ``total_steps``): the lr the head's groups restart
  from in the final phase, written as the ``init_pg_lrs`` of that phase's ``new_lr_scheduler`` (one value per
  param group the optimizer holds in phase 0, ``head_groups`` of them). Without it the head restarts from the
  lr it was created with (``configure_optimizers``' lr, or ``head_lr``).
* ``head_groups``: how many param groups the optimizer from ``configure_optimizers`` has (default 1; 2 when
  it splits parameters into decayed and not decayed ones). Only read with ``ft_head_lr`` and ``head_lr``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

WARMUP_LINEAR_DECAY = "phasetune.lr_shapes.WarmupLinearDecay"
RECIPES = ("lpft", "discriminative", "blocks")
#: lr factor per block, top down, when ``lr_decay`` is not given (see bench/results/quality_v1.md)
DEFAULT_LR_DECAY = 0.8
DEFAULT_WARMUP_FRACTION = 0.1
OPTIONS = ("lr", "lr_decay", "phase_steps", "total_steps", "head_fraction", "warmup_fraction", "steps_per_epoch",
           "include_stem", "blocks_per_phase", "phase0_lr_shape", "head_lr", "ft_head_lr", "head_groups")

#: The implicit default: what a front end generates when given no schedule and no ``schedule_options`` (the
#: ``lpft`` recipe), in bench/quality.py's rule form. An lr is ``("abs", x)`` (x), ``("rel", c)`` (c times the
#: optimizer's lr U), ``("floor", x)`` (max(U, x)) or ``"user"`` (U itself). To change the default, change these
#: values and :data:`DEFAULT_RULE_SOURCE`: :func:`default_settings` applies them, :func:`default_notes` writes them
#: into the generated schedule file's header.
DEFAULT_RULE: dict[str, Any] = {
    "body": ("abs", 2e-4),   # lr of the body phase (the encoder blocks)
    "head": ("abs", 3e-3),   # the head's lr in phase 0 ("user": the optimizer's own)
    "head_fraction": 0.25,   # the head phase's share of the run's optimizer steps
    "stem": "frozen",        # the embeddings: "frozen" (in no phase) or "body" (they train with the body)
    "ft_head": "head",       # the head's lr in the last phase: "head" (restarts at its phase-0 lr) or "body"
    "warmup_fraction": DEFAULT_WARMUP_FRACTION,  # each phase warms up over this share of its steps, then decays
}
#: where :data:`DEFAULT_RULE` came from (written into every generated schedule that uses it)
DEFAULT_RULE_SOURCE = ("bench/quality.py select-default: rule E, best mean validation accuracy against tuned full "
                       "fine-tuning over both tasks (rt, debates) and user lrs 1e-3 and 5e-5; bench/results/quality.md")
#: the head phase's share of a ``total_steps`` budget per recipe, when ``head_fraction`` is not given (the
#: others: an equal share)
DEFAULT_HEAD_FRACTION = {"lpft": DEFAULT_RULE["head_fraction"]}


def rule_lr(spec: Any, optimizer_lr: float | None) -> float | None:
    """The lr a :data:`DEFAULT_RULE` entry gives for an optimizer at ``optimizer_lr`` (None: it needs that lr and
    it is not known)."""
    if spec == "user":
        return optimizer_lr
    kind, x = spec
    if kind == "abs":
        return float(x)
    if optimizer_lr is None:
        return None
    return tidy_lr(x * optimizer_lr if kind == "rel" else max(optimizer_lr, x))


def _rule_text(spec: Any) -> str:
    if spec == "user":
        return "the optimizer's lr"
    kind, x = spec
    return {"abs": f"{x:g}", "rel": f"{x:g} x the optimizer's lr", "floor": f"max(the optimizer's lr, {x:g})"}[kind]


def default_settings(optimizer_lr: float | None, total_steps: int | None, optimizer_groups: int = 1) -> dict[str, Any]:
    """The ``lpft`` options of the implicit default (:data:`DEFAULT_RULE`) for an optimizer at lr ``optimizer_lr``
    with ``optimizer_groups`` param groups, over a run of ``total_steps`` optimizer steps (None: not known, so
    no phase lengths and no lr shapes: phases end by early stopping). An lr whose rule needs the optimizer's lr
    is left out when that is not known (``base_max_lr`` then applies)."""
    r = DEFAULT_RULE
    out: dict[str, Any] = {"include_stem": r["stem"] == "body", "warmup_fraction": r["warmup_fraction"]}
    body = rule_lr(r["body"], optimizer_lr)
    if body is not None:
        out["lr"] = body
    if total_steps is None:
        return out
    out.update(total_steps=total_steps, head_fraction=r["head_fraction"], phase0_lr_shape=True)
    head = None if r["head"] == "user" else rule_lr(r["head"], optimizer_lr)
    ft_head = body if r["ft_head"] == "body" else head
    if head is not None:
        out["head_lr"] = head
    if ft_head is not None:
        out["ft_head_lr"] = ft_head
    if head is not None or ft_head is not None:
        out["head_groups"] = optimizer_groups
    return out


def default_notes(optimizer_lr: float | None, overridden: Iterable[str] = ()) -> list[str]:
    """The lines a generated schedule's header says about :data:`DEFAULT_RULE`: each value and where it came from;
    ``overridden``: the options the user set (``schedule_options``), which win."""
    r = DEFAULT_RULE
    if optimizer_lr is None:
        u = ""
    elif r["head"] == "user":
        u = f" ({optimizer_lr:g})"
    else:
        u = f" (not the optimizer's {optimizer_lr:g}: a fixed head lr did better on validation)"
    lines = [f"default settings (phasetune.core.recipes.DEFAULT_RULE), from {DEFAULT_RULE_SOURCE}:",
             f"  head phase: {r['head_fraction']:.0%} of the run's optimizer steps (head_fraction "
             f"{r['head_fraction']:g}), at {_rule_text(r['head'])}{u}",
             f"  body phase: the repeated blocks (transformer layers) at lr {_rule_text(r['body'])}; the stem (embeddings) "
             + ("trains with them" if r["stem"] == "body" else "stays frozen (include_stem: false)"),
             "  last phase: the head restarts at " + ("the body's lr" if r["ft_head"] == "body" else "its phase-0 lr"),
             f"  every phase warms up over {r['warmup_fraction']:.0%} of its steps, then decays linearly to 0 "
             "(WarmupLinearDecay)"]
    if r["body"] != "user" and r["body"][0] != "abs" and optimizer_lr is None:
        lines.append("  the optimizer's lr is not known here: the body's lr is left to base_max_lr (set lr to choose)")
    overridden = sorted(overridden)
    if overridden:
        lines.append(f"  schedule_options set {', '.join(overridden)}: those values replace the defaults")
    return lines


def unknown_option(key: str, valid: Sequence[str], what: str, where: str = "") -> str:
    """``unknown <what> 'key'<where>`` with the closest valid one (difflib) and the full list."""
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} {key!r}{where}{hint} (valid: {', '.join(valid)})"


def apply_recipe(recipe: str, units: Sequence[Sequence[str]], **options: Any) -> dict[int, dict[str, Any]]:
    """The raw schedule of ``recipe`` over ``units`` (head first, then blocks top down, then the stem).

    ``units[0]`` is the head, ``units[-1]`` the stem when the model has one (``has_stem`` below is read
    from ``options.pop('has_stem', True)``). Raises ``ValueError`` listing every bad option.
    """
    has_stem = bool(options.pop("has_stem", True))
    problems = [unknown_option(k, OPTIONS, "option", f" for recipe {recipe!r}") for k in options if k not in OPTIONS]
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
    lengths = options.get("phase_steps") is not None or options.get("total_steps") is not None
    shape0 = options.get("phase0_lr_shape", False)
    if not isinstance(shape0, bool):
        problems.append(f"phase0_lr_shape must be true or false, got {shape0!r}")
    elif shape0 and not lengths:
        problems.append("phase0_lr_shape needs phase_steps or total_steps (phase 0's lr shape spans its steps)")
    head_groups = options.get("head_groups", 1)
    for key, needs in (("head_lr", "phase0_lr_shape (it sets the head's lr in phase 0's new_lr_scheduler)"),
                       ("ft_head_lr", "phase_steps or total_steps (it sets the head's lr in the final phase's "
                                      "new_lr_scheduler, which only those write)")):
        value = options.get(key)
        if value is None:
            continue
        if recipe != "lpft":
            problems.append(f"{key} applies to the 'lpft' recipe only (recipe {recipe!r} got {value!r})")
        if not _positive(value):
            problems.append(f"{key} must be a positive number, got {value!r}")
        if not (shape0 if key == "head_lr" else lengths):
            problems.append(f"{key} needs {needs}")
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
            schedule[k]["lr"] = tidy_lr(lrs[k])
    phase_steps = options.get("phase_steps")
    if options.get("total_steps") is not None or options.get("head_fraction") is not None:
        if phase_steps is not None:
            raise ValueError("give either phase_steps (the steps of each phase) or total_steps (a budget split "
                             "across the phases), not both")
        phase_steps = split_budget(options.get("total_steps"), len(schedule), options.get("head_fraction"), recipe,
                                   steps_per_epoch=options.get("steps_per_epoch"))
    add_lengths(schedule, phase_steps, warmup, options.get("steps_per_epoch"), shape0)
    if options.get("head_lr") is not None:
        schedule[0]["new_lr_scheduler"]["init_pg_lrs"] = [tidy_lr(options["head_lr"])] * head_groups
    if options.get("ft_head_lr") is not None and len(schedule) > 1:
        schedule[len(schedule) - 1]["new_lr_scheduler"]["init_pg_lrs"] = [tidy_lr(options["ft_head_lr"])] * head_groups
    return schedule


def split_budget(total_steps: Any, n_phases: int, head_fraction: Any = None, recipe: str | None = None, *,
                 steps_per_epoch: Any = None) -> list[int]:
    """``total_steps`` optimizer steps split across ``n_phases``: phase 0 (the head) gets ``head_fraction`` of
    them (default: ``recipe``'s :data:`DEFAULT_HEAD_FRACTION`, else ``1 / n_phases``), the later phases share
    the rest equally, the last taking the remainder. With ``steps_per_epoch`` the split is in whole epochs
    (``total_steps`` must be a whole number of them, at least one per phase)."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < n_phases:
        raise ValueError(f"total_steps must be an integer >= the number of phases ({n_phases}), got {total_steps!r}")
    if head_fraction is not None and (isinstance(head_fraction, bool) or not isinstance(head_fraction, (int, float))
                                      or not 0 < head_fraction < 1):
        raise ValueError(f"head_fraction must be a number in (0, 1), got {head_fraction!r}")
    if steps_per_epoch is not None:
        spe = steps_per_epoch
        if isinstance(spe, bool) or not isinstance(spe, int) or spe < 1:
            raise ValueError(f"steps_per_epoch must be an integer >= 1, got {spe!r}")
        if total_steps % spe:
            lower, upper = total_steps // spe * spe, (total_steps // spe + 1) * spe
            raise ValueError(
                f"total_steps={total_steps} is not a whole number of epochs of steps_per_epoch={spe} steps: give "
                f"{'' if lower < n_phases * spe else f'{lower} or '}{upper}, or leave out steps_per_epoch to end the "
                "phases at steps (max_transition_step)")
        if total_steps // spe < n_phases:
            raise ValueError(
                f"total_steps={total_steps} is {total_steps // spe} epoch(s) of {spe} steps, fewer than the {n_phases} "
                f"phases (each needs a whole epoch): give at least {n_phases * spe}, or leave out steps_per_epoch to "
                "end the phases at steps (max_transition_step)")
        return [e * spe for e in split_budget(total_steps // spe, n_phases, head_fraction, recipe)]
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


def add_lengths(schedule: dict[int, dict[str, Any]], phase_steps: Any, warmup: float, steps_per_epoch: Any,
                 shape0: bool = False) -> None:
    """Give each phase of ``schedule`` its length (``max_transition_step``, or ``max_transition_epoch`` with
    ``steps_per_epoch``) and its ``WarmupLinearDecay`` over its own steps (phase 0's only with ``shape0``); shared
    with the LoRA recipes."""
    if phase_steps is None:
        if steps_per_epoch is not None:
            raise ValueError("steps_per_epoch needs phase_steps or total_steps (the optimizer steps of each phase, "
                             "or of the run)")
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
        if k > 0 or shape0:
            schedule[k]["new_lr_scheduler"] = {
                "lr_scheduler_init": {"class_path": WARMUP_LINEAR_DECAY, "init_args": phase_lr_shape(s, warmup)},
                "pl_lrs_cfg": {"interval": "step"},
            }
        if steps_per_epoch is not None:
            if done % steps_per_epoch:
                raise ValueError(f"phase {k} would end after {done} steps, not a whole number of epochs of "
                                 f"{steps_per_epoch} steps; make every phase's steps a multiple of steps_per_epoch "
                                 "(or give total_steps, which is split in whole epochs)")
            schedule[k]["max_transition_epoch"] = done // steps_per_epoch


def _positive(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and x > 0


def tidy_lr(x: float) -> float:
    """Round an lr to 4 significant digits, so the schedule file reads 5.12e-05, not 5.120000000000001e-05."""
    return float(f"{x:.4g}")
