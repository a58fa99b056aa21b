"""Optimizer state and the optimizer step's peak, computed on this rank's shards.

Why not track the step of the simulated model: under ``FakeTensorMode``, DTensor's sharding propagation
(``ShardingPropagator._propagate_tensor_meta_non_cached``, torch 2.13) runs each operator once more on
*global*-shape fake tensors to learn the output's metadata, and reuses the active fake mode to do it. The
memory trackers cannot tell those tensors from the step's own, so a step on FSDP2 parameters is
over-counted by several unsharded parameter sizes (Adam: about 3x the largest parameter) the first time
each operator and shape is seen (the propagation is cached afterwards, so the error even depends on what ran
before). See ``docs/memory_plan.md`` for a reproduction.

What phasetune does instead: build plain fake tensors with this rank's *local* shard shapes, grouped the way
the run groups them (one group per phase, split by dtype: :func:`phasetune.core.param_groups.phase_groups` and
:func:`phasetune.sharding.groups.split_groups`), give each a gradient, and run torch's own optimizer on
them twice under the tracker: the first step creates the state, the second is the steady-state step whose
peak the run sees (all state present, one group's temporaries at a time). No DTensor is involved, so nothing
is propagated; the temporaries of ``foreach`` (a whole group's worth), ``single_tensor`` (one tensor's
worth) and ``fused`` (none) come out of torch's code, not out of a formula kept here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from phasetune.core.param_groups import phase_groups
from phasetune.plan.tracker import PlainTracker
from phasetune.sharding.groups import split_groups


@dataclass(frozen=True)
class StepMemory:
    """One rank's optimizer: state bytes (step counters included) and the step's temporaries at their largest."""

    state: int
    temporaries: int


@dataclass(frozen=True)
class Shard:
    """A trainable parameter as this rank holds it: local shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def step_memory(
    phases: Sequence[Sequence[tuple[str, Shard]]],
    optimizer_cls: type[torch.optim.Optimizer],
    optimizer_kwargs: Mapping[str, Any],
) -> StepMemory:
    """State and temporaries of ``optimizer_cls`` over the trainable shards, ``phases[k]`` = phase k's own.

    Runs two steps on fake tensors (see the module docstring); zero shards (a rank holding no rows of a
    parameter) take part like the run's empty local tensors do.
    """
    if not any(phases):
        return StepMemory(0, 0)
    mode = FakeTensorMode()
    with mode:
        params: dict[str, torch.Tensor] = {}
        groups: list[dict[str, Any]] = []
        for k, members in enumerate(phases):
            for name, shard in members:
                p = nn.Parameter(torch.empty(shard.shape, dtype=shard.dtype))
                p.grad = torch.empty(shard.shape, dtype=shard.dtype)
                params[name] = p
            if members:
                groups.extend(phase_groups(k, [n for n, _ in members], params, float(optimizer_kwargs.get("lr", 1e-4))))
        groups, _ = split_groups(groups)
        optimizer = optimizer_cls(groups, **dict(optimizer_kwargs))
        optimizer.step()  # creates the state
        tracker = PlainTracker(nn.Module())
        tensors = [t for p in params.values() for t in (p, p.grad)]
        tracker.track_external(*tensors, optimizer)
        resident = tracker.current()
        with tracker:
            optimizer.step()
        state = sum(_bytes(v) for st in optimizer.state.values() for v in st.values())
    return StepMemory(state=state, temporaries=max(0, tracker.peak.total - resident))


def _bytes(v: Any) -> int:
    return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0


__all__ = ["Shard", "StepMemory", "step_memory"]
