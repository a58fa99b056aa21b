"""The FSDP2 units of a model without an ``fsdp_plan``: one per transformer block, plus embeddings and head.

:func:`block_plan` writes the plan :meth:`~phasetune.loop.strategy.FSDP2Strategy.prepare_model` applies when given
``block_classes`` (or none: the model's ``_no_split_modules``); :func:`unit_dtype_problems` checks a plan's
units before any sharding, since FSDP2 gathers each unit as one dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from phasetune.errors import ConfigurationError
from phasetune.sharding.names import logical_name

log = logging.getLogger("phasetune")


def block_plan(model: nn.Module, block_classes: Sequence[str | type[nn.Module]] | None) -> dict[str, Any]:
    """An ``fsdp_plan`` of one unit per transformer block (outermost modules of ``block_classes``, else of the
    model's ``_no_split_modules``), plus the input embeddings and the output head unless their weights are tied.
    """
    wanted = [c if isinstance(c, str) else c.__name__ for c in block_classes or ()]
    if not wanted:
        for m in model.modules():
            wanted.extend(getattr(m, "_no_split_modules", None) or ())
    present = {type(m).__name__ for m in model.modules()}
    unknown = [c for c in wanted if c not in present]
    if block_classes and unknown:
        import difflib

        hints = {c: difflib.get_close_matches(c, sorted(present), n=2) for c in unknown}
        raise ConfigurationError([f"block class {c!r} is not a module class of {type(model).__name__}"
                                  + (f"; did you mean {', '.join(map(repr, h))}?" if h else "") for c, h in hints.items()])
    names = set(wanted)
    blocks: list[str] = []
    for name, m in model.named_modules():
        if name and type(m).__name__ in names and not any(name.startswith(b + ".") for b in blocks):
            blocks.append(name)
    if not blocks:
        log.info("phasetune: no transformer block classes given or found (_no_split_modules); the model is one "
                 "FSDP unit. Pass block_classes=[...] to shard it block by block.")
    plan: dict[str, Any] = {}
    for n in _embedding_and_head(model):
        if not any(n == b or n.startswith(b + ".") for b in blocks):
            plan[n] = {}
    for b in blocks:
        plan[b] = {}
    return plan


def _embedding_and_head(model: nn.Module) -> list[str]:
    """Module names of the input embeddings and the output head (HF accessors, else every ``nn.Embedding``),
    leaving out modules whose weights are tied (they must share one unit)."""
    mods = {m: n for n, m in model.named_modules()}
    found: list[nn.Module] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        try:
            m = fn() if callable(fn) else None
        except (NotImplementedError, AttributeError):
            m = None
        if isinstance(m, nn.Module) and m is not model:
            found.append(m)
    if not found:
        found = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    weights: dict[int, int] = {}
    for m in found:
        for p in m.parameters(recurse=False):
            weights[id(p)] = weights.get(id(p), 0) + 1
    shared = {i for i, c in weights.items() if c > 1}
    out = []
    for m in found:
        if any(id(p) in shared for p in m.parameters(recurse=False)) or not mods.get(m):
            continue
        if mods[m] not in out:
            out.append(mods[m])
    return out


def unit_dtype_problems(model: nn.Module, units: Sequence[str]) -> list[str]:
    """FSDP2 gathers each unit's parameters as one dtype: list units whose own parameters mix dtypes."""
    unit_set = set(units)
    by_unit: dict[str, dict[torch.dtype, str]] = {}
    for name, p in model.named_parameters():
        name = logical_name(name)
        parts = name.split(".")[:-1]
        owner = next((".".join(parts[:d]) for d in range(len(parts), -1, -1) if ".".join(parts[:d]) in unit_set), "")
        by_unit.setdefault(owner, {}).setdefault(p.dtype, name)
    return [
        f"FSDP unit {u or '<root>'!r} holds parameters of several dtypes ("
        + ", ".join(f"{str(dt).removeprefix('torch.')} e.g. {ex!r}" for dt, ex in kinds.items())
        + "); FSDP2 gathers a unit as one dtype: cast the module to one dtype, or give the odd parameters' module "
        "its own unit (fsdp_plan)"
        for u, kinds in by_unit.items() if len(kinds) > 1
    ]
