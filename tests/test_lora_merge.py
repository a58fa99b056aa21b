"""merge_lora on one process: outputs kept, B zeroed and frozen, fp32 folding, the optimizer helper, restarts,
which layers a merge_lora names, and a checkpoint after a merge that resumes bit-equal with the merge record."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from phasetune.errors import ConfigurationError
from phasetune.lora import (
    LoraSpec,
    MergeRecord,
    MergeSpec,
    check_merge_record,
    inject_lora,
    merge_lora,
    merge_targets,
    remove_from_optimizer,
    replay_merge,
)
from phasetune.lora.layers import draw_lora_A

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_process")  # tiny models: one thread
MODULES = ["enc.0", "enc.2"]
ADAPTERS = [f"{m}.lora_{x}.default.weight" for m in MODULES for x in "AB"]


class Plain(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(6, 5, dtype=dtype), nn.Tanh(), nn.Linear(5, 6, dtype=dtype))
        self.head = nn.Linear(6, 2, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x))


def lora_model(dtype: torch.dtype = torch.float32, trained_b: bool = True) -> nn.Module:
    """The same model every call: LoRA (r=3, alpha=6: scaling 2) on both encoder layers, B random when asked."""
    torch.manual_seed(0)
    model = Plain(dtype)
    inject_lora(model, LoraSpec(r=3, alpha=6.0), MODULES, generator=torch.Generator().manual_seed(1))
    if trained_b:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for m in MODULES:
                b = model.get_submodule(m).lora_B["default"].weight
                b.copy_(0.1 * torch.randn(b.shape, generator=g))  # a trained B: small next to W
    return model


def inputs() -> torch.Tensor:
    return torch.randn(16, 6, generator=torch.Generator().manual_seed(3))


@pytest.mark.numerical
def test_merge_keeps_the_models_outputs():
    model = lora_model()
    before = model(inputs())
    merge_lora(model, MODULES)
    # numerical: (W + s B A) x vs W x + s B (A x) is one matmul reassociation in fp32: a few ulps of outputs < 1
    assert (model(inputs()) - before).abs().max() <= 1e-6


def test_merge_zeroes_B_freezes_the_adapter_and_returns_its_parameters():
    model = lora_model()
    for n in ADAPTERS:
        model.get_parameter(n).requires_grad_(True)
    result = merge_lora(model, MODULES)
    assert result.frozen == tuple(ADAPTERS)
    assert [id(p) for p in result.parameters] == [id(model.get_parameter(n)) for n in ADAPTERS]
    assert not any(model.get_parameter(n).requires_grad for n in ADAPTERS)
    assert all(not model.get_submodule(m).lora_B["default"].weight.any() for m in MODULES)
    assert not result.reinit


def test_bf16_base_weights_fold_in_fp32_and_round_once():
    model = lora_model(torch.bfloat16)  # adapters in float32 (the default adapter_dtype)
    layer = model.enc[0]
    w0, a, b = (t.detach().clone() for t in (layer.base_layer.weight, layer.lora_A["default"].weight,
                                             layer.lora_B["default"].weight))
    merge_lora(model, ["enc.0"])
    # exact: the same fp32 operations as the merge, then one cast to bfloat16
    assert torch.equal(layer.base_layer.weight, (w0.float() + 2.0 * (b @ a)).to(torch.bfloat16))


def test_remove_from_optimizer_drops_groups_entries_and_state():
    model = lora_model()
    adapters = [model.get_parameter(n) for n in ADAPTERS]
    head = list(model.head.parameters())
    for p in adapters:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": adapters}, {"params": head, "lr": 0.1}], lr=0.01)
    model(inputs()).sum().backward()
    opt.step()
    head_state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in head}
    assert remove_from_optimizer(opt, [*adapters[:2], nn.Parameter(torch.zeros(1))]) == []
    assert remove_from_optimizer(opt, adapters[2:]) == [0]
    assert opt.param_groups[0]["params"] == [] and opt.param_groups[1]["params"] == head
    assert set(map(id, opt.state)) == set(map(id, head))
    assert all(torch.equal(opt.state[p]["exp_avg"], head_state[id(p)]["exp_avg"]) for p in head)
    opt.step()  # an emptied group stays in place and steps over nothing
    opt.load_state_dict(opt.state_dict())


def test_a_restart_draws_fresh_adapters_and_keeps_the_merged_outputs():
    merged, restarted = lora_model(), lora_model()
    merge_lora(merged, MODULES)
    result = merge_lora(restarted, MODULES, reinit=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    for m in MODULES:
        a = restarted.get_submodule(m).lora_A["default"].weight
        assert torch.equal(a, draw_lora_A(a.shape, g))  # exact: the same draws in the same order
    assert result.reinit
    assert torch.equal(restarted(inputs()), merged(inputs()))  # exact: a fresh B = 0 adds exactly zero


def test_merge_targets_by_module_by_parameter_name_and_all():
    model = lora_model()
    assert merge_targets(model, MergeSpec(), "default", 1) == (MODULES, [])
    assert merge_targets(model, MergeSpec((r"enc\.2",)), "default", 1) == (["enc.2"], [])
    assert merge_targets(model, MergeSpec((r"enc\.0\.lora_A\..*",)), "default", 1) == (["enc.0"], [])


def test_a_merge_lora_naming_no_adapter_is_one_line_naming_it():
    model = lora_model()
    assert merge_targets(model, MergeSpec(("head",)), "default", 2) == ([], [
        "phase 2, key 'merge_lora': 'head' names no LoRA layer with adapter 'default'; the layers are 'enc.0', "
        "'enc.2' (a regex over whole module names)"])
    _, problems = merge_targets(Plain(), MergeSpec(), "default", 1)
    assert problems == ["phase 1, key 'merge_lora': the model has no LoRA adapter 'default' to merge; inject "
                        "adapters with a peft section (or name them in a phase) or remove merge_lora"]
    with pytest.raises(ConfigurationError) as e:
        merge_lora(model, ["head"])
    assert str(e.value) == "merge_lora: module 'head' holds no LoRA adapter 'default'; name a LoRA layer (e.g. 'enc.0')"


PHASE0 = ["head.weight", "head.bias", *ADAPTERS]
PHASE1 = ["enc.2.base_layer.weight", "enc.2.base_layer.bias"]


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def thaw(model: nn.Module, names: set[str]) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)


def run_to_checkpoint() -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    """Phase 0 (adapters + head) for 3 steps, the merge transition into phase 1 (enc.2's base weights), 2 steps."""
    model = lora_model(trained_b=False)
    thaw(model, set(PHASE0))
    opt = torch.optim.Adam([model.get_parameter(n) for n in PHASE0], lr=0.01)
    train(model, opt, range(3))
    record = MergeRecord()
    result = merge_lora(model, MODULES)
    remove_from_optimizer(opt, result.parameters)
    record.add(1, result)
    thaw(model, set(PHASE0 + PHASE1) - set(result.frozen))
    opt.add_param_group({"params": [model.get_parameter(n) for n in PHASE1], "lr": 0.005})
    train(model, opt, range(3, 5))
    ckpt = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()),
            "merges": json.dumps(record.to_state())}
    return model, opt, ckpt


def test_a_checkpoint_after_a_merge_resumes_bit_equal():
    model, opt, ckpt = run_to_checkpoint()
    train(model, opt, range(5, 8))

    fresh = lora_model(trained_b=False)  # a freshly injected model, as a resumed run builds it
    fresh.load_state_dict(ckpt["model"])
    record = MergeRecord.from_state(json.loads(ckpt["merges"]))
    assert check_merge_record(fresh, record, {1: MODULES}, phase=1) == []
    assert record.frozen_names(fresh) == set(ADAPTERS)
    thaw(fresh, set(PHASE0))  # replay phase 0, then the transition into phase 1 without folding again
    resumed = torch.optim.Adam([fresh.get_parameter(n) for n in PHASE0], lr=0.01)
    result = replay_merge(fresh, record.entries[0])
    remove_from_optimizer(resumed, result.parameters)
    thaw(fresh, set(PHASE0 + PHASE1) - set(result.frozen))
    resumed.add_param_group({"params": [fresh.get_parameter(n) for n in PHASE1], "lr": 0.005})
    resumed.load_state_dict(ckpt["optimizer"])
    train(fresh, resumed, range(5, 8))
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n  # exact: same machine, same operations, same batches


def test_a_checkpoint_from_peft_merge_or_before_the_merge_is_flagged():
    model = lora_model()
    model.enc[0].merge()  # peft's own merge: W changes, B stays, the "merged" flag is not in the state dict
    assert not any("merge" in k for k in model.state_dict())
    fresh = lora_model(trained_b=False)
    fresh.load_state_dict(model.state_dict())
    record = MergeRecord.from_state([{"phase": 1, "adapter": "default", "modules": ["enc.0"], "reinit": False}])
    assert check_merge_record(fresh, record, {1: ["enc.0"]}, phase=1) == [
        "parameter 'enc.0.lora_B.default.weight' is not zero though the adapter was merged into its base weight at "
        "phase 1: the checkpoint's weights are from before that merge (or from peft's merge()), and its delta "
        "would count twice"]


def test_a_record_that_disagrees_with_the_schedule_is_flagged():
    model = lora_model()
    merge_lora(model, MODULES)
    record = MergeRecord.from_state([{"phase": 1, "adapter": "default", "modules": ["enc.0"]},
                                     {"phase": 3, "adapter": "default", "modules": ["enc.2"]}])
    problems = check_merge_record(model, record, {1: MODULES, 2: ["enc.2"]}, phase=2)
    assert problems == [
        "merge record: a merge at the transition into phase 3, but the checkpoint resumes in phase 2; the record "
        "and the checkpoint come from different runs",
        "phase 1, key 'merge_lora': the schedule merges 'enc.0', 'enc.2' but the checkpoint merged 'enc.0'; resume "
        "with the schedule it was written under",
        "phase 2, key 'merge_lora': the checkpoint is past this merge (phase 2) but phasetune's state records none; "
        "it was written under another schedule: resume with that schedule or start over",
    ]


@pytest.mark.numerical
def test_a_peft_lora_bias_is_folded_into_the_base_bias():
    torch.manual_seed(0)
    model = Plain()
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["enc.0"], lora_bias=True), model)
    with torch.no_grad():
        model.enc[0].lora_B["default"].weight.normal_(0, 0.1)
        model.enc[0].lora_B["default"].bias.normal_(0, 0.1)
    before = model(inputs())
    result = merge_lora(model, ["enc.0"])
    assert result.frozen[-1] == "enc.0.lora_B.default.bias"
    assert not model.enc[0].lora_B["default"].bias.any()
    # numerical: one matmul reassociation in fp32, outputs below 1
    assert (model(inputs()) - before).abs().max() <= 1e-6


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")  # peft on Conv1D
def test_a_transposed_conv1d_layer_is_refused_before_anything_changes():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), conv1d(4, 4))
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["0", "1"]), model)
    with torch.no_grad():
        model[0].lora_B["default"].weight.fill_(0.5)  # a merge of layer 0 would change its weight
    w0 = model[0].base_layer.weight.clone()
    with pytest.raises(ConfigurationError, match=r"^merge_lora: module '1' stores its weight transposed"):
        merge_lora(model, ["0", "1"])
    assert torch.equal(model[0].base_layer.weight, w0)  # exact: the checks come before any merge
