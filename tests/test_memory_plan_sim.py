"""phasetune.plan against real tensors: the simulation's fidelity, the model states to the byte, and the two torch
2.13 facts the plan works around (a frozen parameter stops MemTracker; fake tensors over-count an FSDP2 step), plus
the FSDP2 mixed-precision thaw that sharding.refresh_unit_dtypes repairs.

Real tensors here still live on the fake process group (collectives move no data, so values are meaningless but
every allocation is real); bench/fsdp2_memory.py compares with two real gloo ranks.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from phasetune import ConfigurationError
from phasetune.plan import Shard, plan_memory, step_memory
from phasetune.plan.shard import fake_world
from phasetune.plan.states import StatePlanner, local_shard
from phasetune.plan.tracker import PlainTracker
from phasetune.sharding.plan import apply_plan, refresh_unit_dtypes

DATA = Path(__file__).parent / "data" / "plan"
sys.path.insert(0, str(DATA))
from plan_models import Net, schedule, small_net  # noqa: E402

LLAMA = str(DATA / "tiny_llama.json")
pytestmark = [
    # FSDP2 warns that a unit returns a view (a hazard for in-place ops elsewhere; none here), and a global forward
    # hook of torch's MemTracker is silenced while the frozen-parameter error it provokes propagates
    pytest.mark.filterwarnings("ignore:FSDP2-wrapped module"),
    pytest.mark.filterwarnings("ignore:global module forward hook"),
]
LLAMA_SCHEDULE = {0: {"params": ["lm_head.weight", "model.norm.weight"]},
                  1: {"params": [r"model\.layers\.3\..*"]},
                  2: {"params": [r"model\.layers\.[0-2]\..*", "model.embed_tokens.weight"]}}


def _peaks(plan) -> list[tuple[int, str]]:
    return [(p.forward_backward_peak, p.peak_at) for p in plan.phases]


# ------------------------------------------------------------------------------------------------ fidelity


@pytest.mark.parametrize("model, plan_schedule, settings", [
    (LLAMA, LLAMA_SCHEDULE, {"world_size": 2, "mixed_precision": "bf16", "act_ckpt": True}),
    (small_net, schedule(2), {"world_size": 4, "global_batch": 24}),  # 3 micro-steps: gradients kept unsharded
], ids=["hf-llama-bf16-ckpt-2-ranks", "mlp-accumulation-4-ranks"])
def test_fake_tensors_peak_where_real_tensors_do(model, plan_schedule, settings):
    fake = plan_memory(plan_schedule, model, seq_len=8, micro_batch=2, **settings)
    real = plan_memory(plan_schedule, model, seq_len=8, micro_batch=2, tensors="real", **settings)
    assert _peaks(fake) == _peaks(real)  # exact: the same operators on the same shapes, tracked alike
    assert all(p.source == "simulated" for p in fake.phases)


def test_a_step_the_run_would_fail_is_refused_with_its_phase_and_error():
    bert = str(DATA / "tiny_bert.json")  # its word embeddings are tied to the MLM decoder, in the root unit
    tied = {0: {"params": [r"cls\..*"]}, 1: {"params": [r"bert\..*"]}}
    with pytest.raises(ConfigurationError, match=r"phase 0: the simulated training step failed .*word_embeddings"):
        plan_memory(tied, bert, world_size=2, seq_len=8, micro_batch=2)  # the block plan makes BertEmbeddings a unit
    ok = plan_memory(tied, bert, world_size=2, seq_len=8, micro_batch=2, fsdp_plan={r"bert\.encoder\.layer\.\d+": {}})
    assert [p.source for p in ok.phases] == ["simulated"] * 2


def _measured_states(world_size: int, rank: int, factory) -> list[dict[str, int]]:
    """Bytes rank ``rank`` holds after a real AdamW step in each phase of schedule(): a real run, on the fake group."""

    def local(t: torch.Tensor | None) -> int:
        if t is None:
            return 0
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    rows = []
    with fake_world(world_size, rank=rank):
        torch.manual_seed(0)
        model = factory()
        model.requires_grad_(False)
        apply_plan(model, {r"layers\.\d+": {}, "embed": {}, "head": {}})
        names = dict(model.named_parameters())
        optimizer = None
        sched = schedule(2)
        for k in range(3):
            trainable = [n for j in range(k + 1) for n in names if _in_phase(n, sched[j]["params"])]
            for n in trainable:
                names[n].requires_grad_(True)
            params = [names[n] for n in trainable]
            optimizer = torch.optim.AdamW(params, lr=1e-3, foreach=True)
            model(*model.example_inputs(2, 4)).sum().backward()
            optimizer.step()
            rows.append({"params": sum(local(p) for p in names.values()),
                         "grads": sum(local(p.grad) for p in names.values()),
                         "optimizer": sum(local(v) for st in optimizer.state.values() for v in st.values())})
            optimizer.zero_grad()
    return rows


def _in_phase(name: str, patterns: list[str]) -> bool:
    import re

    return any(re.fullmatch(p, name) for p in patterns)


def test_model_states_equal_a_real_run_to_the_byte_on_every_rank():
    odd = functools.partial(Net, width=30, n_layers=2, n_in=15, n_out=7)  # 4 ranks split rows unevenly: 8, 8, 8, 6
    plan = plan_memory(schedule(2), odd, world_size=4, seq_len=4, micro_batch=2,
                       fsdp_plan={r"layers\.\d+": {}, "embed": {}, "head": {}})
    for rank in (0, 3):
        measured = _measured_states(4, rank, odd)
        planned = [{k: p.ranks[rank][k] for k in ("params", "grads", "optimizer")} for p in plan.phases]
        assert planned == measured, f"rank {rank}"  # exact: bytes of tensors, no arithmetic in between


def test_fsdp2_shards_follow_the_chunk_rule_on_every_rank():
    shapes = [(5, 3), (7,), (2, 4), (1, 6), (9, 2)]
    for world in (3, 4):
        for rank in range(world):
            with fake_world(world, rank=rank) as mesh, FakeTensorMode():
                m = nn.ParameterList(nn.Parameter(torch.empty(s)) for s in shapes)
                fully_shard(m, mesh=mesh)
                local = [tuple(p.to_local().shape) for p in m]
            assert local == [local_shard(s, torch.float32, "fsdp2", world, rank).shape for s in shapes], (world, rank)


# ------------------------------------------------------------------------------------------------ torch fact 1


def _partly_frozen() -> nn.Module:
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    m[0].weight.requires_grad_(False)
    return m


def test_torch_memtracker_refuses_a_model_with_a_frozen_parameter():
    m = _partly_frozen()
    with pytest.raises(RuntimeError, match="cannot register a hook on a tensor that doesn't require gradient"), \
            MemTracker():
        m(torch.randn(2, 8)).sum().backward()


def test_the_plain_tracker_tracks_a_partly_frozen_model():
    m = _partly_frozen()
    x = torch.randn(2, 8)
    tracker = PlainTracker(m)
    tracker.track_model(m, x)
    with tracker:
        m(x).sum().backward()
    trainable = sum(p.numel() * 4 for p in m.parameters() if p.requires_grad)
    assert tracker.peak.total > 0
    assert tracker.mark_kept_as_grads() == trainable  # exact: the gradients of trainable parameters, none else


# ------------------------------------------------------------------------------------------------ torch fact 2


def _sharded_step_peak(fake: bool, optimizer_cls, groups: bool = False, **kwargs) -> int:
    """Peak of an optimizer step on FSDP2 parameters tracked by FSDPMemTracker (world of 2, rank 0): the first step,
    or with ``groups`` (one param group per layer, as phases add them) the second, when every group has state."""
    with fake_world(2) as mesh, FakeTensorMode() if fake else torch.device("cpu"):
        # shapes used nowhere else in the suite: DTensor caches its propagation per shape, and the over-count
        # appears only when it is not cached yet
        m = nn.Sequential(nn.Linear(37, 106), nn.ReLU(), nn.Linear(106, 22))
        fully_shard(m[0], mesh=mesh)
        fully_shard(m, mesh=mesh)
        m(torch.randn(3, 37)).sum().backward()
        params = [{"params": list(m[0].parameters())}, {"params": list(m[2].parameters())}] if groups else m.parameters()
        optimizer = optimizer_cls(params, lr=1e-3, **kwargs)
        if groups:
            optimizer.step()
        tracker = FSDPMemTracker(m, optimizer)
        with tracker:
            optimizer.step()
        return next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]


def _shards(world: int = 2) -> list[list[tuple[str, Shard]]]:
    shapes = [(106, 37), (106,), (22, 106), (22,)]
    return [[(str(i), local_shard(s, torch.float32, "fsdp2", world, 0)) for i, s in enumerate(shapes)]]


def test_torch_overcounts_an_fsdp2_optimizer_step_under_fake_tensors():
    _clear_dtensor_propagation_cache()
    fake = _sharded_step_peak(True, torch.optim.AdamW, foreach=True)
    real = _sharded_step_peak(False, torch.optim.AdamW, foreach=True)
    largest = 106 * 37 * 4  # the largest parameter, unsharded
    assert fake - real >= largest  # the global-shape propagation tensors are counted


@pytest.mark.parametrize("optimizer_cls, kwargs", [
    (torch.optim.AdamW, {"foreach": True}),
    (torch.optim.AdamW, {"foreach": False}),
    (torch.optim.SGD, {"foreach": True, "momentum": 0.9}),
], ids=["adamw-foreach", "adamw-single-tensor", "sgd-momentum"])
def test_the_step_from_shards_equals_the_real_tracked_step(optimizer_cls, kwargs):
    real = _sharded_step_peak(False, optimizer_cls, **kwargs)
    step = step_memory(_shards(), optimizer_cls, {"lr": 1e-3, **kwargs})
    resident = 2 * sum(s.nbytes for _, s in _shards()[0])  # parameters and gradients
    assert resident + step.state + step.temporaries == real  # exact: the same kernels on the same local shapes


def test_a_step_over_several_groups_holds_every_state_and_one_groups_temporaries():
    real = _sharded_step_peak(False, torch.optim.AdamW, groups=True, foreach=True)
    shapes = {"0.weight": ((106, 37), torch.float32), "0.bias": ((106,), torch.float32),
              "2.weight": ((22, 106), torch.float32), "2.bias": ((22,), torch.float32)}
    states = StatePlanner(shapes, "fsdp2", 2).states([["0.weight", "0.bias"], ["2.weight", "2.bias"]],
                                                      torch.optim.AdamW, {"lr": 1e-3, "foreach": True}, 0)
    assert states.params + states.grads + states.optimizer + states.step_temporaries == real  # exact


def _clear_dtensor_propagation_cache() -> None:
    from torch.distributed.tensor import DTensor

    propagator = DTensor._op_dispatcher.sharding_propagator
    cached = getattr(propagator, "_propagate_tensor_meta_cached", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()


# ------------------------------------------------------------------------------------------------ bf16 thaw


def _thaw_after_first_step(refresh: bool) -> dict[str, torch.dtype | None]:
    with fake_world(2):
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        m.requires_grad_(False)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        fully_shard(m[0], mp_policy=mp)
        fully_shard(m[2], mp_policy=mp)
        fully_shard(m, mp_policy=mp)
        m[2].requires_grad_(True)
        x = torch.randn(4, 8)
        m(x).float().sum().backward()  # the first forward fixes each unit's dtypes: m[0] is frozen then
        m.zero_grad()
        m[0].requires_grad_(True)
        if refresh:
            refresh_unit_dtypes(m)
        m(x).float().sum().backward()
        return {n: None if p.grad is None else p.grad.dtype for n, p in m.named_parameters()}


def test_torch_fails_the_backward_of_a_unit_thawed_after_the_first_forward_under_mixed_precision():
    with pytest.raises(RuntimeError, match="attempting to assign a gradient with dtype"):
        _thaw_after_first_step(refresh=False)


def test_refresh_unit_dtypes_lets_a_thawed_unit_reduce_in_float32():
    assert set(_thaw_after_first_step(refresh=True).values()) == {torch.float32}


def test_torch_refuses_module_to_on_fake_tensors():
    # fact 4 of docs/memory_plan.md: the plan casts by replacing tensors (phasetune.plan.simulate.to_dtype) instead
    with FakeTensorMode(), pytest.raises(RuntimeError, match=r"Couldn't swap Linear\.weight"):
        nn.Linear(4, 4).to(torch.bfloat16)


def test_to_dtype_casts_a_fake_model_and_keeps_tied_weights_tied():
    from phasetune.plan.simulate import to_dtype

    with FakeTensorMode():
        model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8))
        model[1].weight = model[0].weight  # tied, as a language model's head and embeddings
        to_dtype(model, torch.bfloat16)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert model[1].weight is model[0].weight
