"""The memory plan of the run about to start, checked before phase 0: what a front end calls at fit start.

A front end holds a built model, not a recipe, so :func:`model_for_plan` finds what the plan can rebuild it from
under fake tensors: a Hugging Face model's config (naming the model's own class), also when the model is held as
one attribute of a wrapper (a ``LightningModule``'s ``self.model``: ``name_prefix`` then keeps the schedule's
names). :func:`check_fit` plans the run in a fresh process (the run's process group is already up) and raises
before phase 0 when a phase will not fit, naming it and by how much. :func:`device_gib` gives the device size
that turns the check on by default on CUDA.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from phasetune.errors import ConfigurationError
from phasetune.plan.result import MemoryPlan
from phasetune.plan.setup import GiB


def device_gib(device: torch.device | str | int | None = None) -> float | None:
    """Total memory of the CUDA device in GiB (``device``: the run's, default the current one); None when the
    device is not CUDA (the check is then off unless asked for with a size)."""
    if device is not None and torch.device(device).type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device()).total_memory / GiB


def _unwrapped(module: nn.Module) -> nn.Module:
    """The module a DDP, FSDP1 or ``torch.compile`` wrapper holds (the run's parameter names skip their segments)."""
    while True:
        if type(module).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel") and isinstance(
                getattr(module, "module", None), nn.Module):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            module = module._orig_mod
        else:
            return module


def _hf_class(module: nn.Module) -> type | None:
    """The transformers class ``module`` is: its own, or the one ``fully_shard`` subclassed (``FSDP<Class>``)."""
    import transformers

    cls = type(module)
    if cls.__bases__ and cls.__name__ == f"FSDP{cls.__bases__[-1].__name__}":  # fully_shard's (FSDPModule, cls)
        cls = cls.__bases__[-1]
    return cls if getattr(transformers, cls.__name__, None) is cls else None


def _hf_config(module: nn.Module) -> Any:
    config = getattr(module, "config", None)
    if config is None or not type(config).__name__.endswith("Config") or not hasattr(config, "to_dict"):
        return None
    cls = _hf_class(module)
    if cls is None:
        return None  # a class transformers cannot name: the plan could not rebuild it from the config
    config = copy.deepcopy(config)
    config.architectures = [cls.__name__]  # the model's own class, not the checkpoint's
    return config


def model_for_plan(module: nn.Module) -> tuple[Any, str]:
    """``(model, name_prefix)`` for :func:`~phasetune.plan.plan_memory` to rebuild ``module`` from: a Hugging Face
    model's config, or the config of the one Hugging Face model a wrapper holds as an attribute (with that
    attribute as ``name_prefix``) when the wrapper has no parameters of its own. Raises ConfigurationError saying
    to name the model (a config path or ``"module:factory"``) otherwise."""
    module = _unwrapped(module)
    config = _hf_config(module)
    if config is not None:
        return config, ""
    held = [(name, child) for name, child in module.named_children() if _hf_config(_unwrapped(child)) is not None]
    if len(held) == 1:
        name, child = held[0]
        own = {id(p) for p in module.parameters()} - {id(p) for p in child.parameters()}
        if not own:
            return _hf_config(_unwrapped(child)), name
    raise ConfigurationError(
        f"the memory plan cannot rebuild {type(module).__name__} under fake tensors (it is no Hugging Face model, nor "
        "a wrapper holding exactly one and nothing else): name the model for the plan, a config path or "
        "'package.module:factory' returning it (with its schedule names), or switch the memory check off"
    )


def check_fit(schedule: Any, model: Any, *, isolated: bool = True, **kwargs: Any) -> MemoryPlan:
    """Plan the run (``kwargs``: :func:`~phasetune.plan.plan_memory`'s, with ``device_gib``) and raise
    ConfigurationError before phase 0 when a phase will not fit: one line per such phase, by how much and what
    would help. ``isolated`` plans in a fresh process (a run's process group is up; the plan needs its own fake
    one). Returns the plan when every phase fits."""
    from phasetune.plan.planner import plan_memory, plan_memory_isolated

    if kwargs.get("device_gib") is None:
        raise ConfigurationError("the memory check needs the device's size: pass device_gib (phasetune.plan.fit_check."
                                 "device_gib() reads it on CUDA)")
    plan = (plan_memory_isolated if isolated else plan_memory)(schedule, model, **kwargs)
    problems = fit_problems(plan)
    if problems:
        raise ConfigurationError(problems)
    return plan


def fit_problems(plan: MemoryPlan, about: str | None = None) -> list[str]:
    """What a run raises before phase 0 when ``plan`` does not fit (empty when it does, or has no device size): one
    line per such phase, then ``about`` the plan (default: its device, world size and how to see every phase)."""
    if plan.fits is not False:
        return []
    s = plan.setup
    return [*plan.problems(), about or (
        f"(the memory plan of this run, before phase 0; {s.device_gib} GiB device, world size {s.world_size}: print "
        "phasetune.plan.plan_memory(...).table() for every phase, or switch the check off)")]


__all__ = ["check_fit", "device_gib", "fit_problems", "model_for_plan"]
