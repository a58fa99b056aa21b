"""Tensor, DDP and FSDP1 probes for :mod:`phasetune.features.audit.phase_audit` (torch only).

- :func:`fingerprints` and :func:`grad_stats`: per-tensor sums and norms (float64) of this rank's piece
  (:func:`_local`: a DTensor's local shard) of a parameter and of its gradient;
- :func:`find_ddp` and :func:`reducer_misses`: the ``DistributedDataParallel`` wrapping a model and the
  trainable parameters its reducer does not average (read through private DDP API, see there);
- :func:`fsdp1_flat_params`: the FSDP1 ``FlatParameter`` holding each original parameter
  (``use_orig_params=True`` units);
- :func:`state_init_step`: whether an optimizer step only creates optimizer state (a checkpoint's).

None of them is a collective: the audit gathers their results in its one ``all_gather_object``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

log = logging.getLogger("phasetune")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``t``: a DTensor's local shard (no collective), else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def fingerprints(tensors: Sequence[torch.Tensor]) -> list[tuple[float, float]]:
    """Per tensor (this rank's piece): sum and 2-norm in float64, read back with one sync per device."""
    rows: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    with torch.no_grad():
        for i, t in enumerate(tensors):
            x = _local(t.detach())
            row = torch.stack([x.sum(dtype=torch.float64), torch.linalg.vector_norm(x, dtype=torch.float64)])
            rows.setdefault(x.device, []).append((i, row))
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(tensors)
    for items in rows.values():
        values = torch.stack([r for _, r in items]).cpu().tolist()
        for (i, _), v in zip(items, values):
            out[i] = (v[0], v[1])
    return out


def grad_stats(tensors: Sequence[torch.Tensor]) -> list[tuple[str, float, float]]:
    """Per tensor: ("empty" | "none" | "ok", L1 norm of this rank's gradient, its sum) in float64."""
    out: list[tuple[str, float, float]] = []
    present: list[tuple[int, torch.Tensor]] = []
    for i, t in enumerate(tensors):
        if _local(t.detach()).numel() == 0:
            out.append(("empty", 0.0, 0.0))
        elif t.grad is None:
            out.append(("none", 0.0, 0.0))
        else:
            out.append(("ok", 0.0, 0.0))
            present.append((i, _local(t.grad.detach())))
    with torch.no_grad():
        for i, g in present:
            n1, total = torch.stack([torch.linalg.vector_norm(g, 1, dtype=torch.float64),
                                     g.sum(dtype=torch.float64)]).tolist()
            out[i] = ("ok", n1, total)
    return out


def state_init_step(optimizer: Any) -> bool:
    """Whether the step under way only creates optimizer state: ``torch.distributed.checkpoint``'s
    ``get_optimizer_state_dict`` of a never-stepped optimizer steps it with every lr set to 0 over zero gradients
    (a checkpoint saved before the phase's first step). Checked only when every lr is 0."""
    groups = [g for g in optimizer.param_groups if g["params"]]
    if not groups or any(float(g["lr"]) != 0.0 for g in groups):
        return False
    return all(p.grad is None or not bool(_local(p.grad).any()) for g in groups for p in g["params"])


def find_ddp(model: nn.Module | None) -> Any:
    if model is None:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return next((m for m in model.modules() if isinstance(m, DistributedDataParallel)), None)


def reducer_misses(ddp: Any, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names in ``tensors`` (trainable) that ``ddp``'s reducer does not average.

    The reducer takes the parameters requiring grad when DDP is built. torch exposes its parameter count only in
    DDP's logging data, so that is compared first (cheap); the members are read from its buckets only when it
    holds fewer than train now (that allocates a zero copy of its gradients, once). A reducer holding as many
    but other parameters is caught after the first step, by gradients that differ across ranks.
    """
    want = [p for n, p in ddp.module.named_parameters() if p.requires_grad and n not in ddp.parameters_to_ignore]
    try:  # private: DDP's logging data holds the only count of the reducer's parameters torch exposes
        if int(ddp._get_ddp_logging_data().get("num_parameter_tensors", -1)) >= len(want):
            return []
        # private: the reducer's buckets list the parameters it averages
        held = {id(p) for bucket in ddp.reducer._get_zeros_like_grad_buckets() for p in bucket.parameters()}
    except (AttributeError, RuntimeError) as e:
        log.debug("phasetune audit: cannot read DDP's reducer (%s); its membership is not checked", e)
        return []
    return [n for n, p in tensors.items() if id(p) not in held]


def fsdp1_flat_params(model: nn.Module) -> dict[int, torch.Tensor]:
    """id(original parameter) -> the FSDP1 FlatParameter holding it (``use_orig_params=True`` units only)."""
    from phasetune.sharding.fsdp1_alignment import FLAT_PARAM, fsdp_units

    out: dict[int, torch.Tensor] = {}
    for _, unit in fsdp_units(model):
        flat = getattr(unit, FLAT_PARAM, None)
        for p in getattr(flat, "_params", None) or ():  # private: FSDP1 keeps a unit's original parameters here
            out[id(p)] = flat  # type: ignore[assignment]
    return out
