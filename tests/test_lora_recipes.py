"""The LoRA recipes write ordinary raw schedules: a peft section, phases naming adapters (and base weights) by their
post-injection names, merge_lora where used; on a model they resolve with every parameter in one phase."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from phasetune.core.generate import block_units
from phasetune.core.schedule import resolve_schedule
from phasetune.lora import (
    LoraSpec,
    MergeSpec,
    adapter_targets,
    inject_lora,
    lora_then_full,
    parse_merge_lora,
    parse_peft_section,
    progressive_lora,
)

UNITS = [["head\\..*"], ["blocks\\.2\\..*"], ["blocks\\.1\\..*"], ["blocks\\.0\\..*"], ["embed\\..*"]]


class Stack(nn.Module):
    """An embedding, three blocks of two linear layers, and a head: what block_units sees in a transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)) for _ in range(3))
        self.head = nn.Linear(4, 2)


def adapters(block: int) -> str:
    return f"blocks\\.{block}\\.(?:.*\\.)?lora_[AB]\\.default\\..*"


def test_progressive_lora_puts_adapters_on_the_top_blocks_first():
    raw = progressive_lora(UNITS, r=4, alpha=8, lr=1e-3, lr_decay=0.5)
    assert raw == {
        "peft": {"method": "lora", "r": 4, "alpha": 8.0},
        0: {"params": ["head\\..*", adapters(2)]},
        1: {"params": [adapters(1)], "lr": 1e-3},
        2: {"params": [adapters(0)], "lr": 5e-4},
    }
    assert parse_peft_section(raw["peft"]) == (LoraSpec(r=4, alpha=8.0), [])


def test_progressive_lora_groups_blocks_and_restricts_leaves():
    raw = progressive_lora(UNITS, blocks_per_phase=2, leaf="0|2", phase_steps=[4, 6])
    leafy = "blocks\\.{}\\.(?:.*\\.)?(?:0|2)\\.lora_[AB]\\.default\\..*"
    assert raw[0]["params"] == ["head\\..*", leafy.format(2), leafy.format(1)]
    assert raw[1]["params"] == [leafy.format(0)]
    assert raw[0]["max_transition_step"] == 4 and raw[1]["max_transition_step"] == 10
    assert raw[1]["new_lr_scheduler"]["lr_scheduler_init"]["init_args"] == {"total_steps": 6, "warmup_steps": 1}


def test_lora_then_full_merges_every_adapter_then_trains_the_top_base_weights():
    raw = lora_then_full(UNITS, full_blocks=2, lr=2e-5, adapter_dtype="base")
    assert raw["peft"] == {"method": "lora", "r": 8, "alpha": 8.0, "adapter_dtype": "base"}
    assert raw[0] == {"params": ["head\\..*", adapters(2), adapters(1), adapters(0)]}
    assert raw[1] == {"params": ["blocks\\.2\\.(?!(?:.*\\.)?lora_[AB]\\.).*", "blocks\\.1\\.(?!(?:.*\\.)?lora_[AB]\\.).*"],
                      "merge_lora": True, "lr": 2e-5}
    assert parse_merge_lora(raw[1]["merge_lora"], 1, []) == MergeSpec()


@pytest.mark.parametrize("recipe", [progressive_lora, lora_then_full])
def test_a_recipe_resolves_on_the_injected_model_with_each_parameter_in_one_phase(recipe):
    pytest.importorskip("peft")
    torch.manual_seed(0)
    model = Stack()
    units, has_stem = block_units(model)
    raw = recipe(units, has_stem=has_stem, r=2)
    spec, _ = parse_peft_section(raw["peft"])
    phases = {k: v["params"] for k, v in raw.items() if k != "peft"}
    modules, problems = adapter_targets(model, spec, phases)
    assert problems == []
    assert modules == [f"blocks.{b}.{i}" for b in range(3) for i in (0, 2)]
    inject_lora(model, spec, modules)
    names = [n for n, _ in model.named_parameters()]
    schedule = resolve_schedule({k: {"params": v} for k, v in phases.items()}, names)
    owned = [n for phase in schedule.phases for n in phase.params]
    assert len(owned) == len(set(owned))
    assert {n for n in names if ".lora_" in n} <= set(owned)
    assert not any(n.startswith("embed.") for n in owned)  # the stem has no adapter and stays frozen


def test_recipe_options_are_checked_together():
    with pytest.raises(ValueError) as e:
        progressive_lora(UNITS, r=0, lr=-1, lr_decay=2, blocks_per_phase=0, leaf="(", phase_stepz=3)
    message = str(e.value)
    for needle in ("unknown option 'phase_stepz'", "lr must be a positive number", "leaf must be a regex",
                   "lr_decay must be a number in (0, 1]", "blocks_per_phase must be an integer >= 1",
                   "option 'r': 0 is not an integer >= 1"):
        assert needle in message
    with pytest.raises(ValueError, match="full_blocks is 4 but the model has 3 blocks"):
        lora_then_full(UNITS, full_blocks=4)
    with pytest.raises(ValueError, match="no repeated blocks"):
        lora_then_full([["head\\..*"], ["embed\\..*"]])
