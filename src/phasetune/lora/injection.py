"""Injecting LoRA adapters once, before any sharding, without disturbing what the schedule controls.

peft's ``inject_adapter_in_model`` renames each target's weights (``x.weight`` -> ``x.base_layer.weight``)
and, on a model without adapters, sets ``requires_grad=False`` on every other parameter; its new adapters
train at once. :func:`inject_lora` puts every existing parameter's ``requires_grad`` back, leaves the new
adapters frozen until their phase thaws them, and records the renames so a schedule written with the old
names gets "did you mean" (:mod:`phasetune.lora.names`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from phasetune.errors import ConfigurationError
from phasetune.lora.fsdp_checks import check_not_sharded
from phasetune.lora.layers import adapter_params, base_module, draw_lora_A
from phasetune.lora.section import LoraSpec


def require_peft() -> Any:
    """The ``peft`` module, or a :class:`~phasetune.errors.ConfigurationError` saying how to install it."""
    try:
        import peft
    except ImportError as e:
        raise ConfigurationError(
            "the schedule asks for LoRA adapters (a peft section or a phase naming lora_A/lora_B), which needs the "
            "peft package: pip install peft"
        ) from e
    return peft


@dataclass
class InjectionRecord:
    """What :func:`inject_lora` did, as plain data (``to_state`` is JSON-able).

    ``renames`` maps each parameter name from before injection to its new name (only those that changed);
    ``adapters`` maps each injected module to its new adapter parameters' names; ``restored`` names the
    parameters whose ``requires_grad`` peft changed and phasetune put back.
    """

    adapter: str
    modules: tuple[str, ...] = ()
    renames: dict[str, str] = field(default_factory=dict)
    adapters: dict[str, tuple[str, ...]] = field(default_factory=dict)
    restored: tuple[str, ...] = ()

    def to_state(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "modules": list(self.modules), "renames": dict(self.renames),
                "adapters": {k: list(v) for k, v in self.adapters.items()}, "restored": list(self.restored)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> InjectionRecord:
        return cls(state["adapter"], tuple(state["modules"]), dict(state["renames"]),
                   {k: tuple(v) for k, v in state["adapters"].items()}, tuple(state["restored"]))


def inject_lora(model: nn.Module, spec: LoraSpec, modules: Sequence[str],
                generator: torch.Generator | None = None) -> InjectionRecord:
    """Give each of ``modules`` (names in ``model``, e.g. from :func:`~phasetune.lora.targets.adapter_targets`)
    a LoRA adapter ``spec.adapter_name``, frozen, in ``spec``'s dtype; every other parameter keeps its
    ``requires_grad``.

    Works on a plain ``nn.Module``, a transformers model and a module holding a ``PeftModel`` (modules under
    one are injected through its inner model, and names stay those of ``model``). With ``generator`` each
    new ``A`` is drawn from it (in ``modules`` order) instead of from torch's global generator. Raises
    :class:`~phasetune.errors.ConfigurationError` when a module is already sharded.
    """
    record = InjectionRecord(spec.adapter_name)
    if not modules:
        return record
    problems = check_not_sharded(model, modules)
    if problems:
        raise ConfigurationError(problems)
    peft = require_peft()
    before = {id(p): (n, p.requires_grad) for n, p in model.named_parameters()}
    for root, inner_names in _by_root(model, modules, peft).items():
        config = peft.LoraConfig(
            r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none", init_lora_weights=True,
            target_modules="|".join(f"(?:{re.escape(n)})" for n in inner_names),
        )
        # peft would write this injection's config into a PeftModel's own configs (found through the inner
        # model's peft_config attribute), replacing the user's: hide them during the injection
        previous = root.__dict__.pop("peft_config", None)
        with warnings.catch_warnings():
            # peft warns about the model's config or missing modules_to_save; none of it applies here
            warnings.simplefilter("ignore", UserWarning)
            peft.inject_adapter_in_model(config, root, adapter_name=spec.adapter_name)
        if previous is not None:
            root.peft_config = previous
    adapter = spec.adapter_name
    for name in modules:
        layer = model.get_submodule(name)
        dtype = spec.dtype_for(base_module(layer).weight.dtype)
        layer.lora_A[adapter].to(dtype=dtype)
        layer.lora_B[adapter].to(dtype=dtype)
        if generator is not None:
            weight = layer.lora_A[adapter].weight
            with torch.no_grad():
                weight.copy_(draw_lora_A(weight.shape, generator).to(dtype=dtype, device=weight.device))
    restored: list[str] = []
    for new_name, p in model.named_parameters():
        if id(p) not in before:
            p.requires_grad_(False)  # a new adapter trains from the phase that names it
            continue
        old_name, requires_grad = before[id(p)]
        if old_name != new_name:
            record.renames[old_name] = new_name
        if p.requires_grad != requires_grad:
            p.requires_grad_(requires_grad)
            restored.append(new_name)
    record.modules = tuple(modules)
    record.restored = tuple(restored)
    record.adapters = {m: adapter_params(model, m, adapter).adapter_names() for m in modules}
    return record


def _by_root(model: nn.Module, modules: Sequence[str], peft: Any) -> dict[nn.Module, list[str]]:
    """The module to inject each target through, with the target's name inside it: a ``PeftModel``'s (or any
    peft tuner's) inner model for targets under one, else ``model`` itself."""
    tuners = {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.tuners_utils.BaseTuner)}
    out: dict[nn.Module, list[str]] = {}
    for name in modules:
        root, inner = model, name
        for t in sorted(tuners, key=len, reverse=True):
            prefix = f"{t}.model." if t else "model."
            if name.startswith(prefix):
                root, inner = tuners[t].model, name[len(prefix):]
                break
        out.setdefault(root, []).append(inner)
    return out
