"""DTensor helpers: recognise a DTensor, take this rank's shard, rebuild a DTensor around a shard (torch only).

FSDP2 parameters, their gradients and their optimizer state are DTensors. Checks are by duck type, so
nothing here imports ``torch.distributed.tensor`` until a DTensor has to be built.
"""

from __future__ import annotations

from typing import Any

import torch


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (a tensor with a device mesh and a local shard)."""
    return hasattr(t, "to_local") and getattr(t, "device_mesh", None) is not None


def dtensor_mesh(t: Any) -> Any:
    """The device mesh of a DTensor; None for a plain tensor."""
    return t.device_mesh if is_dtensor(t) else None


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's own shard on this rank (sharing its storage); other tensors as they are."""
    return t.to_local() if is_dtensor(t) else t


def dtensor_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's shard) as a DTensor with the mesh, placements, shape and stride of ``like``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


__all__ = ["dtensor_like", "dtensor_mesh", "is_dtensor", "local_shard"]
