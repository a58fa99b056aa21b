"""FSDP1 (``FullyShardedDataParallel``) helpers: wrap plans, parameter names, alignment checks (torch only).

FSDP1 flattens the parameters of each wrapped module (a *unit*) into one ``FlatParameter``. Two views of
the parameters follow:

- **logical names** -- the names of the unwrapped model (``model.layers.0.lin.weight``); schedules, logs,
  snapshots and checkpoints use them;
- **FSDP names** -- what ``named_parameters()`` of the wrapped model and the optimizer see: with
  ``use_orig_params=False`` one ``..._fsdp_wrapped_module._flat_param`` per unit, with
  ``use_orig_params=True`` the original parameters under names carrying wrapper segments.

:class:`ParamIndex` holds both views and is the one place that translates between them. With
``use_orig_params=False`` every logical parameter of a unit shares the unit's ``FlatParameter``, and so its
``requires_grad``: :func:`alignment_problems` finds units whose parameters belong to different phases.

:func:`plan_wrap` decides which modules become units: what the user's ``auto_wrap_policy`` wraps, plus
modules named in ``awp_overrides``, plus (``min_num_params``) every module holding at least that many
parameters not already in a smaller unit -- the size rule of FairScale's and torch's auto-wrap.
:class:`AlignedWrapPolicy` hands that plan to FSDP.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp.wrap import CustomPolicy, size_based_auto_wrap_policy

from phasetune.sharding.names import logical_name
from phasetune.util.text import few

FLAT_PARAM = "_flat_param"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def fsdp_units(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every FSDP1 instance in ``root`` (``root`` itself included), outermost first."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [(n, m) for n, m in root.named_modules() if isinstance(m, FullyShardedDataParallel)]


# ------------------------------------------------------------------------------------------------ names


@dataclass(frozen=True)
class Unit:
    """One FSDP unit: the module it wraps and the logical parameters flattened into its FlatParameter."""

    module: str  # logical name of the wrapped module ('' for the root)
    module_type: str  # class name of the wrapped module
    fsdp_name: str  # FSDP's name of the FlatParameter (the optimizer's view with use_orig_params=False)
    params: tuple[str, ...]

    def describe(self, root_type: str) -> str:
        return f"{root_type} (the root unit)" if not self.module else f"{self.module!r} ({self.module_type})"


@dataclass
class ParamIndex:
    """Logical and FSDP views of a wrapped model's parameters, and the translation between them.

    ``tensors`` maps each logical name to the tensor that trains it: the unit's ``FlatParameter`` with
    ``use_orig_params=False`` (shared by every parameter of the unit), the original parameter otherwise.
    Parameters FSDP does not manage (``ignored_modules``) map to themselves and have no unit.
    """

    use_orig_params: bool
    root_type: str
    units: list[Unit] = field(default_factory=list)
    fsdp_modules: list[str] = field(default_factory=list)  # logical names of all FSDP modules, empty ones too
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    unit_of: dict[str, Unit] = field(default_factory=dict)
    fsdp_name_of: dict[str, str] = field(default_factory=dict)
    logical_of: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def build(cls, root: nn.Module) -> ParamIndex:
        """Index ``root`` (Lightning's ``strategy.model``): the root FSDP unit, or a module holding units."""
        every = fsdp_units(root)
        units = [(n, m, getattr(m, FLAT_PARAM, None)) for n, m in every]  # FSDP's unit FlatParameter
        units = [(n, m, flat) for n, m, flat in units if flat is not None]
        registered = {id(p): n for n, p in root.named_parameters()}
        # use_orig_params=False registers the FlatParameters; with True they are hidden behind the originals.
        use_orig = not any(id(flat) in registered for _, _, flat in units)
        inner = getattr(root, "module", root)  # FSDP.module: the module the root unit wraps
        index = cls(use_orig_params=use_orig, root_type=type(inner).__name__)
        index.fsdp_modules = [logical_name(n) for n, _ in every]
        for name, module, flat in units:
            prefix = logical_name(name)
            # FSDP1 records the names and shapes of the parameters it flattened only on the FlatParameter.
            params = tuple(_join(prefix, logical_name(fqn)) for fqn in flat._fqns)
            wrapped = type(getattr(module, "module", module)).__name__
            unit = Unit(prefix, wrapped, registered.get(id(flat), _join(name, FLAT_PARAM)), params)
            index.units.append(unit)
            for p, shape in zip(params, flat._shapes):
                index.unit_of[p] = unit
                index.shapes[p] = tuple(shape)
                if not use_orig:
                    index.tensors[p] = flat
                    index.fsdp_name_of[p] = unit.fsdp_name
        flat_ids = {id(flat) for _, _, flat in units}
        for name, p in root.named_parameters():
            if id(p) in flat_ids:
                continue
            logical = logical_name(name)
            index.tensors[logical] = p
            index.fsdp_name_of[logical] = name
            index.shapes.setdefault(logical, tuple(p.shape))  # unmanaged (ignored) parameters keep their shape
        # registration order of the unwrapped model: owning module first, then position within it
        order: dict[str, int] = {}
        for i, (name, _) in enumerate(root.named_modules()):
            order.setdefault(logical_name(name), i)
        position = {n: i for i, n in enumerate(index.tensors)}
        index.tensors = dict(
            sorted(index.tensors.items(), key=lambda kv: (order.get(kv[0].rpartition(".")[0], 0), position[kv[0]]))
        )
        for logical, fsdp in index.fsdp_name_of.items():
            index.logical_of.setdefault(fsdp, []).append(logical)
        return index

    # -- translation (the one place) --------------------------------------------------------------
    def to_fsdp(self, logical: Iterable[str]) -> list[str]:
        """FSDP names (the optimizer's view) of logical parameter names, without repeats, in order."""
        return list(dict.fromkeys(self.fsdp_name_of[n] for n in logical))

    def to_logical(self, fsdp: Iterable[str]) -> list[str]:
        """Logical parameter names behind FSDP names (a FlatParameter's name stands for all of its unit's)."""
        out: list[str] = []
        for n in fsdp:
            out.extend(self.logical_of.get(n, [logical_name(n)]))
        return list(dict.fromkeys(out))


def local_numel(index: ParamIndex, names: Iterable[str]) -> int:
    """Elements of the logical parameters ``names`` held by this rank (its shards)."""
    seen: set[int] = set()
    total = 0
    for n in names:
        t = index.tensors[n]
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def logical_skeleton(root: nn.Module, index: ParamIndex) -> nn.Module:
    """A stand-in tree of the unwrapped model (meta parameters of logical shapes) for reading its structure.

    FSDP1 replaces modules by wrappers and, with ``use_orig_params=False``, the parameters by FlatParameters;
    implicit schedule generation needs the original tree: module names, class names, ``_no_split_modules``
    and parameters in registration order.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper
    from torch.distributed.fsdp import FullyShardedDataParallel

    from phasetune.core.generate import stand_in_tree

    def unwrap(m: nn.Module) -> nn.Module:
        while isinstance(m, (FullyShardedDataParallel, ActivationWrapper)):
            m = next(iter(m.children()))
        return m

    top, views = stand_in_tree(root, unwrap=unwrap)
    for name in index.tensors:
        owner, _, pname = name.rpartition(".")
        if owner in views:
            views[owner].register_parameter(pname, nn.Parameter(torch.empty(index.shapes[name], device="meta")))
    return top


# ------------------------------------------------------------------------------------------------ wrapping


@dataclass
class WrapPlan:
    """Modules :func:`plan_wrap` chose: ``targets`` (module id -> True or per-module FSDP kwargs)."""

    targets: dict[int, bool | dict[str, Any]] = field(default_factory=dict)
    wrapped: list[str] = field(default_factory=list)  # logical module names, in module order
    override_matches: dict[str, list[str]] = field(default_factory=dict)  # awp_overrides entry -> modules

    @property
    def unmatched(self) -> list[str]:
        return [k for k, v in self.override_matches.items() if not v]


def match_modules(entry: str, names: Iterable[str]) -> list[str]:
    """Module names equal to ``entry`` or matched whole by it as a regex."""
    try:
        rx = re.compile(entry)
    except re.error:
        rx = None
    return [n for n in names if n == entry or (rx is not None and rx.fullmatch(n))]


def plan_wrap(
    root: nn.Module,
    policy: Any = None,
    overrides: Sequence[str] = (),
    min_num_params: int | None = None,
    ignored_modules: Iterable[nn.Module] = (),
) -> WrapPlan:
    """Which submodules of ``root`` become FSDP units (``root`` itself always is one).

    ``policy`` is the user's ``auto_wrap_policy``: a torch policy object (``ModuleWrapPolicy``,
    ``CustomPolicy``, ...) or a callable ``(module, recurse, nonwrapped_numel) -> bool``. The result is the
    union of what ``policy`` wraps, the modules ``overrides`` name, and, with ``min_num_params``, torch's
    size rule. Callables are evaluated bottom-up exactly as FSDP does (``nonwrapped_numel`` excludes
    parameters already in a unit below).
    """
    ignored = set(ignored_modules)
    ignored_params = {id(p) for m in ignored for p in m.parameters()}
    names = {id(m): logical_name(n) for n, m in root.named_modules()}
    plan = WrapPlan()
    chosen: set[int] = set()
    for entry in overrides:
        hits = match_modules(entry, [n for n in names.values() if n])
        plan.override_matches[entry] = hits
    named = {logical_name(n): m for n, m in root.named_modules()}
    hits = {h for found in plan.override_matches.values() for h in found}
    override_ids = {id(named[h]) for h in hits}
    must_visit = set(override_ids)  # the overrides and their ancestors: recursion has to reach them
    for h in hits:
        parts = h.split(".")
        must_visit.update(id(named[a]) for a in (".".join(parts[:k]) for k in range(len(parts))) if a in named)

    from torch.distributed.fsdp.wrap import _Policy  # the base class of torch's policy objects

    user_targets: dict[nn.Module, dict[str, Any]] = {}
    user_fn: Callable[..., bool] | None = None
    if isinstance(policy, _Policy):
        # _run_policy is how FSDP itself asks a policy object for its targets (module -> kwargs).
        user_targets = policy._run_policy(root, ignored, {})
    elif policy is not None:
        user_fn = policy
    size_fn = partial(size_based_auto_wrap_policy, min_num_params=min_num_params) if min_num_params else None

    def recurse(m: nn.Module, numel: int) -> bool:
        return (
            id(m) in must_visit
            or bool(user_targets) or isinstance(policy, _Policy)
            or (user_fn is not None and user_fn(module=m, recurse=True, nonwrapped_numel=numel))
            or (size_fn is not None and size_fn(module=m, recurse=True, nonwrapped_numel=numel))
        )

    def wrap(m: nn.Module, numel: int) -> bool | dict[str, Any]:
        if m in user_targets:
            return user_targets[m] or True
        return (
            id(m) in override_ids
            or (user_fn is not None and user_fn(module=m, recurse=False, nonwrapped_numel=numel))
            or (size_fn is not None and size_fn(module=m, recurse=False, nonwrapped_numel=numel))
        )

    def visit(m: nn.Module, is_root: bool) -> int:
        numel = sum(p.numel() for p in m.parameters() if id(p) not in ignored_params)
        if not recurse(m, numel):
            return 0
        below = sum(visit(c, False) for c in m.children() if c not in ignored)
        decision = False if is_root else wrap(m, numel - below)
        if decision:
            plan.targets[id(m)] = decision
            chosen.add(id(m))
            return numel
        return below

    visit(root, True)
    plan.wrapped = [names[id(m)] for m in root.modules() if id(m) in chosen]
    return plan


class AlignedWrapPolicy(CustomPolicy):
    """The ``auto_wrap_policy`` phasetune gives FSDP: the user's policy plus ``awp_overrides`` and size rule.

    The plan is computed on the module FSDP wraps, when it wraps it; :attr:`plan` then says what was chosen
    (``None``: FSDP never asked, e.g. the model was wrapped by hand in ``configure_model``).
    """

    def __init__(self, user_policy: Any = None, overrides: Sequence[str] = (), min_num_params: int | None = None):
        super().__init__(self._decide)
        self.user_policy = user_policy
        self.overrides = tuple(overrides)
        self.min_num_params = min_num_params
        self.plan: WrapPlan | None = None

    def _run_policy(
        self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: dict[str, Any]
    ) -> dict[nn.Module, dict[str, Any]]:
        # FSDP calls _run_policy with the module it wraps; plan on exactly that module, then let CustomPolicy
        # turn the decisions into its module -> kwargs map.
        self.plan = plan_wrap(root_module, self.user_policy, self.overrides, self.min_num_params, ignored_modules)
        return super()._run_policy(root_module, ignored_modules, root_kwargs)

    def _decide(self, module: nn.Module) -> bool | dict[str, Any]:
        return self.plan.targets.get(id(module), False) if self.plan is not None else False


# ------------------------------------------------------------------------------------------------ checks


def alignment_problems(index: ParamIndex, phase_of: Mapping[str, int]) -> list[str]:
    """Everything about the wrapping that would break the schedule (one message per kind of problem).

    ``phase_of`` maps each scheduled logical name to its phase (phases beyond ``max_depth`` included:
    thawing a unit thaws them too). With ``use_orig_params=False`` a unit whose parameters belong to more
    than one phase -- or mix scheduled and unscheduled ones -- is an error. Phase 0 must hold at least one
    parameter FSDP manages.
    """
    problems = []
    phase0 = [n for n, k in phase_of.items() if k == 0]
    if phase0 and not any(n in index.unit_of for n in phase0):
        problems.append(
            f"phase 0 holds no parameter that FSDP wraps (its {len(phase0)} parameters, e.g. {phase0[0]!r}, are "
            "in modules FSDP ignores); the optimizer would train nothing FSDP synchronises in phase 0. Put "
            "parameters of wrapped modules in phase 0, or take their modules out of ignored_modules."
        )
    if index.use_orig_params:
        return problems
    mixed = [u for u in index.units if len({phase_of.get(p) for p in u.params}) > 1]
    if not mixed:
        return problems
    lines = []
    unscheduled = False
    for u in mixed:
        for p in u.params:
            k = phase_of.get(p)
            unscheduled |= k is None
            where = f"phase {k}" if k is not None else "not in the schedule"
            lines.append(f"    {p!r} ({where}) -> unit of {u.describe(index.root_type)}")
    fixes = sorted({m for u in mixed for m in _split_suggestion(u, phase_of)})
    msg = (
        "FSDP units mix parameters of different phases. With use_orig_params=False FSDP flattens each unit's "
        "parameters into one FlatParameter that is frozen or thawed as a whole, so thawing one phase would thaw "
        "the others' parameters in the same unit. Each parameter of a mixed unit, its phase, and the module "
        "whose unit holds it:\n" + "\n".join(lines)
    )
    if unscheduled:
        msg += (
            "\n  Parameters not in the schedule would train from the phase that thaws their unit; add them to "
            "that phase or wrap their modules separately."
        )
    if any(not u.module for u in mixed):
        msg += (
            "\n  HINT: parameters of modules that are not wrapped in their own unit are left to the root unit "
            f"({index.root_type}); wrap every module whose parameters are scheduled separately from the root."
        )
    msg += (
        f"\n  To fix: wrap modules so that each unit's parameters belong to one phase, e.g. add {fixes} to "
        "strategy_adapter_cfg={'awp_overrides': [...]} (or to the auto_wrap_policy), change the schedule to "
        "follow the units, or use FSDPStrategy(use_orig_params=True), which allows mixed units."
    )
    problems.append(msg)
    return problems


def _split_suggestion(unit: Unit, phase_of: Mapping[str, int]) -> list[str]:
    """Modules to wrap so ``unit`` no longer mixes phases.

    The unit keeps its most common phase; every other parameter is covered by the outermost module inside
    the unit whose parameters (in this unit) all share that parameter's phase.
    """
    by_phase: dict[int | None, list[str]] = {}
    for p in unit.params:
        by_phase.setdefault(phase_of.get(p), []).append(p)
    keep = max(by_phase, key=lambda k: (len(by_phase[k]), k is None))
    depth = len(unit.module.split(".")) if unit.module else 0
    out: list[str] = []
    for p in unit.params:
        k = phase_of.get(p)
        if k == keep:
            continue
        parts = p.split(".")
        for end in range(depth + 1, len(parts)):
            module = ".".join(parts[:end])
            inside = [q for q in unit.params if q.startswith(module + ".")]
            if all(phase_of.get(q) == k for q in inside):
                out.append(module)
                break
        else:
            out.append(p.rpartition(".")[0])
    return list(dict.fromkeys(out))


def root_problems(index: ParamIndex) -> list[str]:
    """More than one outermost unit (modules wrapped by hand with no enclosing FSDP module) is an error.

    Each outermost unit acts as an FSDP root, and FSDP1 fails in backward when a root unit's parameters are
    frozen -- which is what a schedule does to most of the model.
    """
    modules = index.fsdp_modules
    if "" in modules or len(modules) < 2:
        return []
    roots = [m for m in modules if not any(m.startswith(o + ".") for o in modules if o != m)]
    if len(roots) < 2:
        return []
    return [
        f"the model has {len(roots)} outermost FSDP units ({few(roots)}), wrapped by hand with no FSDP module "
        "enclosing them; each acts as an FSDP root, and FSDP fails in backward when a root's parameters are "
        "frozen, as a schedule freezes them. Wrap an enclosing module last in configure_model (e.g. "
        "self.model = wrap(self.model)) so the model has one root unit."
    ]


def unmanaged_scheduled(index: ParamIndex, phase_of: Mapping[str, int]) -> list[str]:
    """Scheduled parameters FSDP does not manage (ignored modules): their gradients are not synchronised."""
    return [n for n in phase_of if n not in index.unit_of]


# ------------------------------------------------------------------------------------------------ checkpoints


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer``'s state consolidated on rank 0 and keyed by logical names (empty elsewhere).

    Call on every rank. ``model`` is the outermost FSDP module. The result is what
    ``FSDP.optim_state_dict_to_load`` reads back for an optimizer whose param groups hold the same
    parameters, whichever ``use_orig_params`` the model runs with; the groups keep their other keys
    (``lr``, ``ft_phase``, ...).
    """
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # on CPU, torch 2.13's offload frees each gathered tensor before it is read (every saved exp_avg came out as
    # exp_avg_sq): offload only what is not on the CPU already
    offload = any(p.device.type != "cpu" for p in model.parameters())
    with FSDP.state_dict_type(
        model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(rank0_only=True),
        FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True),
    ):
        return FSDP.optim_state_dict(model, optimizer)
