"""The schedule's ``peft`` section and the ``merge_lora`` phase key: parsed values, and every problem named."""

from __future__ import annotations

import importlib
import sys

import pytest

import phasetune.lora
from phasetune.errors import ConfigurationError, ScheduleError
from phasetune.lora import LoraSpec, MergeSpec, parse_merge_lora, parse_peft_section, peft_spec


def test_phasetune_lora_imports_without_peft_and_asks_for_it_when_needed(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    for name in [m for m in sys.modules if m.startswith("phasetune.lora")]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh below, the originals put back after the test
    monkeypatch.setattr(phasetune, "lora", phasetune.lora)
    lora = importlib.import_module("phasetune.lora")
    with pytest.raises(ConfigurationError, match=r"needs the peft package: pip install peft$"):
        lora.require_peft()


def test_a_full_section_becomes_a_spec():
    spec, problems = parse_peft_section({"method": "lora", "rank": 4, "alpha": 16, "dropout": 0.1,
                                         "target_modules": ".*\\.query", "adapter_dtype": "base",
                                         "adapter_name": "task"})
    assert problems == []
    assert spec == LoraSpec(r=4, alpha=16.0, dropout=0.1, target_modules=(".*\\.query",), adapter_dtype="base",
                            adapter_name="task")
    assert spec.scaling == 4.0


def test_an_empty_section_takes_peft_defaults_and_an_absent_one_is_none():
    assert parse_peft_section({}) == (LoraSpec(), [])
    assert LoraSpec().r == 8 and LoraSpec().scaling == 1.0
    assert parse_peft_section(None) == (None, [])


def test_every_bad_key_is_reported_at_once_naming_the_key():
    _, problems = parse_peft_section({"method": "ia3", "r": 0, "rank": 2, "alpha": -1, "dropout": 1.5,
                                      "target_modules": ["(", 3], "adapter_dtype": "fp32", "adapter_name": "a.b",
                                      "targets": "x"})
    joined = "\n".join(problems)
    assert len(problems) == 10, joined
    for needle in ("key 'method': 'ia3' is not supported; write method: lora", "either 'r' or 'rank'",
                   "key 'r': 0 is not an integer >= 1", "key 'alpha': -1", "key 'dropout': 1.5",
                   "'(' is not a valid regex", "entry 3 is not a non-empty string",
                   "key 'adapter_dtype': 'fp32' is not one of", "key 'adapter_name': 'a.b'",
                   "unknown key 'targets'; did you mean 'target_modules'?"):
        assert needle in joined


def test_peft_spec_raises_one_schedule_error_listing_every_problem():
    with pytest.raises(ScheduleError) as e:
        peft_spec({"r": "eight", "alpha": 0})
    assert len(e.value.problems) == 2
    assert "2 problems" in str(e.value)


def test_a_section_that_is_not_a_mapping_says_what_to_write():
    _, problems = parse_peft_section("lora")
    assert problems == ["peft section: expected a mapping such as {method: lora, r: 8, alpha: 16}, got str 'lora'"]


def test_spec_round_trips_through_its_raw_form():
    spec = LoraSpec(r=4, alpha=8.0, dropout=0.05, target_modules=("a",), adapter_dtype="bfloat16", adapter_name="t")
    assert parse_peft_section(spec.to_raw()) == (spec, [])


@pytest.mark.parametrize(("raw", "expected"), [
    (True, MergeSpec()),
    ("all", MergeSpec()),
    (["layer\\.0\\..*"], MergeSpec(("layer\\.0\\..*",))),
    ({"modules": "all", "reinit": True, "seed": 7}, MergeSpec(None, True, 7)),
    ({"modules": ["a"], "reinit": True}, MergeSpec(("a",), True, None)),
])
def test_merge_lora_forms(raw, expected):
    problems: list[str] = []
    assert parse_merge_lora(raw, 2, problems) == expected
    assert problems == []
    assert parse_merge_lora(expected.to_raw(), 2, []) == expected


def test_merge_lora_problems_name_the_phase_and_key():
    problems: list[str] = []
    assert parse_merge_lora(True, 0, problems) is None
    assert parse_merge_lora({"modules": ["("], "reinit": "yes", "sed": 1}, 3, problems) is None
    assert parse_merge_lora({"seed": 4}, 2, problems) == MergeSpec(None, False, 4)
    assert problems[0].startswith("phase 0, key 'merge_lora': a merge happens at a transition")
    assert "phase 3, key 'merge_lora': unknown sub-key 'sed'; did you mean 'seed'?" in problems[1]
    assert "phase 3, key 'merge_lora', 'reinit': expected true or false" in problems[2]
    assert "'(' is not a valid regex" in problems[3]
    assert "a seed only matters with reinit: true" in problems[4]
    assert parse_merge_lora(None, 1, problems) is None and parse_merge_lora(False, 1, problems) is None
    assert len(problems) == 5
