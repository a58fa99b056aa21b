"""phasetune.plan: what a memory plan reports, its advice, its forms, and the errors of bad input.

Plans here simulate a small transformer-shaped MLP (tests/data/plan/plan_models.py) under fake tensors on a fake
process group; tests/test_memory_plan_sim.py compares the simulation with real tensors and real runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from phasetune import ConfigurationError, ScheduleError
from phasetune.plan import best_pair, optimizer_settings, plan_memory, plan_memory_isolated
from phasetune.plan.advice import size
from phasetune.plan.model_source import model_source
from phasetune.plan.shard import fake_world
from phasetune.plan.simulate import build, run_pass, tensor_mode, thaw

DATA = Path(__file__).parent / "data" / "plan"
sys.path.insert(0, str(DATA))
from plan_models import Net, data_dependent, schedule, small_net  # noqa: E402

SMALL = {"world_size": 4, "seq_len": 8, "micro_batch": 2}


@pytest.fixture(scope="module")
def plan():
    return plan_memory(schedule(2), small_net, **SMALL)


@pytest.fixture(scope="module")
def ckpt_plan():
    return plan_memory(schedule(2), small_net, act_ckpt=True, **SMALL)


def _between_phases(plan, low: int) -> dict:
    """Device settings whose budget lies halfway between the peaks of phases ``low`` and ``low + 1``."""
    budget = (plan.phases[low].peak + plan.phases[low + 1].peak) // 2
    return {"device_gib": 1.0 + budget / 2**30, "reserve_gib": 1.0, "fragmentation": 0.0}


@pytest.fixture(scope="module")
def tight(plan):
    """A device on which phase 0 fits and phase 1 does not, with a global batch of 16 (2 accumulation steps)."""
    return plan_memory(schedule(2), small_net, global_batch=16, **_between_phases(plan, 0), **SMALL)


# ------------------------------------------------------------------------------------------------ what it reports


def test_every_phase_is_simulated_and_peaks_grow_with_thaw_depth(plan):
    assert [p.source for p in plan.phases] == ["simulated"] * 3
    peaks = [p.peak for p in plan.phases]
    assert peaks[0] < peaks[1] < peaks[2]


def test_gradients_and_optimizer_state_cover_only_trainable_shards(plan):
    full = sum(p.numel() * 4 for p in Net(n_layers=2).parameters())
    last = plan.phases[-1]
    assert last.params == full // 4  # exact: every dim 0 of Net divides by 4, so each rank holds a quarter
    assert last.grads == last.params
    assert plan.phases[0].grads < plan.phases[1].grads < last.grads
    # AdamW: two moments per trainable element plus a 4-byte step per trainable tensor (exact)
    assert last.optimizer == 2 * last.grads + 4 * len(list(Net(n_layers=2).parameters()))


def test_checkpointing_lowers_activations_of_the_full_phase(plan, ckpt_plan):
    assert ckpt_plan.phases[-1].activations < plan.phases[-1].activations
    assert ckpt_plan.units == plan.units  # the same units, checkpointed


def test_the_peak_names_the_module_and_pass_where_it_happens(plan):
    assert all(p.peak_at.endswith(("(forward)", "(backward)")) or p.peak_at == "optimizer step" for p in plan.phases)


def test_table_lists_each_phase_and_the_dict_form_is_json(plan):
    text = plan.table()
    assert "Memory plan: Net from small_net()" in text and "FSDP2 on 4 ranks" in text
    rows = [line for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) >= 3
    data = json.loads(json.dumps(plan.to_dict()))
    assert [p["phase"] for p in data["phases"]] == [0, 1, 2]
    assert data["setup"]["world_size"] == 4 and data["phases"][2]["peak"] == plan.phases[2].peak


def test_host_memory_counts_offloaded_states_and_snapshots():
    offload = plan_memory(schedule(2), small_net, cpu_offload=True, **SMALL)
    last = offload.phases[-1]
    assert last.params == last.grads == last.optimizer == 0  # all on the host
    assert last.host.offload == last.ranks[0]["params"] + last.ranks[0]["grads"] + last.ranks[0]["optimizer"]
    first = offload.phases[0]
    trainable_shards = first.ranks[0]["grads"]  # gradients have the trainable shards' shapes
    assert first.host.snapshot == trainable_shards + first.ranks[0]["optimizer"]  # exact; the model has no buffers
    assert last.host.snapshot == 0  # the final phase keeps no restore-best snapshot


def test_name_prefix_lets_a_lightning_schedule_match():
    lightning = {0: {"params": ["model.head.*", "model.norm.*"]}, 1: {"params": [r"model\.layers\..*", "model.embed.*"]}}
    p = plan_memory(lightning, small_net, name_prefix="model", **SMALL)
    assert len(p.phases) == 2 and "model.layers.0" in p.units


def test_ddp_is_the_single_device_run_plus_its_gradient_buckets():
    single = plan_memory(schedule(2), small_net, strategy="single", world_size=1, seq_len=8, micro_batch=2)
    ddp = plan_memory(schedule(2), small_net, strategy="ddp", world_size=2, seq_len=8, micro_batch=2)
    for s, d in zip(single.phases, ddp.phases):
        assert d.forward_backward_peak - s.forward_backward_peak == s.grads  # exact: one bucket copy of the gradients


@pytest.mark.parametrize("strategy, world_size", [("ddp", 2), ("fsdp1", 2)])
def test_accumulation_is_simulated_under_every_strategy(strategy, world_size):
    p = plan_memory(schedule(2), small_net, strategy=strategy, world_size=world_size, seq_len=8, micro_batch=2,
                    global_batch=4 * world_size)
    assert [ph.source for ph in p.phases] == ["simulated"] * 3
    assert 0 < p.phases[0].accumulated_grads < p.phases[-1].accumulated_grads


def test_syncing_every_micro_step_keeps_no_unsharded_gradients():
    kept = plan_memory(schedule(2), small_net, global_batch=16, **SMALL)
    synced = plan_memory(schedule(2), small_net, global_batch=16, sync_every_micro_step=True, **SMALL)
    assert all(p.accumulated_grads > 0 for p in kept.phases)
    assert all(p.accumulated_grads == 0 for p in synced.phases)
    assert synced.phases[-1].forward_backward_peak < kept.phases[-1].forward_backward_peak


# ------------------------------------------------------------------------------------------------ advice


def test_a_phase_that_does_not_fit_is_named_with_its_excess(tight):
    p = tight
    failing = p.failing()
    assert failing, p.table()
    first = failing[0]
    line = next(a for a in p.advice if a.startswith(f"phase {first.phase} will not fit"))
    assert f"{size(-first.headroom)} over" in line  # GiB, or MiB below 1 GiB
    assert p.problems() == [a for a in p.advice if "will not fit" in a] and len(p.problems()) == len(failing)
    assert p.fits is False


def test_micro_batch_limits_fit_and_the_next_size_does_not(tight):
    phase = tight.phases[0]  # fits at micro-batch 2, so its limit is at least 2
    assert phase.max_micro_batch >= 2
    setup, source = tight.setup, model_source(small_net)
    with fake_world(setup.world_size) as mesh, tensor_mode(setup):
        sim = build(source, setup, mesh)
        thaw(sim, {"head.weight", "head.bias", "norm.weight", "norm.bias"})
        fits = run_pass(sim, source, setup, phase.max_micro_batch).peak.total + phase.optimizer
        over = run_pass(sim, source, setup, phase.max_micro_batch + 1).peak.total + phase.optimizer
    assert fits <= tight.budget < over


def test_batch_pairs_keep_the_global_batch(tight):
    assert best_pair(64, 8, limit=3) == (2, 4)
    assert best_pair(64, 8, limit=100) == (8, 1)
    assert best_pair(64, 8, limit=0) is None
    pairs = next(a for a in tight.advice if "keep the global batch of 16 on 4 rank(s)" in a)
    for ph in tight.phases:
        pair = best_pair(16, 4, ph.max_micro_batch)
        assert (f"phase {ph.phase}: {pair[0]} x {pair[1]}" if pair else f"phase {ph.phase}: none fits") in pairs


def test_a_low_trainable_block_under_a_frozen_top_is_warned():
    bottom_up = {0: {"params": ["head.*", "norm.*"]}, 1: {"params": [r"layers\.0\..*"]}}
    p = plan_memory(bottom_up, small_net, **SMALL)
    warning = next(a for a in p.advice if a.startswith("phase 1 trains layers.0 under 1 frozen block(s)"))
    assert "(layers.1 .. layers.1)" in warning


def test_checkpointing_advice_starts_at_the_lowest_trainable_block(tight):
    advice = [a for a in tight.advice if "checkpoint only from" in a]
    phase1 = next(a for a in advice if a.startswith("phase 1"))
    assert "from layers.1 up (1 block(s): layers.1 .. layers.1)" in phase1
    assert "1 frozen block(s) below it keep no activations" in phase1


def test_a_built_optimizer_gives_its_plan_settings():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert optimizer_settings(torch.optim.AdamW(params, fused=True)) == {
        "optimizer": "adamw", "optimizer_impl": "fused",
        "optimizer_kwargs": {"amsgrad": False, "weight_decay": 0.01, "maximize": False}}
    assert optimizer_settings(torch.optim.SGD(params, momentum=0.9), on_cuda=False)["optimizer_impl"] == "single_tensor"
    with pytest.raises(ValueError, match="not Adagrad"):
        optimizer_settings(torch.optim.Adagrad(params))


# ------------------------------------------------------------------------------------------------ fallbacks, errors


def test_a_model_that_does_not_run_under_fake_tensors_falls_back_to_its_model_states():
    p = plan_memory(schedule(2), data_dependent, **SMALL)
    assert [ph.source for ph in p.phases] == ["analytic"] * 3
    assert any("did not run under fake tensors (stopped in embed" in n for n in p.notes)
    assert p.phases[-1].optimizer > 0 and p.phases[-1].activations == 0


def test_settings_are_checked_together_before_any_simulation():
    with pytest.raises(ConfigurationError) as e:
        plan_memory(schedule(2), small_net, world_size=0, strategy="zero3", optimizer="lion", global_batch=7)
    text = str(e.value)
    for part in ("world_size must be an integer >= 1", "strategy 'zero3' is not one of", "optimizer 'lion'"):
        assert part in text


def test_an_unknown_setting_suggests_the_close_one():
    with pytest.raises(ConfigurationError, match="no setting 'world_sise'; did you mean 'world_size'"):
        plan_memory(schedule(2), small_net, world_sise=2)


def test_a_global_batch_that_is_no_multiple_names_the_valid_one():
    with pytest.raises(ConfigurationError, match=r"global_batch=30 is not a multiple of micro_batch \* world_size = 8; use 24"):
        plan_memory(schedule(2), small_net, global_batch=30, **SMALL)


def test_bad_model_sources_say_what_to_give(tmp_path):
    with pytest.raises(ConfigurationError, match="no such config file or directory"):
        plan_memory(schedule(2), str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ConfigurationError, match="has no 'model_type' key"):
        plan_memory(schedule(2), str(tmp_path))
    with pytest.raises(ConfigurationError, match="has no callable 'nope'"):
        plan_memory(schedule(2), "plan_models:nope")
    with pytest.raises(ConfigurationError, match="not a built module"):
        plan_memory(schedule(2), Net())


def test_schedule_errors_name_the_phase():
    bad = {0: {"params": ["head.*"]}, 1: {"params": ["layers.9.*"]}}  # the model has 2 layers
    with pytest.raises(ScheduleError, match="phase 1"):
        plan_memory(bad, small_net, **SMALL)


def test_fsdp_plan_errors_name_the_entry():
    with pytest.raises(ConfigurationError, match="fsdp_plan entry 'layerz'"):
        plan_memory(schedule(2), small_net, fsdp_plan={"layerz": {}}, **SMALL)


def test_beside_an_existing_process_group_the_plan_runs_in_its_own_process(plan):
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        with pytest.raises(ConfigurationError, match=r"a process group already exists.*plan_memory_isolated"):
            plan_memory(schedule(2), small_net, **SMALL)
        isolated = plan_memory_isolated(schedule(2), "plan_models:small_net", **SMALL)  # the factory named by string
    finally:
        dist.destroy_process_group()
    assert isolated.model == "Net from plan_models:small_net"
    assert [p.peak for p in isolated.phases] == [p.peak for p in plan.phases]  # exact: the same simulation


def test_inputs_are_required_for_a_model_without_them():
    with pytest.raises(ConfigurationError, match="cannot make a batch"):
        plan_memory({0: {"params": [".*"]}}, lambda: torch.nn.Linear(4, 4), **SMALL)


@pytest.mark.parametrize("strategy,world_size", [("single", 1), ("fsdp2", 4)])
def test_a_bfloat16_model_is_planned_at_half_the_parameter_bytes(strategy, world_size):
    # the plan builds under fake tensors, which refuse Module.to's in-place swap: it casts by replacing tensors
    kw = {**SMALL, "strategy": strategy, "world_size": world_size}
    fp32 = plan_memory(schedule(2), small_net, **kw)
    bf16 = plan_memory(schedule(2), small_net, param_dtype="bfloat16", **kw)
    assert [p.source for p in bf16.phases] == ["simulated"] * 3
    assert [2 * b.params for b in bf16.phases] == [f.params for f in fp32.phases]  # exact: bytes from shapes
    assert all(b.peak < f.peak for b, f in zip(bf16.phases, fp32.phases))


def test_a_lora_schedule_is_planned_on_the_model_with_its_adapters():
    pytest.importorskip("peft")
    from transformers import BertConfig

    from phasetune.plan.model_source import with_adapters

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=2, architectures=["BertForSequenceClassification"])
    lora = {"peft": {"method": "lora", "r": 4, "alpha": 8, "target_modules": r".*\.attention\.self\.(query|value)$"},
            0: {"params": ["classifier.*", r".*\.lora_.*"], "max_transition_step": 4},
            1: {"params": [r"bert\.encoder\.layer\.1\..*base_layer\..*"], "lr": 1e-4}}
    plan = plan_memory(lora, config, world_size=2, strategy="fsdp2", seq_len=8, micro_batch=2)
    assert "with the schedule's LoRA adapters" in plan.model
    assert [p.source for p in plan.phases] == ["simulated"] * 2
    real = dict(with_adapters(model_source(config), lora).build().named_parameters())  # the same injection, real tensors
    head_and_adapters = sum(p.numel() for n, p in real.items() if n.startswith("classifier.") or ".lora_" in n)
    assert plan.phases[0].trainable == head_and_adapters  # exact: counts of elements
    assert plan.phases[0].optimizer < plan.phases[1].optimizer
