"""Freezing and thawing parameters, and the mode of frozen BatchNorm layers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def freeze(params: Mapping[str, torch.Tensor]) -> None:
    """Set ``requires_grad=False`` on every parameter."""
    for p in params.values():
        p.requires_grad_(False)


def thaw(params: Mapping[str, torch.Tensor], names: Iterable[str]) -> list[str]:
    """Set ``requires_grad=True`` on ``names``; return those that were frozen before."""
    newly = []
    for n in names:
        p = params[n]
        if not p.requires_grad:
            p.requires_grad_(True)
            newly.append(n)
    return newly


def batchnorm_layers(module: nn.Module) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """``(name, bn, parent)`` for every BatchNorm layer in ``module``."""
    found = []
    for parent_name, parent in module.named_modules():
        for child_name, child in parent.named_children():
            if isinstance(child, _BatchNorm):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                found.append((name, child, parent))
    return found


def is_frozen(module: nn.Module, parent: nn.Module | None = None) -> bool:
    """A module is frozen when none of its parameters trains (affine-free BatchNorm follows its parent)."""
    own = list(module.parameters())
    if own:
        return not any(p.requires_grad for p in own)
    if parent is not None:
        sibling = list(parent.parameters())
        return bool(sibling) and not any(p.requires_grad for p in sibling)
    return True


def apply_frozen_batchnorm_mode(module: nn.Module, track_running_stats: bool) -> list[str]:
    """Put frozen BatchNorm layers in eval mode unless ``track_running_stats``; thawed ones follow the model.

    With ``track_running_stats=True`` (the default of the callback) nothing changes: a frozen BatchNorm in
    train mode keeps updating its running statistics. Returns the names of layers set to eval mode.
    """
    if track_running_stats:
        return []
    evaluated = []
    for name, bn, parent in batchnorm_layers(module):
        if is_frozen(bn, parent):
            bn.eval()
            evaluated.append(name)
        elif module.training:
            bn.train()
    return evaluated
