"""LoRA schedules in a run: injection by the front end, the merge at a transition, exact resume after a merge, and
the errors raised before compute (plain loop and the FSDP2 strategy on one process)."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from torch import nn

from helpers import ToyModule, dataset
from loop_runs import shape, step_loop_run
from phasetune import FSDP2Strategy, ScheduledFinetuning
from phasetune.errors import ConfigurationError, ScheduleError
from phasetune.run.lora_glue import base_weights_state, inject_adapters, load_base_weights, sharding_problems

pytest.importorskip("peft")

PEFT = {"method": "lora", "r": 2, "alpha": 4}
#: LoRA on the top block, then the next block's adapters, then both merged and the top block's base weight trains
MERGE = {
    "peft": PEFT,
    0: {"params": ["model.head.*", r"model\.layers\.3\.lin\.lora_.*"], "max_transition_step": 6},
    1: {"params": [r"model\.layers\.2\.lin\.lora_.*"], "lr": 0.05, "max_transition_step": 11,
        "new_lr_scheduler": shape(5)},
    2: {"params": [r"model\.layers\.3\.lin\.base_layer\..*"], "lr": 0.02, "merge_lora": True,
        "new_lr_scheduler": shape(5)},
}
#: ReLoRA: at phase 2 the top block's adapter is merged and restarts in a new group at the phase's lr
RESTART = {**MERGE, 2: {"params": ["model.layers.3.norm.weight"], "lr": 0.02, "new_lr_scheduler": shape(5),
                        "merge_lora": {"modules": [r"model\.layers\.3\.lin"], "reinit": True, "seed": 7}}}


def adapters(module: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in module.named_parameters() if ".lora_" in n}


def test_the_loop_injects_adapters_frozen_until_their_phase():
    torch.manual_seed(0)
    module = ToyModule()
    ft = ScheduledFinetuning(MERGE, module, torch.optim.SGD(module.parameters(), lr=0.1))
    assert adapters(module) == {"model.layers.2.lin.lora_A.default.weight": False,
                                "model.layers.2.lin.lora_B.default.weight": False,
                                "model.layers.3.lin.lora_A.default.weight": True,
                                "model.layers.3.lin.lora_B.default.weight": True}
    assert ft.run.lora is not None and list(ft.run.lora.merges[2][1]) == ["model.layers.2.lin", "model.layers.3.lin"]


def test_the_merge_transition_keeps_the_outputs_and_takes_the_adapters_out_of_training(caplog):
    caplog.set_level(logging.INFO, logger="phasetune")
    seen = {}
    x = dataset(8, 3).tensors[0]
    torch.manual_seed(0)
    module = ToyModule()
    ft = ScheduledFinetuning(MERGE, module, torch.optim.SGD(module.parameters(), lr=0.1), restore_best=False)
    xs, ys = dataset(64, 0).tensors
    for step in range(11):
        ft.optimizer.zero_grad()
        i = (step % 4) * 16
        nn.functional.cross_entropy(module(xs[i:i + 16]), ys[i:i + 16]).backward()
        ft.optimizer.step()
        if ft.lr_scheduler is not None:
            ft.lr_scheduler.step()
        if step == 10:
            with torch.no_grad():
                seen["before"] = module.eval()(x)
            module.train()
        ft.step_end()
    assert ft.depth == 2
    with torch.no_grad():
        after = module.eval()(x)
    # numerical: W + s*B@A folded in fp32 reassociates one matmul; outputs here are O(1), float32 eps 1.2e-7
    assert (after - seen["before"]).abs().max() <= 1e-6
    lora = adapters(module)
    assert not any(lora.values())  # every merged adapter is frozen for good
    held = {id(p) for g in ft.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in held for n, p in module.named_parameters() if ".lora_" in n)
    assert all(float(module.get_parameter(n).abs().max()) == 0.0 for n in lora if ".lora_B." in n)
    # the phase's record counts what trains now: merged adapters are not among its trainable parameters
    assert ft.history[-1].trainable_params == sum(p.numel() for p in module.parameters() if p.requires_grad)
    base = sum(p.numel() for n, p in module.named_parameters() if n.startswith("model.layers.3.lin.base_layer."))
    assert f"({base} params in 2 tensors)" in caplog.text  # the transition line counts what it thawed
    assert ft.run.state_dict()["lora"] == [{"phase": 2, "adapter": "default", "reinit": False, "seed": None,
                                            "modules": ["model.layers.2.lin", "model.layers.3.lin"]}]


@pytest.mark.parametrize("schedule", [MERGE, RESTART], ids=["merge", "restart"])
def test_a_loop_saved_right_after_the_merge_transition_resumes_bit_equal(schedule):
    whole, ft, trajectory, saved = step_loop_run(schedule, steps=16, save_at=11)
    assert ft.depth == 2 and saved is not None
    resumed, ft2, rest, _ = step_loop_run(schedule, steps=16, resume=saved)
    assert rest == trajectory[11:]  # the same thawed names and (phase, size, lr) groups before every step
    a, b = whole.state_dict(), resumed.state_dict()
    assert list(a) == list(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n  # exact: same machine, same ops, same batches
    assert ft2.run.lora.record == ft.run.lora.record


def test_a_restarted_adapter_trains_again_in_a_new_group_at_the_phases_lr():
    module, ft, _, _ = step_loop_run(RESTART, steps=12)
    top = {n: p for n, p in module.named_parameters() if n.startswith("model.layers.3.lin.lora_")}
    assert all(p.requires_grad for p in top.values())
    group = next(g for g in ft.optimizer.param_groups if any(p is top["model.layers.3.lin.lora_A.default.weight"]
                                                              for p in g["params"]))
    assert group["initial_lr"] == 0.02 and len(group["params"]) == 2
    assert module.get_parameter("model.layers.2.lin.lora_A.default.weight").requires_grad  # not merged: trains on


def test_resume_refuses_a_checkpoint_whose_merged_B_is_not_zero():
    _, _, _, saved = step_loop_run(MERGE, steps=12, save_at=11)
    state = torch.load(io.BytesIO(saved), weights_only=True)
    torch.manual_seed(0)
    module = ToyModule()
    ft = ScheduledFinetuning(MERGE, module, torch.optim.SGD(module.parameters(), lr=0.1), patience=2)
    with torch.no_grad():
        module.get_parameter("model.layers.3.lin.lora_B.default.weight").fill_(0.5)  # as peft's merge() leaves it
    with pytest.raises(ConfigurationError, match=r"'model\.layers\.3\.lin\.lora_B\.default\.weight' is not zero"):
        ft.load_state_dict(state["ft"])


# ------------------------------------------------------------------------------------------ the four errors
def test_a_name_from_before_injection_is_one_line_with_the_new_name():
    schedule = {**MERGE, 2: {"params": ["model.layers.3.lin.weight"], "lr": 0.02, "merge_lora": True}}
    torch.manual_seed(0)
    module = ToyModule()
    with pytest.raises(ScheduleError) as e:
        ScheduledFinetuning(schedule, module, torch.optim.SGD(module.parameters(), lr=0.1))
    assert e.value.problems == ["phase 2, key 'params': 'model.layers.3.lin.weight' is the name from before LoRA "
                                "injection; did you mean 'model.layers.3.lin.base_layer.weight'?"]


def test_a_merge_naming_no_adapter_is_one_line_naming_the_phase_and_entry():
    schedule = {**MERGE, 2: {**MERGE[2], "merge_lora": ["model.head"]}}
    torch.manual_seed(0)
    module = ToyModule()
    with pytest.raises(ScheduleError) as e:
        ScheduledFinetuning(schedule, module, torch.optim.SGD(module.parameters(), lr=0.1))
    assert e.value.problems == ["phase 2, key 'merge_lora': 'model.head' names no LoRA layer with adapter 'default'; "
                                "the layers are 'model.layers.2.lin', 'model.layers.3.lin' (a regex over whole module "
                                "names)"]


def test_a_run_built_before_injection_says_how_to_inject():
    from phasetune.run import PhaseRun, RunEnv, RunOptions

    torch.manual_seed(0)
    module = ToyModule()
    params = dict(module.named_parameters())
    with pytest.raises(ScheduleError, match=r"trains LoRA adapters of 'model\.layers\.2\.lin', 'model\.layers\.3\.lin'"
                                            r", which the model does not have.*inject_adapters\(model, schedule\)"):
        PhaseRun(MERGE, params, {n: tuple(p.shape) for n, p in params.items()}, options=RunOptions(), env=RunEnv(),
                 model=module)


def test_mixed_trainable_dtypes_in_one_fsdp2_unit_are_one_line_naming_the_unit():
    torch.manual_seed(0)
    module = ToyModule().to(torch.bfloat16)  # bf16 base weights, fp32 adapters (the peft section's default)
    problems = sharding_problems(module, MERGE, ["model.layers.0", "model.layers.1", "model.layers.2"])
    assert problems == [
        "FSDP2 unit '<root>' would train parameters of 2 dtypes from phase 0 on (float32: "
        "'model.layers.3.lin.lora_A.default.weight', 'model.layers.3.lin.lora_B.default.weight'; bfloat16: "
        "'model.head.weight', 'model.head.bias'); FSDP2 needs one dtype among a unit's trainable parameters: set "
        "adapter_dtype: base in the peft section (adapters in their base weight's dtype, bfloat16), or shard the "
        "adapters as units of their own (fsdp_plan entries for the '<module>.lora_A' and '<module>.lora_B' modules)"]


def test_adapters_asked_for_after_sharding_are_one_line_naming_the_unit(one_process):
    from torch.distributed.fsdp import fully_shard

    st = FSDP2Strategy(seed=0, micro_batch_size=16, global_batch_size=16)
    module = ToyModule()
    fully_shard(module.model.layers[3])
    fully_shard(module)
    with pytest.raises(ScheduleError) as e:
        inject_adapters(module, MERGE)
    assert e.value.problems[0].startswith("module 'model.layers.2.lin' is already sharded (FSDP2 unit '<root>')")
    assert e.value.problems[1].startswith("module 'model.layers.3.lin' is already sharded (FSDP2 unit "
                                          "'model.layers.3')")
    assert "FSDP2Strategy.prepare_model(model, schedule=...)" in e.value.problems[1]
    st.teardown()


# ------------------------------------------------------------------------------------------ FSDP2 strategy
def test_the_fsdp2_strategy_injects_before_fully_shard_and_merges_like_the_plain_loop(one_process):
    plain, ft_plain, _, _ = step_loop_run(MERGE, steps=14)
    st = FSDP2Strategy(seed=0, micro_batch_size=16, global_batch_size=16)
    torch.manual_seed(0)
    module = ToyModule(lr=0.1)
    module = st.prepare_model(module, fsdp_plan={r"model\.layers\.\d+": {}}, schedule=MERGE)
    ft = ScheduledFinetuning(MERGE, module, torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9), patience=2)
    xs, ys = dataset(64, 0).tensors
    for step in range(14):
        i = (step % 4) * 16
        ft.optimizer.zero_grad()
        nn.functional.cross_entropy(module(xs[i:i + 16]), ys[i:i + 16]).backward()
        ft.optimizer.step()
        ft.lr_scheduler.step() if ft.lr_scheduler is not None else None
        ft.step_end()
        if (step + 1) % 4 == 0:
            ft.step(step // 4, metric=[1.0, 0.9, 0.95, 0.96][step // 4])
    assert ft.depth == 2 and ft.run.lora.record == ft_plain.run.lora.record
    ours = {n: p.full_tensor() for n, p in module.named_parameters()}
    for n, p in plain.named_parameters():
        # numerical: one rank, the same ops; FSDP2's flat gather/reduce copies keep values, fp32 sums may reorder
        assert torch.allclose(ours[n], p, atol=1e-6, rtol=0), n
    st.teardown()


def test_base_weights_a_run_changed_round_trip_for_adapter_only_checkpoints():
    module, ft, _, _ = step_loop_run(MERGE, steps=12)
    state = base_weights_state(ft.run)
    assert sorted(state) == ["model.head.bias", "model.head.weight", "model.layers.2.lin.base_layer.bias",
                             "model.layers.2.lin.base_layer.weight", "model.layers.3.lin.base_layer.bias",
                             "model.layers.3.lin.base_layer.weight"]
    torch.manual_seed(1)
    other = ToyModule()
    ft2 = ScheduledFinetuning(MERGE, other, torch.optim.SGD(other.parameters(), lr=0.1))
    load_base_weights(ft2.run, state)
    for n in state:
        assert torch.equal(other.get_parameter(n), module.get_parameter(n)), n  # exact: a copy
