"""Logical names of a wrapped or sharded model, used by every sharded path (torch only).

Activation checkpointing, ``torch.compile`` and FSDP1 insert segments into parameter and module names
(``layer._checkpoint_wrapped_module.weight``) and ``fully_shard`` swaps in classes such as ``FSDPBlock``.
Schedules, plans and checkpoints use the names and classes of the unwrapped model; these helpers map
between the two and say which ``fully_shard`` unit manages each parameter.
"""

from __future__ import annotations

from torch import nn

#: name segments that wrappers insert into parameter names (activation checkpointing, torch.compile)
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def logical_name(name: str) -> str:
    """``name`` without the segments wrappers insert (``a._checkpoint_wrapped_module.b`` -> ``a.b``; FSDP1's
    ``_fsdp_wrapped_module`` too)."""
    parts = [p for p in name.split(".") if p not in WRAPPER_SEGMENTS]
    return ".".join(parts)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` itself."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def logical_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Logical module name -> outermost module with that name (a wrapper rather than what it wraps)."""
    out: dict[str, nn.Module] = {}
    for name, m in module.named_modules():
        out.setdefault(logical_name(name), m)
    return out


def module_path(root: nn.Module, logical: str) -> str:
    """The real attribute path of the outermost module whose logical name is ``logical``."""
    for name, _ in root.named_modules():
        if logical_name(name) == logical:
            return name
    raise KeyError(logical)


def root_name(module: nn.Module) -> str:
    """The innermost module of ``module`` that holds every parameter and is called ('' when that is ``module``).

    A container without a ``forward`` of its own (``ModuleList``, ``ModuleDict``) is never called, so FSDP2's
    hooks on it would never gather its parameters: its parent is the root then.
    """
    names = [logical_name(n).split(".")[:-1] for n, _ in module.named_parameters()]
    if not names:
        return ""
    common = names[0]
    for parts in names[1:]:
        k = 0
        while k < min(len(common), len(parts)) and common[k] == parts[k]:
            k += 1
        common = common[:k]
    modules = logical_modules(module)
    while common and type(modules[".".join(common)]).forward is nn.Module.forward:
        common = common[:-1]
    return ".".join(common)


def param_units(module: nn.Module) -> dict[str, str | None]:
    """Logical parameter name -> logical name of the ``fully_shard`` unit managing it (None: unsharded).

    A parameter belongs to the innermost sharded module that contains it.
    """
    units = {logical_name(n) for n, m in module.named_modules() if is_sharded(m)}
    out: dict[str, str | None] = {}
    for name, _ in module.named_parameters():
        logical = logical_name(name)
        parts = logical.split(".")[:-1]
        owner = None
        for depth in range(len(parts), -1, -1):
            candidate = ".".join(parts[:depth])
            if candidate in units:
                owner = candidate
                break
        out[logical] = owner
    return out


def _original_class(m: nn.Module) -> type:
    from torch.distributed.fsdp import FSDPModule

    if is_sharded(m):  # fully_shard swaps in a class FSDP<Name>(FSDPModule, <Name>)
        return next(c for c in type(m).__mro__[1:] if not issubclass(c, FSDPModule))
    return type(m)


def logical_view(module: nn.Module) -> nn.Module:
    """A stand-in tree of ``module`` for reading its structure (schedule generation), not for running.

    It shares ``module``'s parameters under their logical names, skips activation-checkpoint wrappers and
    gives every node its original class name (``Block``, not ``FSDPBlock``), so names and repeated-block
    detection match the unsharded model.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper

    from phasetune.core.generate import stand_in_tree

    def unwrap(m: nn.Module) -> nn.Module:
        while isinstance(m, ActivationWrapper):
            m = next(iter(m.children()))
        return m

    top, _ = stand_in_tree(
        module, unwrap=unwrap, class_of=_original_class, own_params=lambda m: m.named_parameters(recurse=False)
    )
    return top


__all__ = [
    "WRAPPER_SEGMENTS",
    "is_sharded",
    "logical_modules",
    "logical_name",
    "logical_view",
    "module_path",
    "param_units",
    "root_name",
]
