"""Checks that LoRA and FSDP2 fit together, made before training so a mismatch is one clear line.

* Adapters must exist before sharding: FSDP2 fixes a unit's parameters when ``fully_shard`` runs, so an
  adapter added afterwards is a plain tensor that is neither sharded nor reduced across ranks (it trains
  on each rank's own gradients, silently).
* FSDP2 needs one dtype among the parameters a unit trains at any one time ("FSDP expects uniform original
  parameter dtype" at the first forward, "expects uniform gradient dtype" at the first backward after a
  thaw): fp32 adapters beside bf16 base weights that also train do not fit in one unit.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
from torch import nn

from phasetune.util.text import few


def sharded_modules(model: nn.Module) -> dict[str, str]:
    """Module name -> ``"FSDP2 unit"`` / ``"FSDP1 unit"`` for every module ``model`` already shards."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, FSDPModule):
            out[name] = "FSDP2 unit"
        elif isinstance(m, FullyShardedDataParallel):
            out[name] = "FSDP1 unit"
    return out


def check_not_sharded(model: nn.Module, modules: Sequence[str]) -> list[str]:
    """One problem per module of ``modules`` that sits in (or is) a sharded unit or holds DTensor parameters."""
    from torch.distributed.tensor import DTensor

    units = sharded_modules(model)
    problems: list[str] = []
    for name in modules:
        owner = max((u for u in units if u == "" or name == u or name.startswith(u + ".")), key=len, default=None)
        module = model.get_submodule(name)
        dtensor = any(isinstance(p, DTensor) for p in module.parameters(recurse=False))
        if owner is None and not dtensor:
            continue
        where = f"{units[owner]} '{owner or '<root>'}'" if owner is not None else "DTensor parameters"
        problems.append(f"module '{name}' is already sharded ({where}): LoRA adapters added after sharding are plain "
                        "tensors that FSDP neither shards nor reduces across ranks; inject the adapters before "
                        "fully_shard (phasetune does so when the schedule has a peft section and the model is "
                        "not sharded yet)")
    return problems


def fsdp2_units(model: nn.Module) -> dict[str, list[str]]:
    """FSDP2 unit name -> the parameter names it manages (those under it and under no nested unit)."""
    from torch.distributed.fsdp import FSDPModule

    units = [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]
    return _assign(model, units)


def plan_units(model: nn.Module, unit_modules: Sequence[str]) -> dict[str, list[str]]:
    """The units an FSDP2 plan will make: each module of ``unit_modules``, plus the root for the rest."""
    return _assign(model, ["", *(u for u in unit_modules if u)])


def _assign(model: nn.Module, units: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {u: [] for u in units}
    for name, _ in model.named_parameters():
        owner = max((u for u in units if u == "" or name.startswith(u + ".")), key=len, default=None)
        if owner is not None:
            out[owner].append(name)
    return out


def trainable_by_phase(phase_params: Sequence[Collection[str]],
                       frozen_by_merge: Mapping[int, Collection[str]] | None = None) -> list[set[str]]:
    """The parameter names that train in each phase: every earlier phase's too (phases add), less the
    adapters a ``merge_lora`` froze at the transition into that phase or before (``frozen_by_merge``)."""
    frozen_by_merge = frozen_by_merge or {}
    out: list[set[str]] = []
    trained: set[str] = set()
    frozen: set[str] = set()
    for k, params in enumerate(phase_params):
        trained |= set(params)
        frozen |= set(frozen_by_merge.get(k, ()))
        trained -= frozen
        out.append(set(trained))
    return out


def unit_dtype_problems(model: nn.Module, units: Mapping[str, Sequence[str]],
                        trainable: Sequence[Collection[str]]) -> list[str]:
    """One problem per FSDP2 unit whose trainable parameters mix dtypes in some phase (``trainable``: the
    names training in each phase, as :func:`trainable_by_phase` gives them)."""
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    problems: list[str] = []
    for unit, names in units.items():
        for k, phase_names in enumerate(trainable):
            by_dtype: dict[torch.dtype, list[str]] = {}
            for n in names:
                if n in phase_names:
                    by_dtype.setdefault(dtypes[n], []).append(n)
            if len(by_dtype) < 2:
                continue
            listed = "; ".join(f"{str(d).removeprefix('torch.')}: {few(ns, 2)}" for d, ns in by_dtype.items())
            adapters = [n for ns in by_dtype.values() for n in ns if ".lora_" in n]
            base = next((d for d, ns in by_dtype.items() if any(".lora_" not in n for n in ns)), None)
            fix = ("set adapter_dtype: base in the peft section (adapters in their base weight's dtype"
                   + (f", {str(base).removeprefix('torch.')}" if base is not None else "")
                   + "), or shard the adapters as units of their own (fsdp_plan entries for the "
                   "'<module>.lora_A' and '<module>.lora_B' modules)") if adapters else (
                   "give these parameters one dtype, or put them in separate units")
            problems.append(f"FSDP2 unit '{unit or '<root>'}' would train parameters of {len(by_dtype)} dtypes "
                            f"from phase {k} on ({listed}); FSDP2 needs one dtype among a unit's trainable "
                            f"parameters: {fix}")
            break
    return problems
