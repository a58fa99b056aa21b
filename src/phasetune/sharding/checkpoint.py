"""Loading optimizer state from a distributed checkpoint (DCP) into a phase-aware optimizer.

``torch.distributed.checkpoint`` asks the live optimizer which state to read: a never-stepped optimizer is
given state for *every* parameter it holds by a zero-lr "fake step", and ``dcp.load`` then fails on any
parameter whose state the checkpoint lacks -- e.g. one whose phase began just before the save, or that got
no gradient (pytorch issue #192202). :func:`prime_optimizer_state` creates state for exactly the parameters
the checkpoint has state for, so the load reads precisely what was saved and leaves the rest fresh, as in
an uninterrupted run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.optim import Optimizer


def saved_state_names(checkpoint_dir: str | os.PathLike[str], key: str = "optimizer_0") -> set[str] | None:
    """Parameter names with optimizer state under ``key`` in a DCP checkpoint directory (None: not one)."""
    path = Path(checkpoint_dir)
    if not (path.is_dir() and (path / ".metadata").is_file()):
        return None
    from torch.distributed.checkpoint import FileSystemReader

    prefix = f"{key}.state."
    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k[len(prefix):].rsplit(".", 1)[0] for k in keys if k.startswith(prefix)}


def prime_optimizer_state(optimizer: Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Give ``params`` (those without state) optimizer state with one zero-lr step that touches only them.

    The values are placeholders for a load to overwrite; other parameters' state and gradients are left as
    they were. Returns how many parameters were primed.
    """
    targets = [p for p in params if p not in optimizer.state]
    if not targets:
        return 0
    held = [p for g in optimizer.param_groups for p in g["params"]]
    grads = {id(p): p.grad for p in held}
    lrs = [g["lr"] for g in optimizer.param_groups]
    try:
        for p in held:
            p.grad = None
        for p in targets:
            p.grad = torch.zeros_like(p)
        for g in optimizer.param_groups:
            g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        for p in held:
            p.grad = grads[id(p)]
    return len(targets)


__all__ = ["prime_optimizer_state", "saved_state_names"]
