"""The process group and device of a plain-PyTorch run, read from torchrun's environment.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) the default process group is created with
``nccl`` when CUDA is available and ``gloo`` otherwise. Started as a plain ``python train.py``, a one-process
group is created in memory, so the same script (FSDP2, DCP checkpoints and all) runs unchanged on one
process. A group the caller already created is used as it is. Rank queries and collectives that work
with or without a group are in :mod:`phasetune.util.dist`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: its global and local rank, the world size and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or value == "" else int(value)


def init_distributed(backend: str | None = None, device: str | torch.device | None = None) -> DistEnv:
    """Create (or join) the default process group and pick this process's device.

    ``backend`` defaults to ``nccl`` on CUDA and ``gloo`` on CPU; ``device`` defaults to ``cuda:LOCAL_RANK``
    when CUDA is available and ``cpu`` otherwise.
    """
    local_rank = _env_int("LOCAL_RANK", 0)
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        world = _env_int("WORLD_SIZE", 1)
        if world > 1 or "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        else:  # a plain `python script.py`: a one-process group needs no rendezvous
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    return DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), device, owns)

