"""Reading LoRA layers by their shape, without importing peft.

A peft LoRA layer holds the original module as ``base_layer`` and, per adapter name, ``lora_A[name]`` and
``lora_B[name]`` (``nn.Linear``) and ``scaling[name]`` (a float). phasetune's merge, name checks and resume
checks need only these, so they work on any model that has them and never need ``import peft``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

#: the modules LoRA is injected into here: peft's Conv1D (fan_in_fan_out), Embedding and Conv layers are not
#: supported by phasetune's merge yet
SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,)


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a peft LoRA layer (duck-typed: ``base_layer``, ``lora_A``, ``lora_B``, ``scaling``)."""
    return (isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
            and isinstance(getattr(module, "scaling", None), dict)
            and isinstance(getattr(module, "base_layer", None), nn.Module))


def base_module(layer: nn.Module) -> nn.Module:
    """The original module a LoRA layer wraps (peft may nest ``base_layer``s)."""
    while is_lora_layer(layer):
        layer = layer.base_layer
    return layer


def lora_layers(model: nn.Module, adapter: str) -> dict[str, nn.Module]:
    """Every LoRA layer of ``model`` that holds ``adapter``, by module name, in registration order."""
    return {n: m for n, m in model.named_modules() if is_lora_layer(m) and adapter in m.lora_A}


def inside_lora_layer(name: str, layers: set[str]) -> bool:
    """Whether module ``name`` is a LoRA layer's part (its ``base_layer``, ``lora_A``, ...), not a target."""
    return any(name.startswith(layer + ".") for layer in layers)


@dataclass(frozen=True)
class AdapterParams:
    """The parameters of one adapter in one LoRA layer, by their names in the model."""

    module: str
    A: str
    B: str
    B_bias: str | None
    base_weight: str
    base_bias: str | None

    def adapter_names(self) -> tuple[str, ...]:
        return (self.A, self.B) + ((self.B_bias,) if self.B_bias else ())


def adapter_params(model: nn.Module, module: str, adapter: str) -> AdapterParams:
    """Names of ``adapter``'s ``A``/``B`` and of the base weight in LoRA layer ``module`` of ``model``."""
    layer = model.get_submodule(module)
    prefix = f"{module}." if module else ""
    base = base_module(layer)
    base_name = next(n for n, m in layer.named_modules() if m is base)
    b_bias = layer.lora_B[adapter].bias is not None
    return AdapterParams(
        module=module,
        A=f"{prefix}lora_A.{adapter}.weight",
        B=f"{prefix}lora_B.{adapter}.weight",
        B_bias=f"{prefix}lora_B.{adapter}.bias" if b_bias else None,
        base_weight=f"{prefix}{base_name}.weight",
        base_bias=f"{prefix}{base_name}.bias" if getattr(base, "bias", None) is not None else None,
    )


def hypothetical_adapter_names(module: str, adapter: str) -> tuple[str, str]:
    """The names ``module``'s ``A`` and ``B`` weights will have once LoRA is injected into it."""
    prefix = f"{module}." if module else ""
    return f"{prefix}lora_A.{adapter}.weight", f"{prefix}lora_B.{adapter}.weight"


def iter_params(model: nn.Module, names: set[str]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``model``'s parameters whose names are in ``names``, in registration order."""
    for n, p in model.named_parameters():
        if n in names:
            yield n, p


def draw_lora_A(shape: torch.Size | tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A fresh ``A`` (fp32, on the CPU) drawn as peft's default init draws it: kaiming-uniform with
    ``a=sqrt(5)``, like ``nn.Linear``; ``B`` starts at zero, so a fresh adapter changes nothing."""
    t = torch.empty(tuple(shape))
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    return t
