"""Meta-device initialization and materialization of sharded models.

:func:`params_on_meta` builds a model whose parameters live on the meta device (no memory, no init
compute) while buffers are created for real: buffers such as position ids are often non-persistent, so no
checkpoint holds them and they could not be recovered after a meta init. After ``fully_shard``,
:func:`materialize` allocates each rank's shards on the device and fills them from a full state dict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from phasetune.sharding.names import logical_name
from phasetune.util.dist import rank


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Inside, every parameter registered on a module is moved to the meta device; buffers are not."""
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = type(param)(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def has_meta_params(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def materialize_problems(model: nn.Module, state_dict: Mapping[str, Any] | None, broadcast_from_rank0: bool) -> list[str]:
    """Why ``model``'s meta parameters could not be materialized from ``state_dict`` (checked before sharding)."""
    names = [logical_name(n) for n, p in model.named_parameters() if p.is_meta]
    if not names:
        return []
    if state_dict is None:
        if broadcast_from_rank0 and rank() != 0:
            return []
        return [f"the model has {len(names)} parameters on the meta device (e.g. {names[0]!r}); pass "
                "prepare_model(..., state_dict=...) with the full weights to materialize them"]
    expected = [logical_name(n) for n, _ in model.named_parameters()]
    missing = [n for n in expected if n not in state_dict]
    if not missing:
        return []
    shown = ", ".join(repr(m) for m in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return [f"the state dict given to materialize the meta-initialized model lacks {len(missing)} parameter(s): "
            f"{shown}; its keys must be the model's parameter names (model.named_parameters())"]


def materialize(
    model: nn.Module,
    device: torch.device,
    state_dict: Mapping[str, Any] | None,
    broadcast_from_rank0: bool = False,
) -> None:
    """Allocate a (sharded) meta-initialized ``model`` on ``device`` and load the full ``state_dict`` into it.

    With ``broadcast_from_rank0`` only rank 0's ``state_dict`` is read (other ranks may pass None) and
    each rank receives its shards from it, so only one process holds the full weights. Check
    :func:`materialize_problems` first.
    """
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n in buffers:
                b.copy_(buffers[n])
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast_from_rank0, strict=False)
    set_model_state_dict(model, dict(state_dict or {}), options=options)
