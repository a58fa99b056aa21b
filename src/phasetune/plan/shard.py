"""Shard the planned model with the code a run uses, on a fake process group.

- :func:`fake_world`: one process plays rank ``rank`` of ``world_size`` (torch's ``"fake"`` backend,
  ``FakeStore``); collectives return at once and move no data. The device mesh is built before any fake
  tensor mode is entered (``init_device_mesh`` cannot run under one).
- :func:`fsdp2_entries`: the ``fsdp_plan`` a run applies -- the user's, or the plain strategy's block plan
  (:func:`phasetune.sharding.units.block_plan`) -- with the defaults of
  :func:`phasetune.sharding.plan.strategy_defaults`; :func:`apply_strategy` hands them to
  :func:`phasetune.sharding.plan.apply_plan`, the function the Lightning adapter and the plain strategy
  call. Nothing here re-implements sharding.
- FSDP1 wraps each transformer block (``use_orig_params=True``, CPU device ids as phasetune's FSDP1 tests do);
  DDP is planned as the unwrapped model plus its gradient buckets (DDP's reducer cannot run on a fake group).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from phasetune.core.generate import find_blocks
from phasetune.errors import ConfigurationError
from phasetune.plan.setup import PlanSetup
from phasetune.sharding.names import module_path
from phasetune.sharding.plan import (
    ActCkpt,
    PlanEntry,
    apply_act_ckpt,
    apply_plan,
    parse_plan,
    strategy_defaults,
)


@contextlib.contextmanager
def fake_world(world_size: int, rank: int = 0) -> Iterator[Any]:
    """A fake default process group of ``world_size`` with this process as ``rank``; yields a 1-D CPU mesh."""
    import torch.testing._internal.distributed.fake_pg as fake_pg  # registers the "fake" backend
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        raise ConfigurationError(
            "a process group already exists in this process; the memory plan plays its ranks on a fake group of its "
            "own: call plan_memory before init_process_group, or in a separate process (plan_memory_isolated)"
        )
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=fake_pg.FakeStore())
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


@dataclass
class Sharding:
    """What :func:`apply_strategy` did: units (module names, root last) and checkpointed blocks."""

    units: list[str] = field(default_factory=list)
    act_ckpt: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def fsdp2_entries(model: nn.Module, setup: PlanSetup) -> tuple[list[PlanEntry], dict[str, Any]]:
    """The validated ``fsdp_plan`` entries and defaults a run with ``setup`` applies to ``model``."""
    from phasetune.sharding.units import block_plan

    defaults = strategy_defaults(setup.fsdp_default_kwargs, param_dtype=setup.compute_dtype, cpu_offload=setup.cpu_offload)
    raw = dict(setup.fsdp_plan) if setup.fsdp_plan is not None else block_plan(model, setup.block_classes)
    if setup.act_ckpt:
        blocks = find_blocks(model)
        for key, kwargs in list(raw.items()):
            kwargs = dict(kwargs or {})
            if "act_ckpt" not in kwargs and any(key == b or re.fullmatch(key, b) for b in blocks):
                raw[key] = {**kwargs, "act_ckpt": "composable"}
    return parse_plan(raw, defaults), defaults


def _unpinned(entries: list[PlanEntry], defaults: dict[str, Any]) -> tuple[list[PlanEntry], dict[str, Any]]:
    """CPU offload without pinned host memory: pinning needs an accelerator, and fake tensors cannot pin.

    Pinning changes where the host copy lives, not its size, so the plan is the same.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy

    def unpin(kwargs: Mapping[str, Any]) -> dict[str, Any]:
        kw = dict(kwargs)
        if isinstance(kw.get("offload_policy"), CPUOffloadPolicy):
            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
        return kw

    defaults = dict(defaults)
    if "cpu_offload_policy" in defaults:
        defaults.pop("cpu_offload_policy")
        defaults["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    return [dataclasses.replace(e, shard_kwargs=unpin(e.shard_kwargs)) for e in entries], unpin(defaults)


def apply_strategy(model: nn.Module, setup: PlanSetup, mesh: Any) -> tuple[nn.Module, Sharding]:
    """Shard (FSDP2, FSDP1) or prepare (single, DDP) ``model`` for ``setup``, activation checkpointing included;
    returns the module to run (FSDP1's root wrapper, else ``model``) and what was done."""
    out = Sharding()
    if setup.strategy == "fsdp2":
        entries, defaults = fsdp2_entries(model, setup)
        entries, defaults = _unpinned(entries, defaults)
        report = apply_plan(model, entries, mesh=mesh, default_kwargs=defaults)
        out.units, out.act_ckpt, out.notes = list(report.sharded), sorted(report.act_ckpt), list(report.notes)
        return model, out
    blocks = find_blocks(model)
    if setup.act_ckpt:
        if not blocks:
            raise ConfigurationError(f"act_ckpt=True checkpoints transformer blocks, and {type(model).__name__} has no "
                                     "repeated blocks phasetune can find (no _no_split_modules, no ModuleList of one class)")
        for b in blocks:
            apply_act_ckpt(model, module_path(model, b), ActCkpt("composable"))
        out.act_ckpt = list(blocks)
    if setup.strategy == "fsdp1":
        out.units = [*blocks, ""]
        return _wrap_fsdp1(model, blocks, setup, mesh), out
    return model, out


def _wrap_fsdp1(model: nn.Module, blocks: list[str], setup: PlanSetup, mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    classes = {type(model.get_submodule(b)) for b in blocks}
    mp = None
    if setup.compute_dtype is not None:
        mp = MixedPrecision(param_dtype=setup.compute_dtype, reduce_dtype=torch.float32, buffer_dtype=setup.compute_dtype)
    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True, mixed_precision=mp,
                                    auto_wrap_policy=ModuleWrapPolicy(classes) if classes else None, device_mesh=mesh)


__all__ = ["Sharding", "apply_strategy", "fake_world", "fsdp2_entries"]
