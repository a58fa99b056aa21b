"""Homogeneous optimizer parameter groups: one dtype and one kind of tensor (one mesh, or plain) per group.

``foreach``/``fused`` optimizer kernels and ``clip_grad_norm_`` reject groups that mix DTensors of different
device meshes, DTensors with plain tensors, or dtypes. Under FSDP2 this happens with tensor parallelism
(2-D meshes next to 1-D ones), with parameters left out of ``fully_shard`` (``ignored_params``) or with
mixed-precision models. :func:`split_groups` splits such groups, keeping every hyperparameter, so each
resulting group is homogeneous; :func:`describe_mix` says why in words.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from phasetune.sharding.dtensor import dtensor_mesh


def tensor_kind(t: torch.Tensor) -> tuple[torch.dtype, Any]:
    """``(dtype, mesh)`` of ``t``; ``mesh`` is None for a plain tensor."""
    return t.dtype, dtensor_mesh(t)


def describe_kind(kind: tuple[torch.dtype, Any]) -> str:
    dtype, mesh = kind
    if mesh is None:
        return f"plain {str(dtype).removeprefix('torch.')} tensors"
    dims = getattr(mesh, "mesh_dim_names", None)
    shape = tuple(mesh.shape) if hasattr(mesh, "shape") else "?"
    where = f"mesh {dims or ''}{shape}".replace("None", "")
    return f"{str(dtype).removeprefix('torch.')} DTensors on {where}"


def split_group(group: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``group`` as one group per tensor kind (first-seen order), each with all of ``group``'s hyperparameters."""
    buckets: dict[Any, list[torch.Tensor]] = {}
    for p in group["params"]:
        buckets.setdefault(_kind_key(p), []).append(p)
    if len(buckets) <= 1:
        return [dict(group)]
    return [{**group, "params": ps} for ps in buckets.values()]


def _kind_key(t: torch.Tensor) -> tuple[torch.dtype, Any]:
    return tensor_kind(t)  # DeviceMesh hashes and compares by value: equal meshes share a group


def describe_mix(group: Mapping[str, Any], name_of: Mapping[int, str] | None = None) -> str | None:
    """What a group mixes, with an example parameter of each kind; None when it is homogeneous."""
    examples: dict[Any, tuple[tuple[torch.dtype, Any], str]] = {}
    for p in group["params"]:
        key = _kind_key(p)
        if key not in examples:
            examples[key] = (tensor_kind(p), (name_of or {}).get(id(p), f"a {tuple(p.shape)} tensor"))
    if len(examples) <= 1:
        return None
    return "; ".join(f"{describe_kind(kind)} (e.g. {name!r})" for kind, name in examples.values())


def split_groups(
    groups: Sequence[Mapping[str, Any]], name_of: Mapping[int, str] | None = None, label: Callable[[int], str] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Split each of ``groups`` into homogeneous groups; return them and one note per group that was split.

    ``label(i)`` names group ``i`` in the notes (default ``"group i"``).
    """
    out: list[dict[str, Any]] = []
    notes: list[str] = []
    for i, g in enumerate(groups):
        mix = describe_mix(g, name_of)
        parts = split_group(g)
        if mix is not None:
            notes.append(f"{label(i) if label else f'group {i}'} mixed {mix}; split into {len(parts)} groups with the same hyperparameters")
        out.extend(parts)
    return out, notes


def split_optimizer_groups(
    optimizer: Optimizer,
    schedulers: Sequence[Any] = (),
    name_of: Mapping[int, str] | None = None,
    add: Callable[..., None] | None = None,
) -> list[str]:
    """Split the optimizer's mixed groups in place: the first kind stays, the others become new groups at the end.

    New groups go through ``add(optimizer, groups, schedulers)`` (default
    :func:`phasetune.core.param_groups.add_groups`, which extends each lr scheduler for them). Returns notes.
    """
    from phasetune.core.param_groups import add_groups

    add = add or add_groups
    notes: list[str] = []
    extra: list[dict[str, Any]] = []
    for i, g in enumerate(optimizer.param_groups):
        mix = describe_mix(g, name_of)
        if mix is None:
            continue
        first, *rest = split_group(g)
        g["params"] = first["params"]
        extra.extend(rest)
        notes.append(f"optimizer group {i} mixed {mix}; split into {1 + len(rest)} groups with the same hyperparameters")
    if extra:
        add(optimizer, extra, schedulers)
    return notes


__all__ = ["describe_kind", "describe_mix", "split_group", "split_groups", "split_optimizer_groups", "tensor_kind"]
