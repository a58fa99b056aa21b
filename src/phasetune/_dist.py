"""Rank and world size that also work without an initialised process group (one process: rank 0 of 1)."""

from __future__ import annotations

import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1
