"""A schedule's LoRA adapters put into a model: the one call every front end (and the memory plan) makes before
it shards, wraps or reads the model's parameters (torch and peft; no run needed)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from phasetune.core.schedule import resolve_schedule
from phasetune.core.schedule_validation import load_schedule_source
from phasetune.errors import ScheduleError
from phasetune.lora.fsdp_checks import check_not_sharded
from phasetune.lora.injection import InjectionRecord, inject_lora
from phasetune.lora.merge import merge_targets
from phasetune.lora.names import pre_injection_name_problems
from phasetune.lora.section import LoraSpec, MergeSpec, parse_merge_lora, parse_peft_section
from phasetune.lora.targets import adapter_targets, names_adapters

#: the seed of the generator new adapters' ``A`` are drawn from: the same on every rank and in every rerun, and
#: torch's global generator is left alone (a run with adapters draws the same batches as one without)
INJECTION_SEED = 0
#: what a front end's user is told to call when a run finds adapters missing
HOW_TO_INJECT = ("call phasetune.run.inject_adapters(model, schedule) on the unsharded model before the front end "
                 "is built (FSDP2Strategy.prepare_model(model, schedule=...) does it before fully_shard)")


def phase_entries(raw: Mapping[Any, Any]) -> tuple[dict[int, list[str]], dict[int, Any]]:
    """Each phase's raw ``params`` entries and its raw ``merge_lora`` value, by phase index."""
    entries: dict[int, list[str]] = {}
    merges: dict[int, Any] = {}
    for key, body in raw.items():
        if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit())):
            continue
        if not isinstance(body, Mapping):
            continue
        k = int(key)
        params = body.get("params")
        entries[k] = [e for e in params if isinstance(e, str)] if isinstance(params, (list, tuple)) else []
        if body.get("merge_lora") not in (None, False):
            merges[k] = body["merge_lora"]
    return entries, merges


def asks_for_lora(raw: Any) -> bool:
    """Whether a raw schedule has a ``peft`` section, a ``merge_lora`` or a phase naming adapter parameters."""
    if not isinstance(raw, Mapping):
        return False
    entries, merges = phase_entries(raw)
    return raw.get("peft") is not None or bool(merges) or any(names_adapters(e) for es in entries.values() for e in es)


def _raise(problems: list[str], raw: Any, desc: str, model: nn.Module) -> None:
    """Raise ``problems`` with the schedule's own (checked against the model as it is now), once."""
    try:
        resolve_schedule(raw, [n for n, _ in model.named_parameters()])
    except ScheduleError as e:
        quoted = set(re.findall(r"'([^']+)'", " ".join(problems)))
        # an entry a LoRA problem already names (a pre-injection name) is not reported twice
        problems = problems + [p for p in e.problems if not any(f"'{q}'" in p for q in quoted if len(q) > 3)]
    raise ScheduleError(problems, desc)


def inject_adapters(model: nn.Module, schedule: str | os.PathLike[str] | Mapping[Any, Any] | None, *,
                    seed: int = INJECTION_SEED) -> InjectionRecord | None:
    """Inject the LoRA adapters ``schedule`` asks for into ``model``, once, before any sharding or wrapping.

    Every module a ``target_modules`` regex or a phase's adapter entry names gets adapter ``A``/``B`` (frozen
    until their phase; every other parameter keeps its ``requires_grad``). Raises one
    :class:`~phasetune.errors.ScheduleError` listing every problem (the ``peft`` section's keys, entries
    written with names from before injection, ``merge_lora`` entries naming no adapter, modules already
    sharded, and the schedule's own problems). A schedule without LoRA keys, or a model that already has the
    adapters (a second call), changes nothing; returns the :class:`~phasetune.lora.InjectionRecord` (None
    when nothing was injected).
    """
    if schedule is None:
        return None
    raw, desc, problems = load_schedule_source(schedule)
    if problems or not asks_for_lora(raw):
        return None  # the schedule's own errors are raised where it is resolved
    spec, problems = parse_peft_section(raw.get("peft"))
    entries, merge_raw = phase_entries(raw)
    merges = {k: parse_merge_lora(v, k, problems) for k, v in sorted(merge_raw.items())}
    modules, found = adapter_targets(model, spec, entries)
    problems += found
    record = None
    if modules and not problems:
        problems += [f"{p}; {HOW_TO_INJECT}" for p in check_not_sharded(model, modules)]
    if modules and not problems and spec is not None:
        record = inject_lora(model, spec, modules, generator=torch.Generator().manual_seed(seed))
        problems += pre_injection_name_problems(entries, record.renames)
    if spec is not None and not problems:
        problems += merge_plan(model, spec, merges)[1]
    if problems:
        _raise(problems, raw, desc, model)
    return record


def merge_plan(model: nn.Module, spec: LoraSpec | None, merges: Mapping[int, MergeSpec | None]
                ) -> tuple[dict[int, tuple[MergeSpec, list[str]]], list[str]]:
    """Each merging phase's spec and the LoRA layers it folds; problems for entries naming no adapter."""
    adapter = spec.adapter_name if spec is not None else "default"
    plan: dict[int, tuple[MergeSpec, list[str]]] = {}
    problems: list[str] = []
    for k, m in merges.items():
        if m is None:
            continue
        modules, found = merge_targets(model, m, adapter, k)
        problems += found
        plan[k] = (m, modules)
    return plan, problems


__all__ = ["HOW_TO_INJECT", "INJECTION_SEED", "asks_for_lora", "inject_adapters", "merge_plan", "phase_entries"]
