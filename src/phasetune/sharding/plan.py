"""FSDP2 ``fsdp_plan``: shard modules chosen by name or regex with ``fully_shard``.

A plan maps module names (or regexes matching whole module names) to ``fully_shard`` keyword arguments::

    {"model.layers.\\d+": {"act_ckpt": "composable"}, "model.norm": {}, "model.head": {"reshard_after_forward": False}}

Entries are applied in the given order, each after ``fsdp_default_kwargs`` are merged under it. Two aliases
are not ``fully_shard`` arguments: ``act_ckpt`` (activation checkpointing, applied to the module before it is
sharded: ``"composable"``, ``"wrapped"`` or ``"wrapped_offload"``, optionally with a dict of kwargs, e.g.
``["wrapped", {"preserve_rng_state": False}]``) and ``cpu_offload_policy`` (a dict of ``CPUOffloadPolicy``
kwargs, ``{}`` for the defaults). ``mp_policy`` may be a dict with dtype names (``{"param_dtype":
"bfloat16"}``). Finally the root -- the innermost module holding every parameter -- is sharded if nothing
sharded it yet, so no parameter is left unsharded (its gradients would not be synchronised).

Only torch is needed: :func:`apply_plan` works on any ``nn.Module`` with an optional ``DeviceMesh``; the
Lightning adapter and the plain-PyTorch strategy both call it. Module names are logical names
(:mod:`phasetune.sharding.names`): wrapper segments such as ``_checkpoint_wrapped_module`` do not count.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from phasetune.errors import ConfigurationError
from phasetune.sharding.names import is_sharded, logical_modules, module_path, root_name

ACT_CKPT_MODES = ("composable", "wrapped", "wrapped_offload")
ALIASES = ("act_ckpt", "cpu_offload_policy")


def _fully_shard() -> Any:
    from torch.distributed.fsdp import fully_shard

    return fully_shard


def fully_shard_kwargs() -> tuple[str, ...]:
    """The keyword arguments ``fully_shard`` takes in this torch."""
    return tuple(n for n in inspect.signature(_fully_shard()).parameters if n != "module")


@dataclass(frozen=True)
class ActCkpt:
    """Activation checkpointing for a module: ``mode`` is one of :data:`ACT_CKPT_MODES`."""

    mode: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanEntry:
    """One validated ``fsdp_plan`` entry: the key as written, ``fully_shard`` kwargs and checkpointing."""

    key: str
    shard_kwargs: Mapping[str, Any]
    act_ckpt: ActCkpt | None = None


@dataclass
class PlanReport:
    """What :func:`apply_plan` did: modules sharded (in order), checkpointing applied, notes, the root."""

    sharded: list[str] = field(default_factory=list)
    act_ckpt: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    root: str | None = None
    matches: dict[str, list[str]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ parsing


def _parse_act_ckpt(value: Any, where: str, problems: list[str]) -> ActCkpt | None:
    if value is None or isinstance(value, ActCkpt):
        return value
    mode, kwargs = value, None
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) not in (1, 2):
            problems.append(f"{where}: act_ckpt must be a mode or [mode, kwargs], got {value!r}")
            return None
        mode, kwargs = value[0], (value[1] if len(value) == 2 else None)
    if mode not in ACT_CKPT_MODES:
        problems.append(f"{where}: act_ckpt mode {mode!r} is not one of {', '.join(ACT_CKPT_MODES)}")
        return None
    if kwargs is not None and not isinstance(kwargs, Mapping):
        problems.append(f"{where}: act_ckpt kwargs must be a dict, got {type(kwargs).__name__}")
        return None
    if mode == "wrapped_offload" and kwargs:
        problems.append(f"{where}: act_ckpt 'wrapped_offload' takes no kwargs (got {sorted(kwargs)})")
        return None
    return ActCkpt(mode, dict(kwargs or {}))


def _dtype(value: Any) -> Any:
    if isinstance(value, str):
        dt = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"{value!r} is not a torch dtype")
        return dt
    return value


def _parse_kwargs(raw: Mapping[str, Any], where: str, problems: list[str]) -> tuple[dict[str, Any], ActCkpt | None]:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    allowed = fully_shard_kwargs()
    kwargs: dict[str, Any] = {}
    for k, v in raw.items():
        if k not in allowed and k not in ALIASES:
            problems.append(
                f"{where}: {k!r} is not a fully_shard argument (it takes {', '.join(allowed)}) nor an alias "
                f"({', '.join(ALIASES)})"
            )
        else:
            kwargs[k] = v
    act = _parse_act_ckpt(kwargs.pop("act_ckpt", None), where, problems)
    offload = kwargs.pop("cpu_offload_policy", None)
    if offload is not None:
        if "offload_policy" in kwargs:
            problems.append(f"{where}: give either cpu_offload_policy or offload_policy, not both")
        elif offload is True:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        elif isinstance(offload, Mapping):
            try:
                kwargs["offload_policy"] = CPUOffloadPolicy(**offload)
            except TypeError as e:
                problems.append(f"{where}: cpu_offload_policy {dict(offload)!r}: {e}")
        elif offload is not False:
            problems.append(f"{where}: cpu_offload_policy must be a dict of CPUOffloadPolicy kwargs, got {offload!r}")
    mp = kwargs.get("mp_policy")
    if isinstance(mp, Mapping):
        try:
            kwargs["mp_policy"] = MixedPrecisionPolicy(**{k: _dtype(v) if k.endswith("dtype") else v for k, v in mp.items()})
        except (TypeError, ValueError) as e:
            problems.append(f"{where}: mp_policy {dict(mp)!r}: {e}")
    return kwargs, act


def parse_plan(plan: Mapping[str, Any] | None, default_kwargs: Mapping[str, Any] | None = None) -> list[PlanEntry]:
    """Validate ``plan`` and ``default_kwargs`` (no model needed); raise one ConfigurationError listing all problems.

    Entry kwargs win over ``default_kwargs``; an entry's ``act_ckpt: None`` switches off a default one.
    """
    problems: list[str] = []
    if plan is not None and not isinstance(plan, Mapping):
        raise ConfigurationError(f"fsdp_plan must be a dict of module name or regex -> fully_shard kwargs, got {type(plan).__name__}")
    if default_kwargs is not None and not isinstance(default_kwargs, Mapping):
        raise ConfigurationError(f"fsdp_default_kwargs must be a dict of fully_shard kwargs, got {type(default_kwargs).__name__}")
    defaults = dict(default_kwargs or {})
    _parse_kwargs(defaults, "fsdp_default_kwargs", problems)
    entries = []
    for key, raw in (plan or {}).items():
        where = f"fsdp_plan entry '{key}'"
        if not isinstance(key, str) or not key:
            problems.append(f"fsdp_plan keys must be non-empty module names or regexes, got {key!r}")
            continue
        try:
            re.compile(key)
        except re.error as e:
            problems.append(f"{where} is neither a module name nor a valid regex ({e})")
            continue
        if raw is not None and not isinstance(raw, Mapping):
            problems.append(f"{where}: the value must be a dict of fully_shard kwargs (or empty), got {type(raw).__name__}")
            continue
        merged = {**defaults, **(raw or {})}
        kwargs, act = _parse_kwargs(merged, where, problems)
        entries.append(PlanEntry(key, kwargs, act))
    if problems:
        raise ConfigurationError(problems)
    return entries


def strategy_defaults(
    default_kwargs: Mapping[str, Any] | None,
    *,
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: bool | None = None,
    cpu_offload: bool = False,
) -> dict[str, Any]:
    """``fsdp_default_kwargs`` with a strategy's own switches filled in where the user set nothing.

    ``param_dtype``: gather parameters in that dtype and reduce gradients in float32 (``mp_policy``);
    ``reshard_after_forward``: FSDP2's flag (None: its default); ``cpu_offload``: ``CPUOffloadPolicy()``. The
    plain strategy and the memory plan both build their defaults here, so a plan shards like the run.
    """
    defaults = dict(default_kwargs or {})
    if reshard_after_forward is not None:
        defaults.setdefault("reshard_after_forward", reshard_after_forward)
    if param_dtype is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        defaults.setdefault("mp_policy", MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32))
    if cpu_offload and "offload_policy" not in defaults:
        defaults.setdefault("cpu_offload_policy", {})
    return defaults


def default_shard_kwargs(default_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``fully_shard`` kwargs of the root: ``fsdp_default_kwargs`` without activation checkpointing."""
    problems: list[str] = []
    kwargs, _ = _parse_kwargs(dict(default_kwargs or {}), "fsdp_default_kwargs", problems)
    if problems:
        raise ConfigurationError(problems)
    return kwargs


# ------------------------------------------------------------------------------------------------ matching


def match_plan(module: nn.Module, entries: Sequence[PlanEntry]) -> list[tuple[PlanEntry, list[str]]]:
    """The logical module names each entry shards, in application order; raises on every problem at once.

    Problems: an entry matching no module (with nearby names), a matched ``ModuleList``/``ModuleDict`` (a
    container without ``forward``), a module listed after a module containing it (FSDP2 shards inner
    modules first) or inside a module that was already sharded.
    """
    modules = logical_modules(module)
    names = [n for n in modules if n]
    problems: list[str] = []
    out: list[tuple[PlanEntry, list[str]]] = []
    for e in entries:
        if e.key in modules:
            found = [e.key]
        else:
            rx = re.compile(e.key)
            found = [n for n in names if rx.fullmatch(n)]
        where = f"fsdp_plan entry '{e.key}'"
        if not found:
            problems.append(f"{where} matches no module of {type(module).__name__}; {_nearby(e.key, names)}")
            continue
        containers = [n for n in found if isinstance(modules[n], (nn.ModuleList, nn.ModuleDict))]
        if containers:
            eg = containers[0]
            problems.append(
                f"{where} matches {type(modules[eg]).__name__} {eg!r}, a container that has no forward of its own, so "
                f"fully_shard cannot gather its parameters; shard its items instead, e.g. '{re.escape(eg)}\\.\\d+'"
                if isinstance(modules[eg], nn.ModuleList) else
                f"{where} matches {type(modules[eg]).__name__} {eg!r}, a container that has no forward of its own, so "
                f"fully_shard cannot gather its parameters; shard its items instead, e.g. '{re.escape(eg)}\\..*'"
            )
            continue
        # inner modules first within one entry (FSDP2 cannot shard a module inside an already sharded one)
        depth = {n: n.count(".") for n in found}
        found.sort(key=lambda n: -depth[n])
        out.append((e, found))
    seen: list[tuple[str, str]] = []  # (module, entry key) in application order
    for e, found in out:
        for n in found:
            for earlier, key in seen:
                if n != earlier and (earlier == "" or n.startswith(earlier + ".")):
                    problems.append(
                        f"fsdp_plan entry '{e.key}' shards {n!r}, which lies inside {earlier!r} sharded before it by "
                        f"entry '{key}'; FSDP2 shards inner modules first: list '{e.key}' before '{key}'"
                    )
            outer = _sharded_ancestor(modules, n)
            if outer is not None and not is_sharded(modules[n]):
                problems.append(
                    f"fsdp_plan entry '{e.key}' shards {n!r}, but {outer or 'the root module'!r} containing it was already "
                    "sharded (in configure_model); shard inner modules there first, or leave this one out of the plan"
                )
            seen.append((n, e.key))
    if problems:
        raise ConfigurationError(problems)
    return out


def _sharded_ancestor(modules: Mapping[str, nn.Module], name: str) -> str | None:
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        anc = ".".join(parts[:depth])
        if anc in modules and is_sharded(modules[anc]):
            return anc
    return None


def _nearby(key: str, names: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    if close:
        return "did you mean " + ", ".join(repr(c) for c in close) + "?"
    shown = ", ".join(repr(n) for n in names[:6])
    return f"module names look like {shown}" + (" ..." if len(names) > 6 else "")


# ------------------------------------------------------------------------------------------------ applying


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def apply_act_ckpt(root: nn.Module, name: str, cfg: ActCkpt) -> nn.Module:
    """Apply activation checkpointing to submodule ``name`` of ``root``; return the module to shard.

    ``composable`` marks the module in place; ``wrapped``/``wrapped_offload`` replace it in its parent by a
    wrapper (parameter names gain a ``_checkpoint_wrapped_module`` segment; :func:`logical_name` drops it).
    """
    module = root.get_submodule(name) if name else root
    if cfg.mode == "composable":
        from torch.distributed._composable import checkpoint

        checkpoint(module, **dict(cfg.kwargs))
        return module
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper,
        offload_wrapper,
    )

    if not name:
        raise ConfigurationError(f"act_ckpt {cfg.mode!r} wraps a module in its parent; the root module has none")
    wrapped = offload_wrapper(module) if cfg.mode == "wrapped_offload" else checkpoint_wrapper(module, **dict(cfg.kwargs))
    _set_submodule(root, name, wrapped)
    return wrapped


def apply_fully_shard(module: nn.Module, kwargs: Mapping[str, Any], mesh: Any = None) -> nn.Module:
    """``fully_shard(module, mesh=mesh, **kwargs)`` (a ``mesh`` in ``kwargs`` wins)."""
    kw = dict(kwargs)
    if mesh is not None:
        kw.setdefault("mesh", mesh)
    return _fully_shard()(module, **kw)


def reshard_all(module: nn.Module) -> int:
    """Free the gathered (unsharded) parameters of every unit in ``module``; returns how many units.

    Call it after writing sharded parameters out of band (restoring a snapshot, loading weights): a unit
    left gathered -- ``reshard_after_forward=False``, or after a forward without backward -- would
    otherwise keep computing with its stale gathered copy.
    """
    units = [m for m in module.modules() if is_sharded(m)]
    for m in units:
        m.reshard()
    return len(units)


def refresh_unit_dtypes(module: nn.Module) -> int:
    """Re-derive each FSDP2 unit's gradient dtypes from the parameters trainable now; returns how many units.

    FSDP2 fixes a unit's original and reduce dtypes at its first forward from the parameters that require
    grad then (``FSDPParamGroup._init_mp_dtypes``, torch 2.13). A unit frozen at that moment keeps none, so
    after a thaw under a ``mp_policy`` its reduced gradients stay in the compute dtype and backward fails with
    "attempting to assign a gradient with dtype 'c10::BFloat16' to a tensor with grad_dtype 'Float'". Call
    this after every thaw (it does nothing to units already right, and nothing without mixed precision).
    """
    count = 0
    for m in module.modules():
        state = m._get_fsdp_state() if is_sharded(m) else None  # type: ignore[operator]
        group = getattr(state, "_fsdp_param_group", None)
        if group is None or not hasattr(group, "_init_mp_dtypes"):
            continue
        if any(p.sharded_param.requires_grad for p in group.fsdp_params):
            group._init_mp_dtypes()
            count += 1
    return count


def apply_plan(
    module: nn.Module,
    plan: Mapping[str, Any] | Sequence[PlanEntry] | None,
    *,
    mesh: Any = None,
    default_kwargs: Mapping[str, Any] | None = None,
    shard_root: bool = True,
) -> PlanReport:
    """Apply ``plan`` to ``module`` (see the module docstring) and shard the root last if nothing did.

    ``plan`` is a raw dict (validated with ``default_kwargs``) or entries from :func:`parse_plan` (whose
    defaults are already merged; ``default_kwargs`` then only serves the root). Modules already sharded are
    skipped with a note. Raises :class:`~phasetune.errors.ConfigurationError` listing every problem before
    sharding anything.
    """
    entries = parse_plan(plan, default_kwargs) if plan is None or isinstance(plan, Mapping) else list(plan)
    matched = match_plan(module, entries)
    root = root_name(module)
    report = PlanReport()
    done: set[str] = set()
    for entry, names in matched:
        report.matches[entry.key] = list(names)
        for n in names:
            target = logical_modules(module)[n]
            if n in done or is_sharded(target):
                by = "an earlier fsdp_plan entry" if n in done else "configure_model"
                report.notes.append(f"{n or 'the root module'!r} was already sharded by {by}; fsdp_plan entry '{entry.key}' skipped it")
                continue
            if entry.act_ckpt is not None:
                target = apply_act_ckpt(module, module_path(module, n), entry.act_ckpt)
                report.act_ckpt[n] = entry.act_ckpt.mode
            apply_fully_shard(target, entry.shard_kwargs, mesh)
            report.sharded.append(n)
            done.add(n)
    if shard_root:
        target = logical_modules(module)[root]
        if not is_sharded(target):
            apply_fully_shard(target, default_shard_kwargs(default_kwargs), mesh)
            report.sharded.append(root)
        report.root = root
    return report


__all__ = [
    "ACT_CKPT_MODES",
    "ActCkpt",
    "PlanEntry",
    "PlanReport",
    "apply_act_ckpt",
    "apply_fully_shard",
    "apply_plan",
    "match_plan",
    "parse_plan",
    "refresh_unit_dtypes",
    "reshard_all",
    "strategy_defaults",
]
