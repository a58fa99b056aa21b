"""Model states per rank from parameter shapes: what each rank holds of parameters, gradients and optimizer.

- FSDP2 shards every parameter on dim 0 the way ``torch.chunk`` splits it: rank ``r`` holds rows
  ``[r * c, (r + 1) * c)`` of ``c = ceil(rows / world_size)`` (rank 0 the most; late ranks may hold fewer or
  none). Its gradient and optimizer state have the same local shape; frozen parameters get neither.
- FSDP1 (``use_orig_params=True``) holds one flat shard per unit: read from the wrapped model's own
  ``FlatParameter`` (rank 0); a unit with any trainable parameter gets a gradient for its whole shard.
- Single device and DDP hold everything; DDP adds its reducer's buckets, one more copy of the trainable
  gradients (``gradient_as_bucket_view=False``, DDP's default).

Optimizer state comes from :func:`phasetune.plan.step.step_memory` over the local shards, so what a state
holds (Adam's two moments and a step counter, SGD's momentum) is torch's business, not a table here. Each
phase's parameter groups are stepped once, alone: a step holds all groups' state and one group's temporaries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from phasetune.plan.step import Shard, StepMemory, step_memory

Shapes = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def local_rows(rows: int, world_size: int, rank: int) -> int:
    """Rows of a ``rows``-row parameter that ``rank`` holds under FSDP2 (``torch.chunk`` on dim 0)."""
    chunk = math.ceil(rows / world_size) if rows else 0
    return max(0, min(chunk, rows - rank * chunk))


def local_shard(shape: tuple[int, ...], dtype: torch.dtype, strategy: str, world_size: int, rank: int) -> Shard:
    """What ``rank`` holds of a parameter of ``shape`` under ``strategy`` (FSDP2 only; others hold it whole)."""
    if strategy == "fsdp2" and shape:
        return Shard((local_rows(shape[0], world_size, rank), *shape[1:]), dtype)
    return Shard(shape, dtype)


@dataclass(frozen=True)
class RankStates:
    """One rank's model states in one phase (bytes): parameters, gradients, optimizer state and step temporaries."""

    rank: int
    params: int
    grads: int
    optimizer: int
    step_temporaries: int
    buckets: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"rank": self.rank, "params": self.params, "grads": self.grads, "optimizer": self.optimizer,
                "step_temporaries": self.step_temporaries, "buckets": self.buckets}


class StatePlanner:
    """Model states of every rank for each phase, with optimizer steps run once per distinct set of shards."""

    def __init__(self, shapes: Shapes, strategy: str, world_size: int, fsdp1_root: nn.Module | None = None) -> None:
        self.shapes, self.strategy, self.world_size = shapes, strategy, world_size
        self._cache: dict[Any, StepMemory] = {}
        self._fsdp1 = _fsdp1_layout(fsdp1_root) if strategy == "fsdp1" and fsdp1_root is not None else None

    def ranks(self) -> list[int]:
        """Ranks whose states are computed: all of them, except FSDP1 (rank 0, read from its flat parameters)."""
        return [0] if self.strategy == "fsdp1" else list(range(self.world_size))

    def shard(self, name: str, rank: int) -> Shard:
        shape, dtype = self.shapes[name]
        if self._fsdp1 is not None:
            return Shard((self._fsdp1.local[name],), dtype)
        return local_shard(shape, dtype, self.strategy, self.world_size, rank)

    def states(
        self,
        phases: Sequence[Sequence[str]],
        optimizer_cls: type[torch.optim.Optimizer],
        optimizer_kwargs: Mapping[str, Any],
        rank: int,
    ) -> RankStates:
        """``rank``'s states when ``phases[0..k]`` (parameter names per phase) are trainable."""
        trainable = [n for names in phases for n in names]
        params = sum(self.shard(n, rank).nbytes for n in self.shapes)
        if self._fsdp1 is not None:
            params = self._fsdp1.params
            grads = sum(size for unit, size in self._fsdp1.unit_bytes.items()
                        if any(self._fsdp1.unit_of[n] == unit for n in trainable))
        else:
            grads = sum(self.shard(n, rank).nbytes for n in trainable)
        # torch steps one param group after the other and frees a group's temporaries before the next, so a
        # steady-state step holds every group's state and one group's temporaries: each phase's groups are stepped
        # once, alone, and reused by every later phase
        kw = tuple(sorted(optimizer_kwargs.items(), key=str))
        steps = []
        for names in phases:
            shards = tuple((n, self.shard(n, rank)) for n in names)
            key = (optimizer_cls, kw, shards)
            if key not in self._cache:
                self._cache[key] = step_memory([list(shards)], optimizer_cls, optimizer_kwargs)
            steps.append(self._cache[key])
        state = sum(st.state for st in steps)
        temporaries = max((st.temporaries for st in steps), default=0)
        buckets = sum(self.shard(n, rank).nbytes for n in trainable) if self.strategy == "ddp" else 0
        return RankStates(rank, params, grads, state, temporaries, buckets)


@dataclass
class _Fsdp1Layout:
    local: dict[str, int]  # logical name -> elements of it in rank 0's flat shard
    unit_of: dict[str, str]  # logical name -> unit
    unit_bytes: dict[str, int]  # unit -> bytes of rank 0's flat shard
    params: int


def _fsdp1_layout(root: nn.Module) -> _Fsdp1Layout:
    """Rank 0's flat shards of an FSDP1-wrapped model, from FSDP1's own ``FlatParameter`` metadata."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from phasetune.sharding.names import logical_name

    local: dict[str, int] = {}
    unit_of: dict[str, str] = {}
    unit_bytes: dict[str, int] = {}
    for unit_name, unit in root.named_modules():
        if not isinstance(unit, FullyShardedDataParallel) or unit._handle is None:
            continue
        flat = unit._handle.flat_param
        unit_bytes[unit_name] = flat._sharded_size.numel() * flat.element_size()
        prefix = logical_name(unit_name)
        for fqn, info in zip(flat._fqns, flat._shard_param_infos):
            name = logical_name(f"{prefix}.{fqn}" if prefix else fqn)
            local[name] = info.numel_in_shard if info.in_shard else 0
            unit_of[name] = unit_name
    return _Fsdp1Layout(local, unit_of, unit_bytes, sum(unit_bytes.values()))


__all__ = ["RankStates", "StatePlanner", "local_rows", "local_shard"]
