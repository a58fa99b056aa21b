"""Gradient-norm clipping with one global norm across device meshes and plain tensors.

``torch.nn.utils.clip_grad_norm_`` fails when gradients are DTensors of several meshes (FSDP2 next to
tensor parallelism, HSDP units next to FSDP ones) or DTensors mixed with plain tensors. Here the norm of
each mesh's gradients is reduced over that mesh, the per-mesh norms and the plain tensors' norm are
combined into one total, and every gradient is scaled by the same factor -- the result equals clipping
the unsharded model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from phasetune.sharding.dtensor import dtensor_mesh, local_shard


def _grads(parameters: Iterable[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def grad_norm(parameters: Iterable[torch.Tensor] | torch.Tensor, norm_type: float = 2.0) -> torch.Tensor:
    """The ``norm_type`` norm of all gradients of ``parameters`` as one vector (a plain 0-dim tensor).

    DTensor gradients are reduced over their mesh (a collective: every rank of each mesh must call this).
    Plain tensors are taken as they are (replicated gradients give the same norm on every rank).
    """
    norm_type = float(norm_type)
    by_mesh: dict[Any, list[torch.Tensor]] = {}
    for g in _grads(parameters):
        by_mesh.setdefault(dtensor_mesh(g), []).append(g)
    if not by_mesh:
        return torch.tensor(0.0)
    norms = []
    for mesh, gs in by_mesh.items():
        n = torch.nn.utils.get_total_norm(gs, norm_type)
        if mesh is not None and hasattr(n, "full_tensor"):
            n = n.full_tensor()
        norms.append(n)
    device = norms[0].device
    stacked = torch.stack([n.to(device=device, dtype=torch.float32) for n in norms])
    if math.isinf(norm_type):
        return stacked.max()
    return stacked.pow(norm_type).sum().pow(1.0 / norm_type)


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """Scale the gradients of ``parameters`` in place so their global norm is at most ``max_norm``.

    Returns the total norm before clipping (see :func:`grad_norm`). Like ``torch.nn.utils.clip_grad_norm_``
    but over any mix of meshes and plain tensors.
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    total = grad_norm(params, norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is non-finite ({total.item()}); set "
            "error_if_nonfinite=False to clip anyway"
        )
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in _grads(params):
        local = local_shard(g)
        by_device.setdefault(local.device, []).append(local)
    for device, gs in by_device.items():
        torch._foreach_mul_(gs, coef.to(device))
    return total


__all__ = ["clip_grad_norm_", "grad_norm"]
