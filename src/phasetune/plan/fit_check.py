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


def _hf_config(module: nn.Module) -> Any:
    config = getattr(module, "config", None)
    if config is None or not type(config).__name__.endswith("Config") or not hasattr(config, "to_dict"):
        return None
    import transformers

    if getattr(transformers, type(module).__name__, None) is not type(module):
        return None  # a class transformers cannot name: the plan could not rebuild it from the config
    config = copy.deepcopy(config)
    config.architectures = [type(module).__name__]  # the model's own class, not the checkpoint's
    return config


def model_for_plan(module: nn.Module) -> tuple[Any, str]:
    """``(model, name_prefix)`` for :func:`~phasetune.plan.plan_memory` to rebuild ``module`` from: a Hugging Face
    model's config, or the config of the one Hugging Face model a wrapper holds as an attribute (with that
    attribute as ``name_prefix``) when the wrapper has no parameters of its own. Raises ConfigurationError saying
    to name the model (a config path or ``"module:factory"``) otherwise."""
    config = _hf_config(module)
    if config is not None:
        return config, ""
    held = [(name, child) for name, child in module.named_children() if _hf_config(child) is not None]
    if len(held) == 1:
        name, child = held[0]
        own = {id(p) for p in module.parameters()} - {id(p) for p in child.parameters()}
        if not own:
            return _hf_config(child), name
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
    if plan.fits is False:
        raise ConfigurationError([
            *plan.problems(),
            f"(the memory plan of this run, before phase 0; {plan.setup.device_gib} GiB device, world size "
            f"{plan.setup.world_size}: print phasetune.plan.plan_memory(...).table() for every phase, or switch the "
            "check off)",
        ])
    return plan


__all__ = ["check_fit", "device_gib", "model_for_plan"]
