"""Moving optimizer state between devices: offloading it to CPU and bringing it back (sharded state keeps its
layout). Saving and loading optimizer state is :mod:`phasetune.sharding.optim_state`'s."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from phasetune.sharding.dtensor import dtensor_like, is_dtensor, local_shard


def _move(t: torch.Tensor, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
    if is_dtensor(t):
        return dtensor_like(local_shard(t).to(device, copy=True, non_blocking=non_blocking), t)
    return t.to(device, copy=True, non_blocking=non_blocking)


def offload_state(optimizer: Optimizer) -> dict[int, dict[str, torch.device]]:
    """Move every optimizer state tensor to CPU (a fresh copy); returns where each one lived.

    DTensors keep their mesh and placements; only their local shard moves.
    """
    devices: dict[int, dict[str, torch.device]] = {}
    for p, st in optimizer.state.items():
        where = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                local = local_shard(v)
                where[k] = local.device
                st[k] = _move(v, "cpu")
        devices[id(p)] = where
    return devices


def load_state(optimizer: Optimizer, devices: dict[int, dict[str, torch.device]] | None,
               default: torch.device | str, override: torch.device | str | None = None) -> None:
    """Move offloaded state back where each tensor lived before (``default`` when unknown).

    ``override`` replaces every accelerator device in that record (CPU-resident entries such as Adam's step
    counts stay on CPU, where non-capturable optimizers expect them).
    """
    devices = devices or {}
    moved_to_cuda = False
    for p, st in optimizer.state.items():
        where = devices.get(id(p), {})
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                target = torch.device(where.get(k, default))
                if override is not None and target.type != "cpu":
                    target = torch.device(override)
                moved_to_cuda |= target.type == "cuda"
                st[k] = _move(v, target, non_blocking=target.type == "cuda")
    if moved_to_cuda:
        torch.cuda.synchronize()
