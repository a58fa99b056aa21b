"""Implicit schedules: generate a reasonable schedule from a model's structure.

Structural styles:

* ``"blocks"`` keeps modules whole: the head (everything registered after the last
  repeated block) trains first, then one repeated block per phase from the top down (a transformer
  layer, a ResNet stage, ...), then the stem (embeddings and anything registered before the first block).
* ``"pairs"`` is the classic heuristic of the original scheduler: parameters in reverse registration
  order, two per phase.

Repeated blocks are modules whose class is listed in the model's ``_no_split_modules`` (Hugging Face
models set it), else children of a ``ModuleList``/``Sequential`` that share a class and own parameters.

Recipes (:mod:`phasetune.recipes`) lay lrs, per-phase lr shapes and phase lengths over the block-wise
structure: ``"lpft"`` (the default, :data:`DEFAULT_STYLE`) and ``"discriminative"``, and ``"blocks"`` itself
takes their options (``lr``, ``phase_steps``, ...). ``generate_schedule(model, style, **options)`` serves
them all.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Literal

from torch import nn

from phasetune import recipes
from phasetune.errors import ConfigurationError
from phasetune.report import whole_modules

Style = Literal["blocks", "pairs", "lpft", "discriminative"]
STYLES = ("blocks", "pairs", "lpft", "discriminative")
#: the style used when none is given: ``"lpft"``, the recipe that ties tuned full fine-tuning at the same steps
#: (a quarter of them for the head, at a high lr) for about 0.6x its wall time (bench/results/quality.md)
DEFAULT_STYLE: Style = "lpft"


def generate_schedule(model: nn.Module, style: Style = DEFAULT_STYLE, params_per_phase: int = 2,
                      **options: Any) -> dict[int, dict[str, Any]]:
    """Return a raw schedule dict (phase -> ``{"params": [...], ...}``) for ``model``.

    ``style`` is one of :data:`STYLES` (see the module docstring); ``params_per_phase`` is the ``"pairs"``
    style's; ``options`` are a recipe's (:data:`phasetune.recipes.OPTIONS`), accepted by every style but
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


def implicit_schedule(structure: nn.Module, options: Any) -> dict[int, dict[str, Any]]:
    """The schedule a run generates from ``structure`` when the user gives none: ``options.schedule_style``, with
    ``options.reinit_optim_cfg`` / ``reinit_lr_cfg`` (a :class:`phasetune.RunOptions`) in every later phase."""
    try:
        raw = generate_schedule(structure, options.schedule_style, **dict(options.schedule_options or {}))
    except ValueError as e:  # bad recipe option values: name the knob they came from
        raise ConfigurationError(f"schedule_style={options.schedule_style!r} with schedule_options="
                                 f"{dict(options.schedule_options or {})!r}: {e}") from e
    for k in range(1, len(raw)):
        if options.reinit_optim_cfg:
            raw[k]["new_optimizer"] = dict(options.reinit_optim_cfg)
        if options.reinit_lr_cfg:
            raw[k]["new_lr_scheduler"] = dict(options.reinit_lr_cfg)
    return raw
