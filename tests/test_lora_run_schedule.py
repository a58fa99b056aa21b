"""The schedule keeps a ``peft`` section and per-phase ``merge_lora`` keys: parsed, fingerprinted, dumped back."""

from __future__ import annotations

import pytest
import yaml

from phasetune.core.schedule import diff_fingerprints, resolve_schedule
from phasetune.errors import ScheduleError

NAMES = ["enc.0.lora_A.default.weight", "enc.0.lora_B.default.weight", "enc.0.base_layer.weight", "head.weight"]
PEFT = {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["enc\\.0"]}


def schedule(peft=PEFT, merge=True):
    raw = {0: {"params": ["head.weight", "enc\\.0\\.lora_.*"]}, 1: {"params": ["enc.0.base_layer.weight"]}}
    if peft is not None:
        raw["peft"] = peft
    if merge is not None:
        raw[1]["merge_lora"] = merge
    return raw


def test_peft_section_and_merge_lora_are_kept_on_the_schedule():
    s = resolve_schedule(schedule(), NAMES)
    assert s.peft == PEFT
    assert s[1].merge_lora is True and s[0].merge_lora is None
    assert len(s) == 2


def test_dump_writes_the_peft_section_and_merge_lora_back(tmp_path):
    raw = schedule(merge={"modules": ["enc\\.0"], "reinit": True, "seed": 3})
    path = resolve_schedule(raw, NAMES).dump(tmp_path / "s.yaml", resolved=False)
    again = yaml.safe_load(path.read_text())
    assert again["peft"] == PEFT
    assert again[1]["merge_lora"] == {"modules": ["enc\\.0"], "reinit": True, "seed": 3}
    assert resolve_schedule(again, NAMES).fingerprint() == resolve_schedule(raw, NAMES).fingerprint()


@pytest.mark.parametrize("change", [
    {"peft": {**PEFT, "r": 8}}, {"peft": None}, {"merge": None}, {"merge": ["enc\\.0"]},
])
def test_a_different_peft_section_or_merge_blocks_a_resume(change):
    saved = resolve_schedule(schedule(), NAMES).fingerprint()
    blocking, _ = diff_fingerprints(saved, resolve_schedule(schedule(**change), NAMES).fingerprint())
    assert blocking, change
    assert any("peft" in b or "merge_lora" in b for b in blocking)


def test_a_fingerprint_from_before_the_lora_keys_matches_a_schedule_without_them():
    current = resolve_schedule(schedule(peft=None, merge=None), NAMES).fingerprint()
    old = {**current, "phases": [{k: v for k, v in p.items() if k != "merge_lora"} for p in current["phases"]]}
    del old["peft"]
    assert diff_fingerprints(old, current) == ([], [])


def test_misspelt_merge_lora_and_peft_keys_get_did_you_mean():
    raw = schedule(merge=None)
    raw[1]["merge_lroa"] = True
    raw["pfet"] = raw.pop("peft")
    with pytest.raises(ScheduleError) as e:
        resolve_schedule(raw, NAMES)
    text = str(e.value)
    assert "unknown key 'merge_lroa'; did you mean 'merge_lora'?" in text
    assert "phase key 'pfet'" in text and "did you mean the 'peft' section?" in text


def test_a_schedule_with_only_a_peft_section_is_empty():
    with pytest.raises(ScheduleError, match="the schedule is empty"):
        resolve_schedule({"peft": PEFT}, NAMES)


def test_schedule_generate_offers_the_lora_recipes_as_schedules_a_run_accepts(tmp_path):
    import torch

    from helpers import ToyModule
    from phasetune.loop import ScheduledFinetuning
    from test_cli import run, write_config

    pytest.importorskip("peft")
    out_file = tmp_path / "lora.yaml"
    assert run("schedule", "generate", "--config", write_config(tmp_path), "--recipe", "lora_then_full",
               "--rank", "2", "--alpha", "4", "--lr", "0.01", "--output", out_file) == 0
    raw = yaml.safe_load(out_file.read_text())
    assert raw["peft"]["r"] == 2 and raw[1]["merge_lora"] is True
    torch.manual_seed(0)
    module = ToyModule()
    ft = ScheduledFinetuning(raw, module, torch.optim.SGD(module.parameters(), lr=0.1))
    assert ft.run.lora is not None and len(ft.run.lora.merges[1][1]) == 4  # every block's linear layer
