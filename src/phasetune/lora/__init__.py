"""Schedules over LoRA adapters: the ``peft`` section, injection before sharding, ``merge_lora`` at a
transition, and the checks that keep them exact and loud.

Torch only; ``peft`` is imported when adapters are injected (:func:`require_peft` says how to install it).
The order a run follows:

1. :func:`parse_peft_section` / :func:`parse_merge_lora`: the schedule's keys, problems collected.
2. :func:`adapter_targets`: which modules need adapters, from ``target_modules`` and the phases' entries.
3. :func:`inject_lora`: once, before any sharding; ``requires_grad`` of every existing parameter kept,
   new adapters frozen; the renames recorded for :func:`pre_injection_name_problems`.
4. :func:`unit_dtype_problems`: one dtype among each FSDP2 unit's trainable parameters, in every phase.
5. At a transition with ``merge_lora``: :func:`merge_targets`, :func:`merge_lora`,
   :func:`remove_from_optimizer`, :meth:`MergeRecord.add`.
6. On resume: :meth:`MergeRecord.from_state`, :func:`check_merge_record`, then at each replayed transition
   :func:`replay_merge` (no weight changes) and :func:`remove_from_optimizer`.
"""

from __future__ import annotations

from phasetune.lora.fsdp_checks import (
    check_not_sharded,
    fsdp2_units,
    plan_units,
    sharded_modules,
    trainable_by_phase,
    unit_dtype_problems,
)
from phasetune.lora.injection import InjectionRecord, inject_lora, require_peft
from phasetune.lora.layers import AdapterParams, adapter_params, is_lora_layer, lora_layers
from phasetune.lora.merge import MergeResult, merge_lora, merge_targets
from phasetune.lora.merge_record import MergeEntry, MergeRecord, check_merge_record, replay_merge
from phasetune.lora.names import pre_injection_name_problems
from phasetune.lora.optimizer import remove_from_optimizer
from phasetune.lora.recipes import LORA_RECIPES, lora_then_full, progressive_lora
from phasetune.lora.section import LoraSpec, MergeSpec, parse_merge_lora, parse_peft_section, peft_spec
from phasetune.lora.targets import adapter_targets, names_adapters

__all__ = [
    "LORA_RECIPES",
    "AdapterParams",
    "InjectionRecord",
    "LoraSpec",
    "MergeEntry",
    "MergeRecord",
    "MergeResult",
    "MergeSpec",
    "adapter_params",
    "adapter_targets",
    "check_merge_record",
    "check_not_sharded",
    "fsdp2_units",
    "inject_lora",
    "is_lora_layer",
    "lora_layers",
    "lora_then_full",
    "merge_lora",
    "merge_targets",
    "names_adapters",
    "parse_merge_lora",
    "parse_peft_section",
    "peft_spec",
    "plan_units",
    "pre_injection_name_problems",
    "progressive_lora",
    "remove_from_optimizer",
    "replay_merge",
    "require_peft",
    "sharded_modules",
    "trainable_by_phase",
    "unit_dtype_problems",
]
