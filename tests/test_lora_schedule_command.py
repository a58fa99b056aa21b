"""``phasetune schedule check`` / ``show`` on schedules with a ``peft`` section: the adapters are injected into the
model the command builds (as a run does before training), so phases are checked by their post-injection names."""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("peft")

from distributed.hf_scenarios import tiny_bert
from test_cli import run, write_config

LAYER_1_KEY = "bert.encoder.layer.1.attention.self.key"


@pytest.fixture
def bert_folder(tmp_path):
    folder = tmp_path / "bert"
    tiny_bert().save_pretrained(folder)
    return folder


def test_a_generated_progressive_lora_schedule_checks_on_the_injected_model(tmp_path, bert_folder, capsys):
    out = tmp_path / "lora.yaml"
    assert run("schedule", "generate", "--model-dir", bert_folder, "--recipe", "progressive_lora", "--rank", "4",
               "--steps", "20", "-o", out) == 0
    assert run("schedule", "check", out, "--model-dir", bert_folder) == 0
    printed = capsys.readouterr().out
    assert "note: LoRA adapter 'default' injected into 12 modules" in printed  # 6 linear layers in each of 2 blocks
    assert "OK, 2 phases for BertForSequenceClassification" in printed


def test_show_counts_the_adapters_each_phase_thaws(tmp_path, bert_folder, capsys):
    schedule = tmp_path / "lora.yaml"
    schedule.write_text(yaml.safe_dump({
        "peft": {"r": 4, "target_modules": [r".*\.(query|value)"]},
        0: {"params": [r"classifier\..*", r"bert\.encoder\.layer\.1\..*\.(query|value)\.lora_[AB]\..*"]},
        1: {"params": [r"bert\.encoder\.layer\.0\..*\.(query|value)\.lora_[AB]\..*"], "lr": 1e-3}}))
    assert run("schedule", "show", schedule, "--model-dir", bert_folder) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("phase ")))
    rows = [line.split() for line in lines[header + 2: header + 4]]
    # phase 0: the head (32x2 + 2) and layer 1's query and value adapters (A 4x32 + B 32x4, twice): 66 + 512
    assert rows[0][:3] == ["0", "578", "(6)"]
    assert rows[1][:3] == ["1", "512", "(4)"]  # layer 0's two adapters


def test_show_says_which_phase_merges_the_adapters(tmp_path, bert_folder, capsys):
    out = tmp_path / "lora.yaml"
    assert run("schedule", "generate", "--model-dir", bert_folder, "--recipe", "lora_then_full", "--steps", "20",
               "-o", out) == 0
    assert run("schedule", "show", out, "--model-dir", bert_folder) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line[:1] in ("0", "1")]
    assert "merges LoRA" not in rows[0]
    assert "merges LoRA, then bert.encoder.layer.1" in rows[1]  # the top block's base weights after the merge


def test_a_name_from_before_injection_is_refused_with_the_new_name(tmp_path, bert_folder, capsys):
    schedule = tmp_path / "lora.yaml"
    schedule.write_text(yaml.safe_dump({
        "peft": {"r": 4, "target_modules": [r".*\.(query|key|value)"]},
        0: {"params": [r"classifier\..*", r".*\.lora_[AB]\..*"]},
        1: {"params": [f"{LAYER_1_KEY}.weight"], "lr": 1e-3}}))
    assert run("schedule", "check", schedule, "--model-dir", bert_folder) == 1
    err = capsys.readouterr().err
    assert (f"phase 1, key 'params': '{LAYER_1_KEY}.weight' is the name from before LoRA injection; did you mean "
            f"'{LAYER_1_KEY}.base_layer.weight'?") in err


def test_a_config_schedule_with_a_peft_section_checks_under_the_lightning_module_names(tmp_path, capsys):
    cfg = write_config(tmp_path, schedule={
        "peft": {"r": 2, "target_modules": [r"model\.layers\.\d\.lin"]},
        0: {"params": [r"model\.head\..*", r"model\.layers\.3\.lin\.lora_[AB]\..*"], "max_transition_epoch": 1},
        1: {"params": [r"model\.layers\.[0-2]\.lin\.lora_[AB]\..*"], "lr": 0.05}})
    assert run("schedule", "check", "--config", cfg) == 0
    printed = capsys.readouterr().out
    assert "injected into 4 modules ('model.layers.0.lin', 'model.layers.1.lin', 'model.layers.2.lin' and 1 more)" in printed
    assert "OK, 2 phases for ToyWithTest" in printed
