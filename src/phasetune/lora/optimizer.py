"""Taking parameters out of a torch optimizer: after ``merge_lora`` the merged adapters stop training, and
their moments must not come back if a fresh adapter later reuses the same tensors."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def remove_from_optimizer(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> list[int]:
    """Drop ``params`` from ``optimizer``'s param groups and its state; returns the indices of the groups this
    left empty.

    Empty groups stay in place (torch's optimizers step over them, save and load them), so group indices,
    and the per-group lists an lr scheduler keeps (``base_lrs``), still line up. Parameters the optimizer
    does not hold are ignored.
    """
    ids = {id(p) for p in params}
    emptied: list[int] = []
    for i, group in enumerate(optimizer.param_groups):
        kept = [p for p in group["params"] if id(p) not in ids]
        if len(kept) != len(group["params"]):
            group["params"] = kept
            if not kept:
                emptied.append(i)
    for p in [p for p in optimizer.state if id(p) in ids]:
        del optimizer.state[p]
    return emptied
