"""LoRA schedules under the Hugging Face Trainer and Accelerate: adapters injected before the Trainer loads a
checkpoint or Accelerate wraps the model, the merge at a transition, and runs resumed around the merge that end
bit-equal to the uninterrupted ones; a ``PeftModel`` the user built keeps the base weights a phase trained (the
Trainer saves only its adapters) through phasetune's state."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers.utils import logging as hf_logging

import accelerate_runs
from distributed.hf_scenarios import Tokens, tiny_bert, training_args
from helpers import assert_bit_equal
from phasetune.hf import STATE_FILE, PhasetuneTrainer, PhasetuneTrainerCallback

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("plain_process")  # the Trainers run as one plain process
hf_logging.set_verbosity_error()

LAYER1 = r"bert\.encoder\.layer\.1\.attention\.self\.(query|value)"
#: adapters on every query/value; layer 1's (with the head) train first, are merged while its base weights train,
#: then layer 0's adapters train
HF_SCHEDULE = {
    "peft": {"method": "lora", "r": 2, "alpha": 4, "target_modules": [r".*\.(query|value)"]},
    0: {"params": ["classifier.*", LAYER1 + r"\.lora_.*"], "max_transition_epoch": 2},
    1: {"params": [LAYER1 + r"\.base_layer\..*"], "lr": 1e-3, "merge_lora": [LAYER1], "max_transition_epoch": 4},
    2: {"params": [r"bert\.encoder\.layer\.0\..*\.lora_.*"], "lr": 1e-3},
}
#: the same phases over a PeftModel built with peft's get_peft_model (its names, no peft section)
PEFT = "base_model\\.model\\."
PEFT_LAYER1 = PEFT + LAYER1
PEFT_SCHEDULE = {
    0: {"params": [PEFT + "classifier.*", PEFT_LAYER1 + r"\.lora_.*"], "max_transition_epoch": 2},
    1: {"params": [PEFT_LAYER1 + r"\.base_layer\..*"], "lr": 1e-3, "merge_lora": [PEFT_LAYER1],
        "max_transition_epoch": 4},
    2: {"params": [PEFT + r"bert\.encoder\.layer\.0\..*\.lora_.*"], "lr": 1e-3},
}


def peft_model() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_bert(), LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))


def hf_run(out, schedule, model_fn, resume=None):
    model = model_fn()
    ft = PhasetuneTrainerCallback(schedule, patience=10)
    t = PhasetuneTrainer(model=model, args=training_args(out), train_dataset=Tokens(32, 0),
                         eval_dataset=Tokens(16, 1), callbacks=[ft])
    t.train(resume_from_checkpoint=resume)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, ft


@pytest.fixture(scope="module", params=["injected", "peft_model"])
def uninterrupted(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    schedule, model_fn = (HF_SCHEDULE, tiny_bert) if request.param == "injected" else (PEFT_SCHEDULE, peft_model)
    params, ft = hf_run(out, schedule, model_fn)
    assert [(r.start_epoch, r.end_epoch) for r in ft.history] == [(0, 2), (2, 4), (4, 6)]
    return out, schedule, model_fn, params, ft


def test_the_trainer_merges_layer_1s_adapters_at_the_transition(uninterrupted):
    _, schedule, _, params, ft = uninterrupted
    assert [e["phase"] for e in ft.run.lora.record.to_state()] == [1]
    merged = [n for n in params if ".layer.1." in n and ".lora_B." in n]
    assert len(merged) == 2 and all(float(params[n].abs().max()) == 0.0 for n in merged)  # folded, never trained
    assert not any(".layer.1." in n and ".lora_" in n for n in ft.thawed_params)


@pytest.mark.parametrize("checkpoint", ["checkpoint-8", "checkpoint-12"])  # just before / just after the merge
def test_a_trainer_run_resumed_around_the_merge_ends_bit_equal(uninterrupted, tmp_path, checkpoint):
    out, schedule, model_fn, expected, _ = uninterrupted
    params, ft = hf_run(tmp_path, schedule, model_fn, resume=str(out / checkpoint))
    assert_bit_equal(params, expected)  # exact: same machine, same ops, same batches as the uninterrupted run
    assert len(ft.run.lora.record.entries) == 1


def test_a_peft_models_checkpoint_carries_the_base_weights_a_phase_trained(uninterrupted, tmp_path):
    out, schedule, model_fn, expected, _ = uninterrupted
    saved = torch.load(out / "checkpoint-12" / STATE_FILE, weights_only=True)
    if schedule is HF_SCHEDULE:  # the Trainer saves an injected model whole: nothing extra in phasetune's state
        assert "lora_base" not in saved
        return
    trained = {n for n in saved["lora_base"]}
    assert {PEFT.replace("\\", "") + "classifier.weight"} <= trained  # phase 0 trained it; the adapter file lacks it
    assert any(".layer.1.attention.self.query.base_layer.weight" in n for n in trained)  # phase 1 and the merge
    # without them the resumed run starts phase 2 from the pretrained classifier and unmerged base weights
    copy = tmp_path / "checkpoint-12"
    shutil.copytree(out / "checkpoint-12", copy)
    del saved["lora_base"]
    torch.save(saved, copy / STATE_FILE)
    params, _ = hf_run(tmp_path / "run", schedule, model_fn, resume=str(copy))
    name = PEFT.replace("\\", "") + "classifier.weight"
    assert not torch.equal(params[name], expected[name])  # exact: the lost weights change the result


#: the Lightning test's phases over loop_runs' model, by optimizer step, under Accelerate
ACCELERATE_SCHEDULE = {
    "peft": {"method": "lora", "r": 2, "alpha": 4},
    0: {"params": ["model.head.*", r"model\.layers\.3\.lin\.lora_.*"], "max_transition_step": 6},
    1: {"params": [r"model\.layers\.3\.lin\.base_layer\..*"], "lr": 0.05, "merge_lora": True,
        "max_transition_step": 10},
    2: {"params": [r"model\.layers\.2\..*"], "lr": 0.02},
}


@pytest.mark.parametrize("at", [6, 8])  # the merge transition's step, and inside the phase after it
def test_accelerate_resumed_around_the_merge_ends_bit_equal(tmp_path, at):
    module, ft, trajectory = accelerate_runs.step_run(ACCELERATE_SCHEDULE, save_at=at, save_dir=tmp_path)
    assert ft.run.lora.record.to_state()[0]["modules"] == ["model.layers.3.lin"]
    assert float(module.model.layers[3].lin.lora_B["default"].weight.abs().max()) == 0.0  # merged, then frozen
    resumed_module, resumed, resumed_trajectory = accelerate_runs.step_run(ACCELERATE_SCHEDULE, resume=tmp_path)
    assert resumed_trajectory == trajectory[at:]
    expected = {n: p.detach().clone() for n, p in module.named_parameters()}
    assert_bit_equal({n: p.detach().clone() for n, p in resumed_module.named_parameters()}, expected)  # exact
