"""LoRA under FSDP2: the per-unit dtype check on one process, and one 2-process gloo launch
(tests/distributed/lora_scenarios.py) for the sharded merge, the merge record, injecting after sharding and
the check against FSDP2's own dtype failure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distributed.lora_scenarios import MODULES, Net, add_lora
from launch import launch
from phasetune.lora import LoraSpec, inject_lora, plan_units, trainable_by_phase, unit_dtype_problems

pytest.importorskip("peft")


def bf16_model(adapter_dtype: str) -> tuple[nn.Module, dict[str, tuple[str, ...]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)).to(torch.bfloat16)
    record = inject_lora(model, LoraSpec(r=2, adapter_dtype=adapter_dtype), ["0", "1"])
    return model, record.adapters


def test_fp32_adapters_beside_trained_bf16_weights_in_one_unit_are_one_line_naming_the_unit():
    model, adapters = bf16_model("float32")
    phases = [[*adapters["0"], "2.weight"], ["1.base_layer.weight"]]
    problems = unit_dtype_problems(model, plan_units(model, ["1"]), trainable_by_phase(phases))
    assert problems == [
        "FSDP2 unit '<root>' would train parameters of 2 dtypes from phase 0 on (float32: '0.lora_A.default.weight', "
        "'0.lora_B.default.weight'; bfloat16: '2.weight'); FSDP2 needs one dtype among a unit's trainable parameters: "
        "set adapter_dtype: base in the peft section (adapters in their base weight's dtype, bfloat16), or shard the "
        "adapters as units of their own (fsdp_plan entries for the '<module>.lora_A' and '<module>.lora_B' modules)"]


def test_adapters_in_the_base_dtype_or_in_their_own_units_fit():
    model, adapters = bf16_model("base")
    phases = [[*adapters["0"], "2.weight"]]
    assert unit_dtype_problems(model, plan_units(model, ["1"]), trainable_by_phase(phases)) == []
    model, adapters = bf16_model("float32")
    phases = [[*adapters["0"], "2.weight"]]
    units = plan_units(model, ["0.lora_A", "0.lora_B", "1"])
    assert unit_dtype_problems(model, units, trainable_by_phase(phases)) == []


def test_adapters_merged_before_their_base_weights_thaw_never_mix():
    model, adapters = bf16_model("float32")
    phases = [list(adapters["0"]), ["0.base_layer.weight"]]
    trainable = trainable_by_phase(phases, {1: adapters["0"]})
    assert trainable == [set(adapters["0"]), {"0.base_layer.weight"}]
    assert unit_dtype_problems(model, plan_units(model, []), trainable) == []


def test_the_ranks_stand_in_lora_layer_is_pefts_layer():
    torch.manual_seed(0)
    ours = Net()
    add_lora(ours, MODULES, 4, 8.0, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    theirs = Net()
    inject_lora(theirs, LoraSpec(r=4, alpha=8.0), MODULES, generator=torch.Generator().manual_seed(1))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in MODULES:
            b = torch.randn(ours.get_submodule(m).lora_B["default"].weight.shape, generator=g)
            ours.get_submodule(m).lora_B["default"].weight.copy_(b)
            theirs.get_submodule(m).lora_B["default"].weight.copy_(b)
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(p, q) and p.requires_grad == q.requires_grad, n  # exact: same draws
    x = torch.randn(3, 7, generator=g)
    assert torch.equal(ours(x), theirs(x))  # exact: the same operations in the same order
    assert all(ours.get_submodule(m).scaling == theirs.get_submodule(m).scaling for m in MODULES)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch("lora_scenarios.py", tmp_path_factory.mktemp("lora"))


@pytest.mark.numerical
@pytest.mark.launched
def test_each_rank_folds_its_own_rows_like_one_process(ranks):
    for rank in ranks:
        merge = rank["merge"]
        # numerical: each rank multiplies only its rows of B by the gathered A; the kernels may block differently
        assert merge["max_weight_diff"] <= 1e-5
        assert merge["out_diff"] <= 1e-5
        assert merge["fresh_A_equal"] and merge["B_zero"]
    assert ranks[0]["merge"]["paths"] == {"l1": "rows", "l2": "rows", "l3": "gather B"}
    # 5 rows split 3 + 2, 1 row split 1 + 0 (an empty shard): uneven out dims take the row path too
    assert [r["merge"]["local_rows"]["l1"] for r in ranks] == [3, 2]
    assert [r["merge"]["local_rows"]["l2"] for r in ranks] == [1, 0]


def test_the_merge_record_check_reads_sharded_B_on_every_rank(ranks):
    assert [r["merge"]["record_problems"] for r in ranks] == [[], []]


def test_injecting_after_sharding_is_one_line_naming_the_unit(ranks):
    for rank in ranks:
        assert rank["after_sharding"].startswith("module 'l1' is already sharded (FSDP2 unit 'l1'): LoRA adapters "
                                                 "added after sharding are plain tensors")
        assert "\n" not in rank["after_sharding"]


def test_the_dtype_check_predicts_fsdp2s_own_failure(ranks):
    for rank in ranks:
        mixed = rank["mixed_dtype"]
        assert len(mixed["problems"]) == 1 and mixed["problems"][0].startswith("FSDP2 unit '<root>' would train")
        assert "FSDP expects uniform original parameter dtype" in mixed["fsdp_error"]
