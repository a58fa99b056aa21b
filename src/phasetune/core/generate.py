"""Implicit schedules: generate a reasonable schedule from a model's structure.

Structural styles:

* ``"blocks"`` keeps modules whole: the head (everything registered after the last
  repeated block) trains first, then one repeated block per phase from the top down (a transformer
  layer, a ResNet stage, ...), then the stem (embeddings and anything registered before the first block).
* ``"pairs"`` is the classic heuristic of the original scheduler: parameters in reverse registration
  order, two per phase.

Repeated blocks are modules whose class is listed in the model's ``_no_split_modules`` (Hugging Face
models set it), else children of a ``ModuleList``/``Sequential`` that share a class and own parameters.

Recipes (:mod:`phasetune.core.recipes`) lay lrs, per-phase lr shapes and phase lengths over the block-wise
structure: ``"lpft"`` (the default, :data:`DEFAULT_STYLE`) and ``"discriminative"``, and ``"blocks"`` itself
takes their options (``lr``, ``phase_steps``, ...). ``generate_schedule(model, style, **options)`` serves
them all.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from phasetune.core import recipes
from phasetune.errors import ConfigurationError
from phasetune.util.text import whole_modules

Style = Literal["blocks", "pairs", "lpft", "discriminative"]
STYLES = ("blocks", "pairs", "lpft", "discriminative")
#: the style used when none is given: ``"lpft"``, with :data:`phasetune.core.recipes.DEFAULT_RULE`'s settings in an
#: implicit schedule (:func:`generate_implicit`)
DEFAULT_STYLE: Style = "lpft"


def generate_schedule(model: nn.Module, style: Style = DEFAULT_STYLE, params_per_phase: int = 2,
                      **options: Any) -> dict[int, dict[str, Any]]:
    """Return a raw schedule dict (phase -> ``{"params": [...], ...}``) for ``model``.

    ``style`` is one of :data:`STYLES` (see the module docstring); ``params_per_phase`` is the ``"pairs"``
    style's; ``options`` are a recipe's (:data:`phasetune.core.recipes.OPTIONS`), accepted by every style but
    ``"pairs"``. The result is what ``resolve_schedule`` takes and ``Schedule.dump`` writes.
    """
    names = [n for n, _ in model.named_parameters()]
    if not names:
        raise ValueError(f"{type(model).__name__} has no parameters to schedule")
    if style == "pairs":
        if options:
            raise ValueError(f"the 'pairs' style takes no recipe options (got {', '.join(sorted(options))}); "
                             f"use one of {', '.join(recipes.RECIPES)} for lrs and lr shapes")
        if params_per_phase < 1:
            raise ValueError(f"params_per_phase must be >= 1, got {params_per_phase}")
        rev = names[::-1]
        return {i: {"params": rev[j : j + params_per_phase]} for i, j in enumerate(range(0, len(rev), params_per_phase))}
    if style not in STYLES:
        raise ValueError(f"unknown schedule style {style!r}; choose one of {', '.join(STYLES)}")
    units, has_stem = block_units(model)
    return recipes.apply_recipe(style, units, has_stem=has_stem, **options)


def block_units(model: nn.Module) -> tuple[list[list[str]], bool]:
    """The ``"blocks"`` phases of ``model`` (head, blocks top down, stem), and whether the last is a stem."""
    names = [n for n, _ in model.named_parameters()]
    blocks = find_blocks(model)
    units = _units(model, names, blocks)
    units.reverse()  # top of the model first
    phases: list[list[str]] = []
    pending: list[str] = []  # a non-block run between blocks joins the block below it
    for i, (kind, unit_names) in enumerate(units):
        is_last = i == len(units) - 1
        if kind == "run" and phases and not is_last:
            pending.extend(unit_names)
            continue
        phases.append(pending + unit_names)
        pending = []
    if pending:
        phases[-1].extend(pending)
    # the stem: what comes before the repeated blocks (a run of parameters, or a block class seen once,
    # like Hugging Face's BertEmbeddings listed in _no_split_modules)
    kinds = Counter(type(model.get_submodule(b)).__name__ for b in blocks)
    owners = {next((b for b in blocks if n.startswith(b + ".")), None) for n in phases[-1]}
    has_stem = len(phases) > 1 and all(o is None or kinds[type(model.get_submodule(o)).__name__] == 1 for o in owners)
    return [_compress(model, p) for p in phases], has_stem


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the model's repeated blocks, outermost first, in registration order."""
    no_split: set[str] = set()
    for m in model.modules():
        cls_names = getattr(m, "_no_split_modules", None)
        if cls_names:
            no_split.update(cls_names)
    if no_split:
        found = [n for n, m in model.named_modules() if n and type(m).__name__ in no_split]
        outer = _outermost(found)
        if len(outer) >= 2:
            return outer
    found = []

    def visit(prefix: str, module: nn.Module) -> None:
        children = list(module.named_children())
        repeated: set[str] = set()
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            by_cls: dict[type, list[str]] = {}
            for name, child in children:
                if any(True for _ in child.parameters()):
                    by_cls.setdefault(type(child), []).append(name)
            repeated = {n for names in by_cls.values() if len(names) >= 2 for n in names}
        for name, child in children:
            full = f"{prefix}{name}"
            if name in repeated:
                found.append(full)
            else:
                visit(f"{full}.", child)

    visit("", model)
    return found


def _outermost(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        if not any(n.startswith(o + ".") for o in out):
            out.append(n)
    return out


def _units(model: nn.Module, names: list[str], blocks: list[str]) -> list[tuple[str, list[str]]]:
    """Split parameter names, in registration order, into block units and runs of non-block parameters."""
    if not blocks:
        # No repeated structure: keep top-level children whole, in registration order.
        tops = [n for n, _ in model.named_children()]
        blocks = [t for t in tops if any(nm.startswith(t + ".") for nm in names)]
    units: list[tuple[str, list[str]]] = []
    for name in names:
        owner = next((b for b in blocks if name.startswith(b + ".")), None)
        tag = f"block:{owner}" if owner is not None else "run"
        if units and units[-1][0] == tag:
            units[-1][1].append(name)
        else:
            units.append((tag, [name]))
    return [("block" if tag.startswith("block:") else "run", members) for tag, members in units]


def _compress(model: nn.Module, names: list[str]) -> list[str]:
    """Replace the names of whole modules by one escaped pattern each (``a\\.b\\..*``), keep the rest exact."""
    all_names = [n for n, _ in model.named_parameters()]
    members = set(all_names)
    return [item if item in members else re.escape(item) + r"\..*" for item in whole_modules(names, all_names)]


def stand_in_tree(
    root: nn.Module,
    *,
    unwrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    class_of: Callable[[nn.Module], type] = type,
    own_params: Callable[[nn.Module], Iterable[tuple[str, Any]]] | None = None,
) -> tuple[nn.Module, dict[str, nn.Module]]:
    """A stand-in copy of ``root``'s module tree for reading its structure, not for running.

    Sharding wrappers rename modules and classes (``FSDPBlock``) or insert wrapper levels; schedule
    generation needs the original tree. Every node gets a class named like ``class_of(module)`` (a
    ``ModuleList``/``ModuleDict``/``Sequential`` stays one), keeps ``_no_split_modules``, and holds
    ``own_params(module)`` when given. ``unwrap`` skips wrapper levels. Returns the top node and every node
    by (logical) name, so callers can register parameters afterwards.
    """
    classes: dict[type, type] = {}
    views: dict[str, nn.Module] = {}

    def view_class(cls: type) -> type:
        if cls not in classes:
            base = next((b for b in (nn.ModuleList, nn.ModuleDict, nn.Sequential) if issubclass(cls, b)), nn.Module)
            classes[cls] = type(cls.__name__, (base,), {})
        return classes[cls]

    def build(prefix: str, m: nn.Module) -> nn.Module:
        m = unwrap(m)
        view = view_class(class_of(m))()
        if getattr(m, "_no_split_modules", None):
            view._no_split_modules = m._no_split_modules
        if own_params is not None:
            for name, p in own_params(m):
                view.register_parameter(name, p)
        views[prefix] = view
        for name, child in m.named_children():
            view.add_module(name, build(f"{prefix}.{name}" if prefix else name, child))
        return view

    return build("", root), views


@dataclass(frozen=True)
class RunFacts:
    """What a front end knows of the run when it generates an implicit schedule."""

    #: the run's optimizer steps (its step budget); None: not knowable (phases then end by early stopping)
    total_steps: int | None = None
    #: where ``total_steps`` came from, for the schedule file (e.g. ``Trainer(max_steps=48)``)
    budget_source: str = ""
    #: why no budget is known and how to give one in this front end (the start-of-training warning)
    no_budget: str = ""
    #: the lr of the optimizer the run is given (the head's, in phase 0), and its param groups
    optimizer_lr: float | None = None
    optimizer_groups: int = 1


@dataclass
class ImplicitSchedule:
    """A generated schedule and what its file says about it."""

    raw: dict[int, dict[str, Any]]
    #: header lines of the schedule file: the style, the budget and where it came from, the default settings
    notes: list[str] = field(default_factory=list)
    #: the warning a run gives at its start when no budget reached the schedule (None: it has one, or needs none)
    no_budget_warning: str | None = None

    @property
    def budget_line(self) -> str:
        """The notes' line on phase lengths (the budget and where it came from), for the start-of-training line."""
        return next((n for n in self.notes if n.startswith("budget:")), "phase lengths: as schedule_options give them")


def needs_run_budget(options: Any) -> bool:
    """Whether an implicit schedule under ``options`` (a :class:`phasetune.RunOptions`) takes the run's step budget:
    a recipe style whose ``schedule_options`` set no ``total_steps`` or ``phase_steps`` of their own."""
    return options.schedule_style != "pairs" and not {"total_steps", "phase_steps"} & set(options.schedule_options or {})


#: recipe options that set phase lengths and lr shapes (left out when only the phases' parameters are wanted)
LENGTH_OPTIONS = ("phase_steps", "total_steps", "head_fraction", "steps_per_epoch", "warmup_fraction",
                  "phase0_lr_shape", "head_lr", "ft_head_lr", "head_groups")


def generate_implicit(structure: nn.Module, options: Any, facts: RunFacts | None = None, *,
                      parameters_only: bool = False) -> ImplicitSchedule:
    """The schedule a run generates from ``structure`` when the user gives none (``options``: a
    :class:`phasetune.RunOptions`): ``options.schedule_style`` over the run's step budget (``facts.total_steps``,
    unless ``schedule_options`` sets ``total_steps`` or ``phase_steps``), with the default settings of
    :func:`phasetune.core.recipes.default_settings` under the ``lpft`` style, ``schedule_options`` overriding them, and
    ``reinit_optim_cfg`` / ``reinit_lr_cfg`` in every later phase. ``parameters_only``: the phases' parameters
    without lengths or lr shapes (what a front end freezes to before the budget is known)."""
    facts = facts or RunFacts()
    style = options.schedule_style
    user = dict(options.schedule_options or {})
    notes = [f"phasetune implicit schedule (style {style!r}): no schedule was given, so it was generated from the "
             "model's structure; edit it and pass it as the schedule to change it"]
    warning = None
    try:
        if style == "pairs":
            raw = generate_schedule(structure, style, **user)
            notes.append("the 'pairs' style has no step budget: phases end by early stopping")
        else:
            if parameters_only:
                user = {k: v for k, v in user.items() if k not in LENGTH_OPTIONS}
            budget, source, why_none = _budget(structure, style, user, facts, parameters_only)
            if budget is None and not parameters_only and not {"phase_steps", "total_steps"} & set(user):
                warning = ("no step budget reached the implicit schedule, so its phases end by early stopping on the "
                           f"metric only, not at a share of the run ({why_none}; or pass schedule_options="
                           "{'total_steps': N}, N the run's optimizer steps)")
                notes.append("budget: none known, so no phase lengths: phases end by early stopping")
            elif budget is not None:
                notes.append(f"budget: {budget} optimizer steps, from {source}")
            if style == DEFAULT_STYLE:
                settings = recipes.default_settings(facts.optimizer_lr, budget, facts.optimizer_groups)
                if parameters_only:
                    settings = {k: v for k, v in settings.items() if k not in LENGTH_OPTIONS}
                notes += recipes.default_notes(facts.optimizer_lr, overridden=set(user) & set(settings))
            else:
                settings = {} if budget is None else {"total_steps": budget}
            raw = generate_schedule(structure, style, **{**settings, **user})
    except ValueError as e:  # bad recipe option values: name the knob they came from
        raise ConfigurationError(f"schedule_style={style!r} with schedule_options="
                                 f"{dict(options.schedule_options or {})!r}: {e}") from e
    for k in range(1, len(raw)):
        if options.reinit_optim_cfg:
            raw[k]["new_optimizer"] = dict(options.reinit_optim_cfg)
        if options.reinit_lr_cfg:
            raw[k]["new_lr_scheduler"] = dict(options.reinit_lr_cfg)
    return ImplicitSchedule(raw, notes, warning)


def _budget(structure: nn.Module, style: str, user: dict[str, Any], facts: RunFacts,
            parameters_only: bool) -> tuple[int | None, str, str]:
    """The step budget the schedule is split over, where it came from, and why there is none (when None)."""
    if "total_steps" in user:
        return user.pop("total_steps"), "schedule_options['total_steps']", ""
    if parameters_only or "phase_steps" in user:
        return None, "", ""
    if facts.total_steps is None:
        return None, "", facts.no_budget or "the run's length is not known"
    structural = {k: v for k, v in user.items() if k not in LENGTH_OPTIONS}
    if style == DEFAULT_STYLE:
        structural.setdefault("include_stem", recipes.DEFAULT_RULE["stem"] == "body")
    n_phases = len(generate_schedule(structure, style, **structural))
    if facts.total_steps < n_phases:
        return None, "", (f"the run's {facts.total_steps} optimizer step(s), from {facts.budget_source}, are fewer "
                          f"than its {n_phases} phases")
    return facts.total_steps, facts.budget_source, ""


def implicit_schedule(structure: nn.Module, options: Any, facts: RunFacts | None = None) -> dict[int, dict[str, Any]]:
    """The raw schedule of :func:`generate_implicit` (its file notes dropped)."""
    return generate_implicit(structure, options, facts).raw
