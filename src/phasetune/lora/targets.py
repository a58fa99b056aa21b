"""Which modules get a LoRA adapter: those the ``peft`` section's ``target_modules`` match, and those whose
adapter parameters a phase names (an entry that mentions ``lora_``, e.g. ``layer\\.5\\..*\\.lora_[AB]\\..*``).

Decided on the model before injection, from the schedule's raw ``params`` entries, so that injection can
happen once, before any sharding, for every adapter the run will ever train.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import nn

from phasetune.lora.layers import (
    SUPPORTED_TYPES,
    hypothetical_adapter_names,
    inside_lora_layer,
    is_lora_layer,
    lora_layers,
)
from phasetune.lora.section import LoraSpec
from phasetune.util.text import few

#: a phase entry that mentions this names adapter parameters
ADAPTER_MARK = "lora_"


def names_adapters(entry: str) -> bool:
    """Whether a phase's ``params`` entry names LoRA adapter parameters: it mentions ``lora_`` outside a
    negative lookahead (``block\\.(?!(?:.*\\.)?lora_[AB]\\.).*`` names a block's base weights, not its adapters)."""
    return ADAPTER_MARK in _without_negative_lookaheads(entry)


def _without_negative_lookaheads(entry: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(entry):
        if entry.startswith("(?!", i) and (i == 0 or entry[i - 1] != "\\"):
            depth, i = 1, i + 3
            while i < len(entry) and depth:
                if entry[i] == "\\":
                    i += 2
                    continue
                depth += {"(": 1, ")": -1}.get(entry[i], 0)
                i += 1
            continue
        out.append(entry[i])
        i += 1
    return "".join(out)


def adapter_targets(model: nn.Module, spec: LoraSpec | None,
                    phase_params: Mapping[int, Sequence[str]]) -> tuple[list[str], list[str]]:
    """``(modules, problems)``: the modules of ``model`` that need a new adapter, in registration order.

    ``phase_params`` maps each phase to its raw ``params`` entries (names or regexes over the names the
    model will have after injection). An entry that matches adapters the model already has (a
    ``PeftModel`` the user built) means those and asks for nothing new; one that matches none asks for an
    adapter on every nn.Linear whose adapter names it would match. Without a ``peft`` section
    (``spec=None``) nothing is injected, and an entry asking for new adapters is a problem.
    """
    adapter = spec.adapter_name if spec else "default"
    problems: list[str] = []
    all_layers = {n for n, m in model.named_modules() if is_lora_layer(m)}
    have = set(lora_layers(model, adapter))
    modules = dict(model.named_modules())
    candidates = [n for n, m in modules.items()
                  if isinstance(m, SUPPORTED_TYPES) and n not in all_layers and not inside_lora_layer(n, all_layers)]
    chosen: set[str] = set()
    if spec is not None:
        for entry in spec.target_modules:
            chosen |= _by_target(entry, modules, candidates, have, all_layers, problems)
    wanted_by_phase: dict[str, int] = {}
    for phase, entries in phase_params.items():
        for entry in entries:
            if not isinstance(entry, str) or not names_adapters(entry):
                continue
            try:
                pattern = re.compile(entry)
            except re.error:
                continue  # the schedule validation reports invalid regexes
            # an entry that names adapters the model has means those; one that names none asks for new ones
            hits = [n for n in have if _names(pattern, n, adapter)] or [
                n for n in candidates if _names(pattern, n, adapter)]
            if not hits:
                problems.append(_no_adapter_problem(phase, entry, adapter, candidates, have))
            for n in hits:
                wanted_by_phase.setdefault(n, phase)
    chosen |= {n for n in wanted_by_phase if n not in have}
    if spec is None and chosen:
        missing = [n for n in candidates if n in chosen]
        phases = sorted({wanted_by_phase[n] for n in missing if n in wanted_by_phase})
        where = f"phase {phases[0]}" if len(phases) == 1 else f"phases {', '.join(map(str, phases))}"
        problems.append(f"{where} {'names' if len(phases) == 1 else 'name'} LoRA adapters of {few(missing)}, which have "
                        f"no adapter {adapter!r}; add a peft section (peft: {{method: lora, r: 8, alpha: 16}}) "
                        "so phasetune injects them, or name only the adapters the model has")
        chosen = set()
    if spec is not None and not spec.target_modules and not wanted_by_phase:
        problems.append("peft section: no module gets an adapter; set 'target_modules' (a regex over module names, "
                        "e.g. '.*\\.(query|value)') or name adapter parameters in a phase "
                        "(e.g. '.*\\.lora_[AB]\\..*')")
    return [n for n in candidates if n in chosen], problems


def _names(pattern: re.Pattern[str], module: str, adapter: str) -> bool:
    """Whether ``pattern`` names one of ``module``'s adapter parameters (as a whole or, as in FTS, a prefix)."""
    return any(pattern.fullmatch(n) or pattern.match(n) for n in hypothetical_adapter_names(module, adapter))


def _by_target(entry: str, modules: dict[str, nn.Module], candidates: list[str], have: set[str],
               all_layers: set[str], problems: list[str]) -> set[str]:
    where = "peft section, key 'target_modules'"
    pattern = re.compile(entry)
    hits = [n for n in modules if n and pattern.fullmatch(n) and not inside_lora_layer(n, all_layers)]
    allowed = set(candidates) | have
    supported = [n for n in hits if n in allowed]
    if supported:
        return {n for n in supported if n not in have}
    if hits:
        kinds = sorted({type(modules[n]).__name__ for n in hits})
        problems.append(f"{where}: '{entry}' matches {few(hits)} ({', '.join(kinds)}), none of them an nn.Linear; "
                        "phasetune injects LoRA into nn.Linear modules only, so match the linear layers inside "
                        f"(e.g. '{entry}\\..*')")
        return set()
    loose = re.compile(r".*\." + entry) if not entry.startswith(".*") else None
    near = [n for n in candidates if loose and loose.fullmatch(n)]
    tip = (f"; did you mean '.*\\.{entry}' ({len(near)} modules, e.g. {near[0]!r})?" if near
           else "; check the names with model.named_modules()")
    problems.append(f"{where}: '{entry}' matches no module name as a whole{tip}")
    return set()


def _no_adapter_problem(phase: int, entry: str, adapter: str, candidates: list[str], have: set[str]) -> str:
    where = f"phase {phase}, key 'params'"
    example = hypothetical_adapter_names(next(iter([*sorted(have), *candidates]), "layer"), adapter)[0]
    named = re.search(r"lora_(?:A|B|\[AB\])\\?\.(\w+)", entry)
    tip = (f" (it names adapter {named.group(1)!r}; the schedule's adapter is {adapter!r})"
           if named and named.group(1) != adapter else "")
    return (f"{where}: '{entry}' names LoRA parameters but matches no adapter of an nn.Linear module{tip}; "
            f"adapter parameters are named '<module>.lora_A.{adapter}.weight' and '<module>.lora_B.{adapter}.weight' "
            f"(e.g. {example!r})")
