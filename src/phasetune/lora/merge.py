"""``merge_lora``: fold adapters into their base weights, as a change of the state dict only.

``W += scaling * B @ A`` is computed in fp32 and cast back to ``W``'s dtype, then ``B`` is zeroed and the
adapter frozen. peft's own ``merge()`` is never used: it sets a Python flag that is not in the state dict,
so a checkpoint taken after it, loaded into a freshly injected model, would apply the delta twice. Here a
checkpoint after a merge holds ``W + s B A`` and ``B = 0``: loading it reproduces the merged model exactly.

Under FSDP2 each rank folds its own rows: ``W`` (out x in) and ``B`` (out x r) are both sharded on dim 0
over the same out rows, so only ``A`` (r x in) is gathered.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from phasetune.errors import ConfigurationError
from phasetune.lora.layers import adapter_params, base_module, draw_lora_A, lora_layers
from phasetune.lora.section import MergeSpec
from phasetune.util.text import few


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_lora` changed. ``parameters`` (named ``frozen``) must leave the optimizer:
    pass them to :func:`~phasetune.lora.optimizer.remove_from_optimizer`. With ``reinit`` they hold fresh
    adapters, which train again once the caller thaws them and gives them a new param group."""

    adapter: str
    modules: tuple[str, ...]
    frozen: tuple[str, ...]
    parameters: tuple[nn.Parameter, ...]
    reinit: bool


def merge_targets(model: nn.Module, spec: MergeSpec, adapter: str, phase: int) -> tuple[list[str], list[str]]:
    """``(modules, problems)``: the LoRA layers a phase's ``merge_lora`` names, in registration order; an entry
    that names no layer holding ``adapter`` (by module name or adapter parameter name) is a problem."""
    key = f"phase {phase}, key 'merge_lora'"
    layers = list(lora_layers(model, adapter))
    if not layers:
        return [], [f"{key}: the model has no LoRA adapter {adapter!r} to merge; inject adapters with a peft "
                    "section (or name them in a phase) or remove merge_lora"]
    if spec.modules is None:
        return layers, []
    chosen: set[str] = set()
    problems: list[str] = []
    for entry in spec.modules:
        pattern = re.compile(entry)
        hits = [m for m in layers
                if pattern.fullmatch(m) or any(pattern.fullmatch(n) for n in adapter_params(model, m, adapter).adapter_names())]
        if not hits:
            problems.append(f"{key}: '{entry}' names no LoRA layer with adapter {adapter!r}; the layers are "
                            f"{few(layers)} (a regex over whole module names)")
        chosen.update(hits)
    return [m for m in layers if m in chosen], problems


def merge_lora(model: nn.Module, modules: Sequence[str], adapter: str = "default",
               reinit: torch.Generator | None = None) -> MergeResult:
    """Fold ``adapter`` of each LoRA layer in ``modules`` into its base weight, zero its ``B`` and freeze it.

    With ``reinit`` (a generator, the same seed on every rank) each merged adapter restarts: ``A`` drawn as
    peft draws it, in ``modules`` order, ``B`` zero (ReLoRA). Works on plain and FSDP2-sharded (DTensor)
    parameters; call it on every rank at the same point. Raises
    :class:`~phasetune.errors.ConfigurationError` for a module without the adapter.
    """
    layers = lora_layers(model, adapter)
    missing = [m for m in modules if m not in layers]
    if missing:
        raise ConfigurationError([f"merge_lora: module '{m}' holds no LoRA adapter {adapter!r}; name a LoRA layer "
                                  f"(e.g. {next(iter(layers), 'none in this model')!r})" for m in missing])
    for name in modules:  # all checked before any weight changes
        _check_plain_lora(layers[name], name, adapter)
    _reshard(model)
    frozen: list[str] = []
    params: list[nn.Parameter] = []
    with torch.no_grad():
        for name in modules:
            layer = layers[name]
            _fold(layer, adapter)
            lora_b = layer.lora_B[adapter]
            lora_b.weight.zero_()
            if lora_b.bias is not None:
                lora_b.bias.zero_()
            if reinit is not None:
                a = layer.lora_A[adapter].weight
                _local(a).copy_(_rows_like(a, draw_lora_A(a.shape, reinit)))  # every rank draws the whole A
            names = adapter_params(model, name, adapter).adapter_names()
            for pname, p in zip(names, _adapter_tensors(layer, adapter)):
                p.requires_grad_(False)
                p.grad = None
                frozen.append(pname)
                params.append(p)
    return MergeResult(adapter, tuple(modules), tuple(frozen), tuple(params), reinit is not None)


def _adapter_tensors(layer: nn.Module, adapter: str) -> list[nn.Parameter]:
    b = layer.lora_B[adapter]
    return [layer.lora_A[adapter].weight, b.weight] + ([b.bias] if b.bias is not None else [])


def _check_plain_lora(layer: nn.Module, name: str, adapter: str) -> None:
    if getattr(layer, "fan_in_fan_out", False):
        raise ConfigurationError(f"merge_lora: module '{name}' stores its weight transposed (fan_in_fan_out, "
                                 "a Conv1D); phasetune merges nn.Linear LoRA layers only")
    if layer.lora_B[adapter].bias is not None and getattr(base_module(layer), "bias", None) is None:
        raise ConfigurationError(f"merge_lora: module '{name}' has a LoRA bias (lora_bias) but its base layer has "
                                 "none to fold it into; merge adapters without lora_bias only")
    if adapter in getattr(layer, "lora_variant", {}):
        raise ConfigurationError(f"merge_lora: module '{name}' uses a LoRA variant "
                                 f"({type(layer.lora_variant[adapter]).__name__}, e.g. DoRA); phasetune merges plain "
                                 "LoRA only")


def _fold(layer: nn.Module, adapter: str) -> None:
    base = base_module(layer)
    w, a, b = base.weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    scaling = float(layer.scaling[adapter])
    a_full = whole(a).float()
    if _same_rows(w, b):
        delta = scaling * (_local(b).float() @ a_full)  # this rank's rows of W, from its rows of B
    else:
        # B's rows are not laid out like W's (another placement or mesh, or only one is sharded): gather B
        # too, and take this rank's rows of W from the whole delta
        delta = _rows_like(w, scaling * (whole(b).float() @ a_full))
    local = _local(w)
    local.copy_((local.float() + delta.to(local.device)).to(local.dtype))
    bias = layer.lora_B[adapter].bias
    if bias is not None:  # lora_bias: checked that the base layer has a bias
        local_bias = _local(base.bias)
        delta_bias = _rows_like(base.bias, scaling * whole(bias).float())
        local_bias.copy_((local_bias.float() + delta_bias).to(local_bias.dtype))


def _reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit in its sharded state, so the sharded parameters are the ones that change."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (a view that writes through to the parameter), or ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t`` on every rank (a collective for a DTensor: every rank calls it in the same order)."""
    return t.full_tensor() if _is_dtensor(t) else t


def _same_rows(w: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether this rank's rows of ``b`` are the rows of ``w`` it holds: both plain, or both sharded on dim 0
    (or replicated) the same way over the same mesh with the same number of rows. FSDP2 pads uneven row
    counts at the end of the last ranks; the same row count and placements give the same split."""
    if not _is_dtensor(w) and not _is_dtensor(b):
        return True
    if not (_is_dtensor(w) and _is_dtensor(b)):
        return False
    from torch.distributed.tensor import Replicate, Shard

    return (w.device_mesh == b.device_mesh and tuple(w.placements) == tuple(b.placements)
            and all(p == Shard(0) or p == Replicate() for p in w.placements)
            and w.shape[0] == b.shape[0] and w.to_local().shape[0] == b.to_local().shape[0])


def _rows_like(like: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` laid out as ``like`` is (``full`` itself when ``like`` is not sharded).
    Every rank holds the same ``full``, so no data moves (``src_data_rank=None``)."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    full = full.to(like.device_mesh.device_type)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
