"""Checking a raw schedule (a YAML file or a dict) against a model's parameter names.

Every problem is collected, each naming its phase and key and saying what to write instead, so that
:func:`phasetune.core.schedule.resolve_schedule` can raise them all at once before any training starts.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from phasetune.core import specs
from phasetune.core.param_patterns import dot_hint, match_entry, quote
from phasetune.util.files import DuplicateKeyError, load_yaml
from phasetune.util.text import few

PHASE_KEYS = ("params", "lr", "max_transition_epoch", "max_transition_step", "new_optimizer", "new_lr_scheduler",
              "prefix_cache", "merge_lora")
#: top-level keys of a schedule that are not phases (checked by the layer that uses them: ``peft`` by
#: :mod:`phasetune.lora.section`, in the run, with the model at hand)
SECTION_KEYS = ("peft",)
#: how the two phase-length keys count, for their messages
_CAP_UNITS = {"max_transition_epoch": "epoch", "max_transition_step": "optimizer step"}
NEW_LR_SCHEDULER_KEYS = ("lr_scheduler_init", "pl_lrs_cfg", "init_pg_lrs", "use_current_optimizer_pg_lrs")
NEW_OPTIMIZER_KEYS = ("optimizer_init",)
PREFIX_CACHE_KEYS = ("prefix_end", "limit_mb", "deterministic_inputs")


def load_schedule_source(source: str | os.PathLike[str] | Mapping[Any, Any]) -> tuple[Any, str, list[str]]:
    """Read a schedule file or take a mapping; returns ``(raw, description, problems)``."""
    if isinstance(source, Mapping):
        return source, "<dict>", []
    if not isinstance(source, (str, os.PathLike)):
        return None, repr(source), [f"ft_schedule must be a YAML file path or a dict, got {type(source).__name__}"]
    path = Path(source)
    desc = f"'{path}'"
    if not path.exists():
        return None, desc, [f"file not found: '{path}' (check the path, or omit ft_schedule to generate one)"]
    if path.is_dir():
        return None, desc, [f"'{path}' is a directory, not a schedule file"]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return None, desc, [f"cannot read '{path}': {e}"]
    try:
        raw = load_yaml(text)
    except DuplicateKeyError as e:
        return None, desc, [f"{d} (each phase and each key may appear once)" for d in e.duplicates]
    except yaml.YAMLError as e:
        return None, desc, [f"not valid YAML: {e}".replace("\n", " ")]
    if raw is None:
        return None, desc, [f"'{path}' is empty; a schedule needs at least phase 0 with 'params'"]
    return raw, desc, []


def _phase_index(key: Any) -> int | None:
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key
    if isinstance(key, str) and re.fullmatch(r"\d+", key.strip()):
        return int(key)
    return None


def check_phases(
    raw: Any, names: list[str], epoch_only: bool
) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Check every phase of ``raw``; returns ``(phases, problems, notes)``.

    Each of ``phases`` holds the keyword arguments of one :class:`~phasetune.core.schedule.Phase`; they are
    meaningful only when ``problems`` is empty. ``notes`` are warnings that do not stop a run.
    """
    problems: list[str] = []
    notes: list[str] = []
    if not isinstance(raw, Mapping):
        return [], [
            f"the schedule must be a mapping of phase index to phase settings (0: {{params: [...]}}), "
            f"got {type(raw).__name__}"
        ], []
    if not any(k not in SECTION_KEYS for k in raw):
        return [], ["the schedule is empty; it needs at least phase 0 with 'params'"], []
    indexed: dict[int, Any] = {}
    for key, value in raw.items():
        if key in SECTION_KEYS:
            continue
        idx = _phase_index(key)
        if idx is None or idx < 0:
            hint = difflib.get_close_matches(str(key), SECTION_KEYS, n=1) if isinstance(key, str) else []
            problems.append(f"phase key {key!r} is not a non-negative integer; phases are numbered 0, 1, 2, ..."
                            + (f" (or did you mean the {hint[0]!r} section?)" if hint else ""))
            continue
        if idx in indexed:
            problems.append(f"phase {idx} is defined twice (keys {key!r} and another spelling of {idx})")
            continue
        indexed[idx] = value
    if indexed:
        missing = sorted(set(range(max(indexed) + 1)) - set(indexed))
        if missing:
            problems.append(
                f"phase keys must be contiguous from 0; missing {', '.join(map(str, missing))} "
                f"(found {', '.join(map(str, sorted(indexed)))})"
            )

    name_set = set(names)
    owner: dict[str, int] = {}
    owner_entry: dict[str, str] = {}
    phases: list[dict[str, Any]] = []
    last_cap: dict[str, tuple[int, int]] = {}  # key -> (phase, value) of the previous phase that set it
    for idx in sorted(indexed):
        where = f"phase {idx}"
        body = indexed[idx]
        if not isinstance(body, Mapping):
            problems.append(f"{where}: expected a mapping with 'params', got {type(body).__name__} {body!r}")
            continue
        for key in body:
            if key not in PHASE_KEYS:
                hint = difflib.get_close_matches(str(key), PHASE_KEYS, n=1)
                tip = f"; did you mean {hint[0]!r}?" if hint else f"; allowed keys: {', '.join(PHASE_KEYS)}"
                problems.append(f"{where}: unknown key {key!r}{tip}")

        # params
        entries = body.get("params")
        resolved: list[str] = []
        if entries is None:
            problems.append(f"{where}: missing key 'params' (a list of parameter names or regexes)")
            entries = []
        elif isinstance(entries, str):
            problems.append(f"{where}, key 'params': expected a list, got the string {entries!r}; write [{entries}]")
            entries = []
        elif not isinstance(entries, (list, tuple)):
            problems.append(f"{where}, key 'params': expected a list of strings, got {type(entries).__name__}")
            entries = []
        elif not entries:
            problems.append(f"{where}, key 'params': the list is empty; every phase must thaw something")
        matched_here: set[str] = set()
        for entry in entries:
            if not isinstance(entry, str):
                problems.append(f"{where}, key 'params': entry {entry!r} is a {type(entry).__name__}, not a string")
                continue
            hits, problem, note = match_entry(entry, names, name_set)
            if problem:
                problems.append(f"{where}, key 'params': {problem}")
                continue
            loose = [n for n in hits if dot_hint(entry, n)] if note is None and entry not in name_set else []
            if loose:
                note = f"{quote(entry)} matches {few(loose)} too{dot_hint(entry, loose[0])}"
            if note:
                notes.append(f"{where}, key 'params': {note}")
            clashes: dict[tuple[int, str], list[str]] = {}
            for n in hits:
                if n in owner and owner[n] != idx:
                    clashes.setdefault((owner[n], owner_entry[n]), []).append(n)
                elif n not in owner:
                    owner[n] = idx
                    owner_entry[n] = entry
                matched_here.add(n)
            for (other, other_entry), clashing in clashes.items():
                count = f"{len(clashing)} parameters" if len(clashing) > 1 else "parameter"
                problems.append(
                    f"{where}, key 'params': {count} {few(clashing)} (matched by {quote(entry)}) already in phase "
                    f"{other} (matched by {quote(other_entry)}); a parameter may belong to one phase only"
                    + dot_hint(entry, clashing[0])
                    + dot_hint(other_entry, clashing[0])
                )
        resolved = [n for n in names if n in matched_here and owner.get(n) == idx]

        # lr
        lr = body.get("lr")
        if lr is not None:
            value = as_float(lr)
            if value is None or not math.isfinite(value) or value <= 0:
                problems.append(f"{where}, key 'lr': {lr!r} is not a positive number (e.g. lr: 1.0e-5)")
                lr = None
            elif idx == 0:
                problems.append(
                    f"{where}, key 'lr': phase 0 trains with the optimizer from configure_optimizers; "
                    "set its learning rate there and remove 'lr' from phase 0"
                )
                lr = None
            else:
                lr = value

        # max_transition_epoch, max_transition_step: absolute ends; whichever is reached first ends the phase
        mte = _cap(body, "max_transition_epoch", where, last_cap, idx, problems)
        mts = _cap(body, "max_transition_step", where, last_cap, idx, problems)
        if epoch_only and mte < 0 and mts < 0:
            problems.append(
                f"{where}: epoch_transitions_only=True needs 'max_transition_epoch' >= 1 or 'max_transition_step' "
                ">= 1 in every phase (where the phase ends; early stopping never ends one)"
            )

        new_opt = _parse_new_optimizer(body.get("new_optimizer"), where, idx, problems)
        new_lrs = _parse_new_lr_scheduler(body.get("new_lr_scheduler"), where, idx, problems)
        cache = parse_prefix_cache(body.get("prefix_cache"), where, names, set(owner), problems)
        phases.append(
            dict(
                index=idx,
                params=tuple(resolved),
                lr=lr,
                max_transition_epoch=mte,
                max_transition_step=mts,
                new_optimizer=new_opt,
                new_lr_scheduler=new_lrs,
                patterns=tuple(e for e in entries if isinstance(e, str)),
                prefix_cache=cache,
                merge_lora=specs.plain_data(body.get("merge_lora")),  # checked by phasetune.lora in the run
            )
        )
    return phases, problems, notes


def _cap(body: Mapping[str, Any], key: str, where: str, last: dict[str, tuple[int, int]], idx: int,
         problems: list[str]) -> int:
    """The phase's ``key`` (an absolute epoch or optimizer-step count, -1 when unset), checked against the
    previous phase that set it: each capped phase must end later than the last."""
    value = body.get(key, -1)
    if value is None:
        value = -1
    unit = _CAP_UNITS[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        problems.append(f"{where}, key '{key}': {value!r} is not an integer >= -1 (-1 leaves the phase's end to the "
                        f"other key or to early stopping)")
        return -1
    if value == 0:
        problems.append(f"{where}, key '{key}': 0 would end the phase before it trains; use the {unit} count at "
                        "which the next phase should start (>= 1)")
        return -1
    if value > 0:
        if key in last and value <= last[key][1]:
            prev, prev_value = last[key]
            problems.append(f"{where}, key '{key}': {value} is not after phase {prev}'s {prev_value}; {unit} counts "
                            "are absolute (since the start of the fit), so each capped phase must end later than the last")
        last[key] = (idx, value)
    return value


def as_float(value: Any) -> float | None:
    """``value`` as a float when it is a number or a numeric string (YAML 1.1 reads 1e-5 as one); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _parse_new_optimizer(raw: Any, where: str, idx: int, problems: list[str]) -> specs.ClassSpec | None:
    if raw is None:
        return None
    key = f"{where}, key 'new_optimizer'"
    if idx == 0:
        problems.append(f"{key}: phase 0 uses the optimizer from configure_optimizers; move this to phase 1 or later")
        return None
    if not isinstance(raw, Mapping) or "optimizer_init" not in raw:
        problems.append(f"{key}: expected a mapping with 'optimizer_init: {{class_path, init_args}}'")
        return None
    for k in raw:
        if k not in NEW_OPTIMIZER_KEYS:
            problems.append(f"{key}: unknown key {k!r}; allowed: {', '.join(NEW_OPTIMIZER_KEYS)}")
    try:
        spec = specs.parse_class_spec(raw["optimizer_init"], (specs.Optimizer,))
        specs.check_optimizer_spec(spec)
    except ValueError as e:
        problems.append(f"{key}, 'optimizer_init': {e}")
        return None
    if "params" in spec.init_args:
        problems.append(f"{key}, 'optimizer_init': init_args must not set 'params'; phasetune supplies them")
        return None
    return spec


def _parse_new_lr_scheduler(raw: Any, where: str, idx: int, problems: list[str]) -> specs.LRSchedulerSpec | None:
    if raw is None:
        return None
    key = f"{where}, key 'new_lr_scheduler'"  # in phase 0 it replaces the front end's scheduler from the start
    if not isinstance(raw, Mapping) or "lr_scheduler_init" not in raw:
        problems.append(f"{key}: expected a mapping with 'lr_scheduler_init: {{class_path, init_args}}'")
        return None
    ok = True
    for k in raw:
        if k not in NEW_LR_SCHEDULER_KEYS:
            hint = difflib.get_close_matches(str(k), NEW_LR_SCHEDULER_KEYS, n=1)
            problems.append(f"{key}: unknown key {k!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
            ok = False
    try:
        init = specs.parse_class_spec(raw["lr_scheduler_init"], specs.LR_SCHEDULER_BASES)
        specs.check_lr_scheduler_spec(init)
    except ValueError as e:
        problems.append(f"{key}, 'lr_scheduler_init': {e}")
        init, ok = None, False
    pl_cfg = raw.get("pl_lrs_cfg") or {}
    if not isinstance(pl_cfg, Mapping):
        problems.append(f"{key}, 'pl_lrs_cfg': expected a mapping of Lightning scheduler-config fields")
        pl_cfg, ok = {}, False
    for k, v in pl_cfg.items():
        if k not in specs.PL_LRS_CFG_KEYS:
            problems.append(f"{key}, 'pl_lrs_cfg': unknown field {k!r}; allowed: {', '.join(specs.PL_LRS_CFG_KEYS)}")
            ok = False
        elif k == "interval" and v not in ("epoch", "step"):
            problems.append(f"{key}, 'pl_lrs_cfg': interval must be 'epoch' or 'step', got {v!r}")
            ok = False
        elif k == "frequency" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            problems.append(f"{key}, 'pl_lrs_cfg': frequency must be an integer >= 1, got {v!r}")
            ok = False
    if init is not None and issubclass(specs.import_class(init.class_path, specs.LR_SCHEDULER_BASES),
                                       specs.lrs.ReduceLROnPlateau) and not pl_cfg.get("monitor"):
        problems.append(f"{key}: ReduceLROnPlateau needs the metric it watches: add pl_lrs_cfg: {{monitor: val_loss}}")
        ok = False
    init_pg_lrs = raw.get("init_pg_lrs")
    if init_pg_lrs is not None:
        values = [as_float(v) for v in init_pg_lrs] if isinstance(init_pg_lrs, (list, tuple)) else [None]
        if any(v is None or v <= 0 for v in values):
            problems.append(f"{key}, 'init_pg_lrs': expected a list of positive numbers, got {init_pg_lrs!r}")
            ok = False
        else:
            init_pg_lrs = tuple(values)  # type: ignore[arg-type]
    use_current = raw.get("use_current_optimizer_pg_lrs", False)
    if not isinstance(use_current, bool):
        problems.append(f"{key}, 'use_current_optimizer_pg_lrs': expected true or false, got {use_current!r}")
        ok = False
    if init_pg_lrs is not None and use_current:
        problems.append(f"{key}: set either 'init_pg_lrs' or 'use_current_optimizer_pg_lrs', not both")
        ok = False
    if not ok or init is None:
        return None
    return specs.LRSchedulerSpec(init, dict(pl_cfg), init_pg_lrs, bool(use_current))


def parse_prefix_cache(raw: Any, where: str, names: list[str], trained: set[str],
                       problems: list[str]) -> dict[str, Any] | None:
    """A phase's ``prefix_cache`` (``true``, ``false`` or a mapping of :data:`PREFIX_CACHE_KEYS`) as ``None``
    (off) or a dict of the keys given; checks what parameter names alone can tell (``trained``: the names
    phases 0..k train). The model-level checks are :class:`phasetune.features.prefix_cache.phases.PrefixCachePhases`'s."""
    key = f"{where}, key 'prefix_cache'"
    if raw is None or raw is False:
        return None
    out: dict[str, Any] = {}
    ok = True
    if isinstance(raw, Mapping):
        for k, v in raw.items():
            if k not in PREFIX_CACHE_KEYS:
                hint = difflib.get_close_matches(str(k), PREFIX_CACHE_KEYS, n=1)
                problems.append(f"{key}: unknown sub-key {k!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                                + f" (valid: {', '.join(PREFIX_CACHE_KEYS)})")
                ok = False
            elif k == "limit_mb" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                problems.append(f"{key}, 'limit_mb': {v!r} is not an integer >= 0 (megabytes kept in RAM; the rest "
                                "is spilled to memory-mapped files)")
                ok = False
            elif k == "deterministic_inputs" and not isinstance(v, bool):
                problems.append(f"{key}, 'deterministic_inputs': expected true or false, got {v!r}")
                ok = False
            elif k == "prefix_end" and (not isinstance(v, str) or not v.strip()):
                problems.append(f"{key}, 'prefix_end': expected a non-empty module name (as in "
                                f"model.named_modules()), got {v!r}; omit it to let phasetune find the prefix")
                ok = False
            else:
                out[k] = v
    elif raw is not True:
        problems.append(f"{key}: expected true, false or a mapping with {', '.join(PREFIX_CACHE_KEYS)}, "
                        f"got {type(raw).__name__} {raw!r}")
        return None
    if names and all(n in trained for n in names):
        problems.append(f"{key}: every parameter trains in this phase, so no frozen prefix is left to cache; "
                        "turn the prefix cache off for it")
        return None
    end = out.get("prefix_end")
    if end is not None:
        inside = [n for n in names if n.startswith(end + ".")]
        if not inside:
            close = difflib.get_close_matches(end, sorted({n.rsplit(".", 1)[0] for n in names}), n=1, cutoff=0.6)
            problems.append(f"{key}, 'prefix_end': {end!r} is not a module with parameters"
                            + (f"; did you mean {close[0]!r}?" if close else "; name a module from "
                               "model.named_modules() that holds parameters"))
            return None
        thawed = [n for n in inside if n in trained]
        if thawed:
            problems.append(f"{key}, 'prefix_end': the prefix up to {end!r} holds {few(thawed)}, which "
                            f"train{'s' if len(thawed) == 1 else ''} in this phase; end the prefix below them or "
                            "turn the cache off for this phase")
            return None
    return out if ok else None
