"""Rank, world size and the collectives phasetune needs, all working without a process group.

Without an initialised ``torch.distributed`` process group (or with a group of one) the process is rank 0
of 1 and every collective is a no-op, so single-process code paths need no special case. Setting up the
process group itself is :func:`phasetune.loop.strategy.distributed.init_distributed`'s job.
"""

from __future__ import annotations

import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` from rank ``src`` on every rank (a collective: every rank calls it; a no-op on one process)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (a collective: every rank calls it; ``[obj]`` on one process)."""
    if world_size() == 1:
        return [obj]
    box: list[object] = [None] * world_size()
    dist.all_gather_object(box, obj)
    return box


def barrier() -> None:
    """Wait for every rank (a no-op on one process)."""
    if world_size() > 1:
        dist.barrier()
