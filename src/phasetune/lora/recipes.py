"""LoRA recipes: ordinary raw schedules (a ``peft`` section plus phases) over a model's block units.

Both take the units :func:`phasetune.core.generate.block_units` finds on the model *before* injection (the head,
then the repeated blocks from the top down, then the stem) and name adapters by the names they will have
after it (``<block>.<...>.lora_A.<adapter>.weight``), so the phases decide where adapters go.

* :func:`progressive_lora`: phase 0 trains the head and the adapters of the top ``blocks_per_phase``
  blocks; each later phase adds the adapters of the next blocks down (peft #1829: LoRA on more layers as
  training goes on). The stem stays frozen.
* :func:`lora_then_full`: phase 0 trains the head and adapters on every block; phase 1 merges them all into
  the base weights (``merge_lora``) and trains the top ``full_blocks`` blocks' base weights (peft #1331:
  LoRA first, some full layers later).

Options shared with :func:`phasetune.core.recipes.apply_recipe`: ``lr``, ``phase_steps`` / ``total_steps``,
``warmup_fraction``, ``steps_per_epoch`` (same meaning). The LoRA options: ``r``, ``alpha``, ``dropout``,
``adapter_dtype``, ``adapter_name`` (the ``peft`` section's keys) and ``leaf``, a regex over the last part
of the names of the linear modules that get adapters (e.g. ``query|value``; default: every nn.Linear in the
blocks).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from phasetune.core import recipes as _recipes
from phasetune.lora.section import DEFAULT_ALPHA, DEFAULT_RANK, parse_peft_section

LORA_RECIPES = ("progressive_lora", "lora_then_full")
_LENGTH_OPTIONS = ("phase_steps", "total_steps", "warmup_fraction", "steps_per_epoch")


def progressive_lora(units: Sequence[Sequence[str]], *, has_stem: bool = True, r: int = DEFAULT_RANK,
                     alpha: float = DEFAULT_ALPHA, dropout: float = 0.0, adapter_dtype: str = "float32",
                     adapter_name: str = "default", leaf: str | None = None, blocks_per_phase: int = 1,
                     lr: float | None = None, lr_decay: float = 1.0, **lengths: Any) -> dict[Any, Any]:
    """The raw schedule: head + top blocks' adapters, then the adapters of the next blocks down, one phase
    per ``blocks_per_phase`` blocks; phase k >= 1 at ``lr * lr_decay ** (k - 1)``. Raises ``ValueError``
    listing every bad option."""
    problems = _check_common(lengths, lr, leaf)
    if not (_positive(lr_decay) and lr_decay <= 1):
        problems.append(f"lr_decay must be a number in (0, 1], got {lr_decay!r}")
    if isinstance(blocks_per_phase, bool) or not isinstance(blocks_per_phase, int) or blocks_per_phase < 1:
        problems.append(f"blocks_per_phase must be an integer >= 1, got {blocks_per_phase!r}")
    peft = _peft_section(r, alpha, dropout, adapter_dtype, adapter_name, problems)
    head, blocks = _split(units, has_stem, problems)
    if problems:
        raise ValueError("; ".join(problems))
    groups = [blocks[i : i + blocks_per_phase] for i in range(0, len(blocks), blocks_per_phase)]
    phases: dict[int, dict[str, Any]] = {}
    for k, group in enumerate(groups):
        params = [*(head if k == 0 else []), *(_adapters(u, leaf, adapter_name) for u in group)]
        phases[k] = {"params": params}
        if k > 0 and lr is not None:
            phases[k]["lr"] = _recipes.tidy_lr(lr * lr_decay ** (k - 1))
    _recipes.add_lengths(phases, *_lengths(lengths, len(phases)))
    return {"peft": peft, **phases}


def lora_then_full(units: Sequence[Sequence[str]], *, has_stem: bool = True, r: int = DEFAULT_RANK,
                   alpha: float = DEFAULT_ALPHA, dropout: float = 0.0, adapter_dtype: str = "float32",
                   adapter_name: str = "default", leaf: str | None = None, full_blocks: int = 1,
                   lr: float | None = None, **lengths: Any) -> dict[Any, Any]:
    """The raw schedule: head + adapters on every block, then (``merge_lora: true``) the top ``full_blocks``
    blocks' base weights at ``lr``. Raises ``ValueError`` listing every bad option."""
    problems = _check_common(lengths, lr, leaf)
    peft = _peft_section(r, alpha, dropout, adapter_dtype, adapter_name, problems)
    head, blocks = _split(units, has_stem, problems)
    if isinstance(full_blocks, bool) or not isinstance(full_blocks, int) or full_blocks < 1:
        problems.append(f"full_blocks must be an integer >= 1, got {full_blocks!r}")
    elif blocks and full_blocks > len(blocks):
        problems.append(f"full_blocks is {full_blocks} but the model has {len(blocks)} blocks")
    if problems:
        raise ValueError("; ".join(problems))
    phases: dict[int, dict[str, Any]] = {
        0: {"params": [*head, *(_adapters(u, leaf, adapter_name) for u in blocks)]},
        1: {"params": [_base_weights(u) for u in blocks[:full_blocks]], "merge_lora": True},
    }
    if lr is not None:
        phases[1]["lr"] = _recipes.tidy_lr(lr)
    _recipes.add_lengths(phases, *_lengths(lengths, len(phases)))
    return {"peft": peft, **phases}


def _check_common(lengths: dict[str, Any], lr: Any, leaf: str | None) -> list[str]:
    problems = [f"unknown option {k!r}; options: r, alpha, dropout, adapter_dtype, adapter_name, leaf, lr, "
                f"{', '.join(_LENGTH_OPTIONS)} and the recipe's own" for k in lengths if k not in _LENGTH_OPTIONS]
    if lr is not None and not _positive(lr):
        problems.append(f"lr must be a positive number, got {lr!r}")
    if leaf is not None:
        try:
            re.compile(leaf)
        except (re.error, TypeError) as e:
            problems.append(f"leaf must be a regex over the last part of module names (e.g. 'query|value'): {e}")
    warmup = lengths.get("warmup_fraction", _recipes.DEFAULT_WARMUP_FRACTION)
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0 <= warmup < 1:
        problems.append(f"warmup_fraction must be a number in [0, 1), got {warmup!r}")
    return problems


def _peft_section(r: int, alpha: float, dropout: float, dtype: str, name: str, problems: list[str]) -> dict[str, Any]:
    raw = {"method": "lora", "r": r, "alpha": alpha, "dropout": dropout, "adapter_dtype": dtype, "adapter_name": name}
    spec, found = parse_peft_section(raw)
    problems.extend(p.replace("peft section, key ", "option ") for p in found)
    return spec.to_raw() if spec is not None else raw


def _split(units: Sequence[Sequence[str]], has_stem: bool, problems: list[str]) -> tuple[list[str], list[list[str]]]:
    """The head's entries and the blocks' (the stem, when there is one, gets no adapter and stays frozen)."""
    units = [list(u) for u in units]
    blocks = units[1:-1] if has_stem else units[1:]
    if not blocks:
        problems.append(f"the model has no repeated blocks to put adapters on (units: {len(units)}, "
                        f"has_stem={has_stem})")
        return (units[0] if units else []), []
    return units[0], blocks


def _module_prefixes(unit: Sequence[str]) -> list[str]:
    """Escaped module names a block unit covers: ``a\\.b\\..*`` -> ``a\\.b``, an exact name -> its module."""
    out: list[str] = []
    for entry in unit:
        prefix = entry[: -len(r"\..*")] if entry.endswith(r"\..*") else re.escape(entry.rsplit(".", 1)[0])
        if prefix not in out:
            out.append(prefix)
    return out


def _adapters(unit: Sequence[str], leaf: str | None, adapter: str) -> str:
    """One regex naming the adapter parameters (``A`` and ``B``) of the linear modules inside a block."""
    inner = r"(?:.*\.)?" + (f"(?:{leaf})\\." if leaf else "")
    prefixes = _module_prefixes(unit)
    body = prefixes[0] if len(prefixes) == 1 else "(?:" + "|".join(prefixes) + ")"
    return f"{body}\\.{inner}lora_[AB]\\.{re.escape(adapter)}\\..*"


def _base_weights(unit: Sequence[str]) -> str:
    """One regex naming a block's parameters other than its adapters (the base weights a full phase trains)."""
    prefixes = _module_prefixes(unit)
    body = prefixes[0] if len(prefixes) == 1 else "(?:" + "|".join(prefixes) + ")"
    return f"{body}\\.(?!(?:.*\\.)?lora_[AB]\\.).*"


def _lengths(lengths: dict[str, Any], n: int) -> tuple[Any, float, Any]:
    phase_steps = lengths.get("phase_steps")
    if lengths.get("total_steps") is not None:
        if phase_steps is not None:
            raise ValueError("give either phase_steps (the steps of each phase) or total_steps (a budget split "
                             "across the phases), not both")
        phase_steps = _recipes.split_budget(lengths["total_steps"], n)
    warmup = lengths.get("warmup_fraction", _recipes.DEFAULT_WARMUP_FRACTION)
    return phase_steps, warmup, lengths.get("steps_per_epoch")


def _positive(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x > 0
