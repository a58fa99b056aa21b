"""The schedule's ``peft`` section and a phase's ``merge_lora`` key, parsed and checked.

Both parsers collect every problem (each naming the key and saying what to write instead) and return them
with the result, so the schedule validation can raise them together with its own, once, before compute.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from phasetune.core.schedule_validation import as_float
from phasetune.errors import ScheduleError

PEFT_KEYS = ("method", "r", "rank", "alpha", "dropout", "target_modules", "adapter_dtype", "adapter_name")
MERGE_KEYS = ("modules", "reinit", "seed")
METHODS = ("lora",)
#: ``adapter_dtype`` values: a floating dtype by name, or ``base`` (each adapter in its base weight's dtype)
ADAPTER_DTYPES = ("float32", "bfloat16", "float16", "float64", "base")
#: peft's defaults for a LoRA rank and alpha (scaling alpha / r = 1)
DEFAULT_RANK = 8
DEFAULT_ALPHA = 8.0


@dataclass(frozen=True)
class LoraSpec:
    """What the ``peft`` section asks for: LoRA of rank ``r`` with scaling ``alpha / r`` on the modules that
    ``target_modules`` (regexes over whole module names) match, plus those a phase names adapters of.

    ``adapter_dtype`` is a torch dtype name or ``"base"``; the default, ``float32``, is peft's
    ``get_peft_model`` choice (it upcasts adapters of bf16/fp16 models).
    """

    r: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    adapter_dtype: str = "float32"
    adapter_name: str = "default"

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def dtype_for(self, base_dtype: torch.dtype) -> torch.dtype:
        """The dtype of an adapter whose base weight has ``base_dtype``."""
        return base_dtype if self.adapter_dtype == "base" else getattr(torch, self.adapter_dtype)

    def to_raw(self) -> dict[str, Any]:
        """The section as a schedule file writes it."""
        raw: dict[str, Any] = {"method": "lora", "r": self.r, "alpha": self.alpha}
        if self.dropout:
            raw["dropout"] = self.dropout
        if self.target_modules:
            raw["target_modules"] = list(self.target_modules)
        if self.adapter_dtype != "float32":
            raw["adapter_dtype"] = self.adapter_dtype
        if self.adapter_name != "default":
            raw["adapter_name"] = self.adapter_name
        return raw


def parse_peft_section(raw: Any) -> tuple[LoraSpec | None, list[str]]:
    """``(spec, problems)`` for the schedule's ``peft`` section (``None`` when the section is absent)."""
    if raw is None:
        return None, []
    where = "peft section"
    if not isinstance(raw, Mapping):
        return None, [f"{where}: expected a mapping such as {{method: lora, r: 8, alpha: 16}}, got "
                      f"{type(raw).__name__} {raw!r}"]
    problems: list[str] = []
    for key in raw:
        if key not in PEFT_KEYS:
            hint = difflib.get_close_matches(str(key), PEFT_KEYS, n=1)
            problems.append(f"{where}: unknown key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint
                                                                else f"; allowed keys: {', '.join(PEFT_KEYS)}"))
    method = raw.get("method", "lora")
    if method not in METHODS:
        problems.append(f"{where}, key 'method': {method!r} is not supported; write method: lora (the only PEFT "
                        "method phasetune schedules so far)")
    if "r" in raw and "rank" in raw:
        problems.append(f"{where}: give the LoRA rank as either 'r' or 'rank', not both")
    r = raw.get("r", raw.get("rank", DEFAULT_RANK))
    rank_key = "rank" if "rank" in raw and "r" not in raw else "r"
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.append(f"{where}, key '{rank_key}': {r!r} is not an integer >= 1 (the LoRA rank, e.g. {rank_key}: 8)")
        r = DEFAULT_RANK
    alpha = as_float(raw.get("alpha", DEFAULT_ALPHA))
    if alpha is None or not math.isfinite(alpha) or alpha <= 0:
        problems.append(f"{where}, key 'alpha': {raw.get('alpha')!r} is not a positive number (the adapter's "
                        "output is scaled by alpha / r; e.g. alpha: 16)")
        alpha = DEFAULT_ALPHA
    dropout = as_float(raw.get("dropout", 0.0))
    if dropout is None or not 0 <= dropout < 1:
        problems.append(f"{where}, key 'dropout': {raw.get('dropout')!r} is not a number in [0, 1) (dropout on "
                        "the adapter's input; 0 turns it off)")
        dropout = 0.0
    targets = _target_modules(raw.get("target_modules"), where, problems)
    dtype = raw.get("adapter_dtype", "float32")
    if dtype not in ADAPTER_DTYPES:
        hint = difflib.get_close_matches(str(dtype), ADAPTER_DTYPES, n=1)
        problems.append(f"{where}, key 'adapter_dtype': {dtype!r} is not one of {', '.join(ADAPTER_DTYPES)}"
                        + (f"; did you mean {hint[0]!r}?" if hint else ""))
        dtype = "float32"
    name = raw.get("adapter_name", "default")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w-]*", name):
        problems.append(f"{where}, key 'adapter_name': {name!r} is not a name of letters, digits, '_' or '-' "
                        "(it becomes part of parameter names: ...lora_A.<adapter_name>.weight)")
        name = "default"
    spec = LoraSpec(r=r, alpha=float(alpha), dropout=float(dropout), target_modules=targets,
                    adapter_dtype=str(dtype), adapter_name=name)
    return spec, problems


def peft_spec(raw: Any) -> LoraSpec | None:
    """The checked ``peft`` section; raises :class:`~phasetune.errors.ScheduleError` listing every problem."""
    spec, problems = parse_peft_section(raw)
    if problems:
        raise ScheduleError(problems)
    return spec


def _target_modules(raw: Any, where: str, problems: list[str]) -> tuple[str, ...]:
    if raw is None:
        return ()
    entries = [raw] if isinstance(raw, str) else raw
    if not isinstance(entries, (list, tuple)):
        problems.append(f"{where}, key 'target_modules': expected a regex or a list of regexes over module names, "
                        f"got {type(raw).__name__}")
        return ()
    out: list[str] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            problems.append(f"{where}, key 'target_modules': entry {entry!r} is not a non-empty string (a regex "
                            "matched against whole module names, e.g. '.*\\.(query|value)')")
            continue
        try:
            re.compile(entry)
        except re.error as e:
            problems.append(f"{where}, key 'target_modules': '{entry}' is not a valid regex ({e})")
            continue
        out.append(entry)
    return tuple(out)


@dataclass(frozen=True)
class MergeSpec:
    """A phase's ``merge_lora``: at the transition into the phase, fold these adapters into their base weights.

    ``modules`` are regexes over LoRA layers' module names (or their adapter parameters' names); ``None``
    means every LoRA layer holding the adapter. With ``reinit`` a fresh adapter (``A`` drawn as peft does,
    ``B`` zero) replaces each merged one, drawn from a generator seeded with ``seed`` (the phase index when
    not given), so the restart is the same on every rank and after a resume.
    """

    modules: tuple[str, ...] | None = None
    reinit: bool = False
    seed: int | None = None

    def to_raw(self) -> Any:
        if not self.reinit and self.seed is None:
            return True if self.modules is None else list(self.modules)
        raw: dict[str, Any] = {"modules": "all" if self.modules is None else list(self.modules), "reinit": self.reinit}
        if self.seed is not None:
            raw["seed"] = self.seed
        return raw


def parse_merge_lora(raw: Any, phase: int, problems: list[str]) -> MergeSpec | None:
    """A phase's ``merge_lora`` value (``true``/``all``, a list of regexes, or a mapping of :data:`MERGE_KEYS`)."""
    key = f"phase {phase}, key 'merge_lora'"
    if raw is None or raw is False:
        return None
    if phase == 0:
        problems.append(f"{key}: a merge happens at a transition, and phase 0 has none before it; move it to the "
                        "phase that should start from the merged weights")
        return None
    modules: Any = raw
    reinit, seed = False, None
    if isinstance(raw, Mapping):
        for k in raw:
            if k not in MERGE_KEYS:
                hint = difflib.get_close_matches(str(k), MERGE_KEYS, n=1)
                problems.append(f"{key}: unknown sub-key {k!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                                + f" (valid: {', '.join(MERGE_KEYS)})")
        modules = raw.get("modules", "all")
        reinit = raw.get("reinit", False)
        if not isinstance(reinit, bool):
            problems.append(f"{key}, 'reinit': expected true or false, got {reinit!r}")
            reinit = False
        seed = raw.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            problems.append(f"{key}, 'seed': {seed!r} is not an integer >= 0 (it seeds the fresh adapters' A)")
            seed = None
        if seed is not None and not reinit:
            problems.append(f"{key}, 'seed': a seed only matters with reinit: true (it draws the fresh adapters)")
    if modules is True or modules == "all":
        return MergeSpec(None, reinit, seed)
    entries = [modules] if isinstance(modules, str) else modules
    if not isinstance(entries, (list, tuple)) or not entries:
        problems.append(f"{key}: expected true, 'all', a list of module regexes or a mapping with "
                        f"{', '.join(MERGE_KEYS)}, got {modules!r}")
        return None
    ok = True
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            problems.append(f"{key}: entry {entry!r} is not a non-empty string (a regex over LoRA layers' "
                            "module names)")
            ok = False
            continue
        try:
            re.compile(entry)
        except re.error as e:
            problems.append(f"{key}: '{entry}' is not a valid regex ({e})")
            ok = False
    return MergeSpec(tuple(entries), reinit, seed) if ok else None
