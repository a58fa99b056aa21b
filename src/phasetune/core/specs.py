"""Optimizer and lr-scheduler specifications (``class_path`` + ``init_args``) used by schedule phases.

A spec names a class by import path (``torch.optim.AdamW``; the bare name ``AdamW`` is looked up in
``torch.optim`` and ``torch.optim.lr_scheduler``) and the keyword arguments to build it with. Specs are
checked when the schedule is loaded: the class must import, be a subclass of what the key expects, and
build on a dummy parameter with the given arguments, so a typo fails before any training compute.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs

LR_SCHEDULER_BASES: tuple[type, ...] = (lrs.LRScheduler, lrs.ReduceLROnPlateau)
# Lightning scheduler-config fields a phase may set under ``pl_lrs_cfg``.
PL_LRS_CFG_KEYS = ("interval", "frequency", "monitor", "strict", "name", "reduce_on_plateau")
# Arguments that name callables in YAML (``module.function``) and are imported before use.
_CALLABLE_ARGS = ("lr_lambda", "scale_fn")
# Schedulers that wrap other schedulers given as nested specs under ``schedulers``.
_COMPOSITE = ("SequentialLR", "ChainedScheduler")


@dataclass(frozen=True)
class ClassSpec:
    """A class named by import path plus the keyword arguments to build it with."""

    class_path: str
    init_args: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"class_path": self.class_path, "init_args": plain_data(self.init_args)}


@dataclass(frozen=True)
class LRSchedulerSpec:
    """What a phase's ``new_lr_scheduler`` key asks for."""

    init: ClassSpec
    pl_lrs_cfg: Mapping[str, Any] = field(default_factory=dict)
    init_pg_lrs: tuple[float, ...] | None = None
    use_current_optimizer_pg_lrs: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lr_scheduler_init": self.init.to_dict()}
        if self.pl_lrs_cfg:
            out["pl_lrs_cfg"] = dict(self.pl_lrs_cfg)
        if self.init_pg_lrs is not None:
            out["init_pg_lrs"] = list(self.init_pg_lrs)
        if self.use_current_optimizer_pg_lrs:
            out["use_current_optimizer_pg_lrs"] = True
        return out


def plain_data(value: Any) -> Any:
    """``value`` as YAML-safe plain data (mappings -> dicts, sequences -> lists), for keys kept raw."""
    if isinstance(value, Mapping):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    return value


def import_class(class_path: str, bases: tuple[type, ...]) -> type:
    """Import ``class_path`` and check it subclasses one of ``bases``; raise ``ValueError`` saying why not."""
    if not isinstance(class_path, str) or not class_path:
        raise ValueError(f"class_path must be a non-empty string, got {class_path!r}")
    candidates = [class_path]
    if "." not in class_path:
        candidates = [f"torch.optim.{class_path}", f"torch.optim.lr_scheduler.{class_path}"]
    obj = None
    errors = []
    for path in candidates:
        module_name, _, attr = path.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            errors.append(f"cannot import module {module_name!r} ({e})")
            continue
        obj = getattr(module, attr, None)
        if obj is not None:
            break
        errors.append(f"module {module_name!r} has no attribute {attr!r}")
    if obj is None:
        raise ValueError(f"cannot import {class_path!r}: {'; '.join(errors)}")
    expected = " or ".join(f"{b.__module__}.{b.__qualname__}" for b in bases)
    if not inspect.isclass(obj) or not issubclass(obj, bases):
        raise ValueError(f"{class_path!r} is not a subclass of {expected}")
    return obj


def import_callable(path: str) -> Any:
    """Import a callable named ``module.attr`` (used for ``lr_lambda`` given as a string in YAML)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{path!r} is not an import path of the form 'module.function'")
    fn = getattr(importlib.import_module(module_name), attr, None)
    if not callable(fn):
        raise ValueError(f"{path!r} does not name a callable")
    return fn


def parse_class_spec(raw: Any, bases: tuple[type, ...]) -> ClassSpec:
    """Check a ``{class_path, init_args}`` mapping and return the spec (raises ``ValueError``)."""
    if isinstance(raw, ClassSpec):
        spec = raw
    else:
        if not isinstance(raw, Mapping):
            raise ValueError(f"expected a mapping with 'class_path' and 'init_args', got {type(raw).__name__}")
        unknown = set(raw) - {"class_path", "init_args"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; only 'class_path' and 'init_args' are allowed")
        if "class_path" not in raw:
            raise ValueError("missing 'class_path' (e.g. class_path: torch.optim.AdamW)")
        init_args = raw.get("init_args") or {}
        if not isinstance(init_args, Mapping):
            raise ValueError(f"'init_args' must be a mapping, got {type(init_args).__name__}")
        spec = ClassSpec(str(raw["class_path"]), dict(init_args))
    import_class(spec.class_path, bases)
    return spec


def build_optimizer(spec: ClassSpec, params: Any) -> Optimizer:
    """Build the optimizer ``spec`` describes over ``params`` (tensors or param-group dicts)."""
    cls = import_class(spec.class_path, (Optimizer,))
    return cls(params, **dict(spec.init_args))


def build_lr_scheduler(spec: ClassSpec, optimizer: Optimizer) -> Any:
    """Build the lr scheduler ``spec`` describes on ``optimizer``.

    ``lr_lambda``/``scale_fn`` given as strings are imported; ``SequentialLR`` and ``ChainedScheduler``
    take their inner schedulers as nested ``{class_path, init_args}`` specs under ``schedulers``.
    """
    cls = import_class(spec.class_path, LR_SCHEDULER_BASES)
    kwargs = dict(spec.init_args)
    for name in _CALLABLE_ARGS:
        value = kwargs.get(name)
        if isinstance(value, str):
            kwargs[name] = import_callable(value)
        elif isinstance(value, list) and any(isinstance(v, str) for v in value):
            kwargs[name] = [import_callable(v) if isinstance(v, str) else v for v in value]
    if cls.__name__ in _COMPOSITE and issubclass(cls, (lrs.SequentialLR, lrs.ChainedScheduler)):
        inner = kwargs.pop("schedulers", None)
        if not isinstance(inner, list) or not inner:
            raise ValueError(f"{cls.__name__} needs 'schedulers': a list of {{class_path, init_args}} specs")
        built = [build_lr_scheduler(parse_class_spec(s, (lrs.LRScheduler,)), optimizer) for s in inner]
        if issubclass(cls, lrs.ChainedScheduler):
            return cls(built, optimizer=optimizer, **kwargs)
        return cls(optimizer, built, **kwargs)
    return cls(optimizer, **kwargs)


def check_optimizer_spec(spec: ClassSpec) -> None:
    """Build the optimizer once on a dummy parameter so bad ``init_args`` fail now (raises ``ValueError``)."""
    try:
        build_optimizer(spec, [torch.nn.Parameter(torch.zeros(1))])
    except Exception as e:  # any construction error is reported with its cause
        raise ValueError(f"{spec.class_path}(**init_args) failed: {type(e).__name__}: {e}") from None


def check_lr_scheduler_spec(spec: ClassSpec) -> None:
    """Build the lr scheduler once on a dummy optimizer so bad ``init_args`` fail now."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        build_lr_scheduler(spec, opt)
    except Exception as e:
        raise ValueError(f"{spec.class_path}(**init_args) failed: {type(e).__name__}: {e}") from None
