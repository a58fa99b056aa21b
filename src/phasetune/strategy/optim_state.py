"""Optimizer state helpers: filling in the state of never-stepped parameters, and moving state between devices.

:func:`fill_missing_state` exists for checkpoints. A phase transition adds parameter groups whose
parameters have no optimizer state until the next step. ``get_optimizer_state_dict`` then leaves them out of
a checkpoint (pytorch #192202), and loading that checkpoint into an optimizer rebuilt at the same phase fails,
because there the state of every parameter is initialised at once. Filling the missing state with a zero-lr
step over only those parameters makes every checkpoint hold every parameter; :func:`drop_state` removes the
filled entries again so a save changes nothing in the live optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from phasetune.sharding.checkpoint import prime_optimizer_state


def stateless_params(optimizer: Optimizer) -> list[torch.Tensor]:
    """Parameters in the optimizer's groups that have no optimizer state yet."""
    return [p for g in optimizer.param_groups for p in g["params"] if not optimizer.state.get(p)]


@torch.no_grad()
def fill_missing_state(optimizer: Optimizer) -> list[torch.Tensor]:
    """Create the state of every stateless parameter with one zero-lr step over only those parameters.

    Parameters that already have state, and all gradients, are left as they were, and no parameter moves
    (see :func:`phasetune.sharding.checkpoint.prime_optimizer_state`). Returns the parameters filled in;
    stateless optimizers (plain SGD) stay stateless and return none.
    """
    missing = stateless_params(optimizer)
    prime_optimizer_state(optimizer, missing)
    return [p for p in missing if optimizer.state.get(p)]


def drop_state(optimizer: Optimizer, params: Iterable[torch.Tensor]) -> None:
    """Forget the optimizer state of ``params`` (they behave as never stepped again)."""
    for p in params:
        optimizer.state.pop(p, None)


def _move(t: torch.Tensor, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
    if isinstance(t, DTensor):
        local = t.to_local().to(device, copy=True, non_blocking=non_blocking)
        return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape,
                                  stride=t.stride())
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
                local = v.to_local() if isinstance(v, DTensor) else v
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
