"""Saving and loading the optimizer state of a phase-aware optimizer through distributed checkpoints (DCP).

After a phase transition some parameters of the optimizer have no state yet (none until their first step;
none ever for a parameter that gets no gradient). torch 2.13 handles that badly in both directions
(pytorch #192202): ``get_optimizer_state_dict`` of an optimizer with some state saves only that state, but
for a never-stepped optimizer it first runs a zero-lr "fake step" that gives *every* trainable parameter
placeholder state, in the live optimizer too; and on load the template it builds from a fresh optimizer
holds every parameter, so ``dcp.load`` fails on each key the checkpoint lacks. Neither
``StateDictOptions(strict=False)`` (it does not reach DCP's planner) nor
``DefaultLoadPlanner(allow_partial_load=True)`` (it loads, but leaves torch's placeholders as real state,
which changes the next Adam step) makes a resume exact.

phasetune's one policy, used by the Lightning FSDP2 adapter and by :class:`~phasetune.loop.strategy.FSDP2Strategy`:
a checkpoint holds exactly the state the optimizer had -- :func:`no_placeholder_state` keeps torch from
inventing any at save -- and a load first shapes the optimizer like the checkpoint
(:func:`shaped_like_checkpoint`): parameters with saved state get placeholders for the load to overwrite,
the others no state (they start fresh, as in the uninterrupted run).

Optimizer steps run while a checkpoint is saved or loaded (torch's fake step, phasetune's placeholder step)
are no training steps: code that watches steps through optimizer step hooks asks
:func:`in_placeholder_step` and leaves them alone (:func:`placeholder_steps` marks them).
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.optim import Optimizer

_PLACEHOLDER_STEPS = contextvars.ContextVar("phasetune_placeholder_steps", default=False)


@contextmanager
def placeholder_steps() -> Iterator[None]:
    """Mark the optimizer steps run inside (while a checkpoint is saved or loaded) as no training steps."""
    token = _PLACEHOLDER_STEPS.set(True)
    try:
        yield
    finally:
        _PLACEHOLDER_STEPS.reset(token)


def in_placeholder_step() -> bool:
    """Whether an optimizer step running now only gives an optimizer placeholder state for a checkpoint
    save or load (a step hook that watches training should ignore it)."""
    return _PLACEHOLDER_STEPS.get()


def saved_state_names(checkpoint_dir: str | os.PathLike[str], key: str) -> set[str] | None:
    """Names of the parameters with optimizer state under ``key`` in a DCP checkpoint directory.

    ``key`` is where the optimizer's state dict sits in the checkpoint (the front end's layout). None when
    ``checkpoint_dir`` is not a local DCP checkpoint.
    """
    path = Path(checkpoint_dir)
    if not (path.is_dir() and (path / ".metadata").is_file()):
        return None
    from torch.distributed.checkpoint import FileSystemReader

    prefix = f"{key}.state."
    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k[len(prefix):].rsplit(".", 1)[0] for k in keys if k.startswith(prefix)}


@torch.no_grad()
def prime_optimizer_state(optimizer: Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Give ``params`` (those without state) optimizer state with one zero-lr step that touches only them.

    The values are placeholders for a load to overwrite; other parameters' state and all gradients are left
    as they were, and no parameter moves. Step hooks do not see this step. Returns how many parameters were
    primed.
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
        # no training step: the optimizer's step hooks (the user's, phasetune's audit) are not run for it
        unhooked = getattr(type(optimizer).step, "__wrapped__", None)
        if unhooked is not None:
            unhooked(optimizer)
        else:
            optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        for p in held:
            p.grad = grads[id(p)]
    return len(targets)


@contextmanager
def _frozen(params: Iterable[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    frozen = [p for p in params if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield frozen
    finally:
        for p in frozen:
            p.requires_grad_(True)


@contextmanager
def no_placeholder_state(optimizer: Optimizer) -> Iterator[None]:
    """Around ``get_optimizer_state_dict`` for a save: keep torch from giving a never-stepped optimizer
    placeholder state (its trainable parameters are frozen for the block), so the checkpoint and the live
    optimizer hold only real state."""
    if optimizer.state:
        yield  # torch only invents state for an optimizer without any
        return
    with placeholder_steps(), _frozen(p for g in optimizer.param_groups for p in g["params"]):
        yield


@contextmanager
def shaped_like_checkpoint(
    optimizer: Optimizer, saved: Collection[str] | None, params: Mapping[str, torch.Tensor]
) -> Iterator[list[torch.Tensor]]:
    """Around a DCP load of ``optimizer``'s state: make its state keys those of the checkpoint.

    ``saved`` names the parameters with state in the checkpoint (:func:`saved_state_names`; None: unknown,
    nothing is changed) and ``params`` maps names to the tensors the optimizer holds. Parameters in
    ``saved`` get placeholder state, the others lose any state they had (a load replaces the state) and are
    frozen for the block so torch cannot invent state for them; they are thawed again afterwards and start
    fresh. Yields the parameters without saved state.
    """
    if saved is None:
        with placeholder_steps():
            yield []
        return
    name_of = {id(p): n for n, p in params.items()}
    held = [p for g in optimizer.param_groups for p in g["params"]]
    unsaved = [p for p in held if name_of.get(id(p)) not in saved]
    for p in unsaved:
        optimizer.state.pop(p, None)
    with placeholder_steps():
        prime_optimizer_state(optimizer, [p for p in held if name_of.get(id(p)) in saved])
        with _frozen(unsaved):
            yield unsaved


__all__ = [
    "in_placeholder_step",
    "no_placeholder_state",
    "placeholder_steps",
    "prime_optimizer_state",
    "saved_state_names",
    "shaped_like_checkpoint",
]
