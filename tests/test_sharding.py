"""phasetune.sharding without Lightning: fsdp_plan parsing/matching/applying, homogeneous groups, global-norm clipping.

Sharding needs a process group; these tests use a one-process gloo group (DTensors of world size 1 take
the same code paths). Real two-process behaviour is covered by tests/test_fsdp2.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import Net, float32_drift
from phasetune import ConfigurationError
from phasetune.sharding import (
    apply_plan,
    clip_grad_norm_,
    grad_norm,
    logical_name,
    match_plan,
    param_units,
    parse_plan,
    root_name,
    split_groups,
    split_optimizer_groups,
)


@pytest.fixture(scope="module")
def pg(gloo_one_rank):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))


class Wrapper(nn.Module):
    """A LightningModule-like holder: every parameter lives under ``model``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# ------------------------------------------------------------------------------------------------ parsing


def test_parse_plan_reports_every_bad_entry_at_once():
    with pytest.raises(ConfigurationError) as e:
        parse_plan(
            {
                "model.head": {"reshard_after_forwards": True},
                "model.layers.0": {"act_ckpt": "sometimes"},
                "model.embed": {"cpu_offload_policy": {}, "offload_policy": None},
                "model.layers.(": {},
            },
            {"act_ckpt": ["wrapped_offload", {"x": 1}]},
        )
    msg = str(e.value)
    assert "'reshard_after_forwards' is not a fully_shard argument" in msg
    assert "act_ckpt mode 'sometimes' is not one of composable, wrapped, wrapped_offload" in msg
    assert "give either cpu_offload_policy or offload_policy" in msg
    assert "'model.layers.(' is neither a module name nor a valid regex" in msg
    assert "fsdp_default_kwargs: act_ckpt 'wrapped_offload' takes no kwargs" in msg


def test_entry_kwargs_win_over_defaults_and_aliases_become_policies():
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    (entry,) = parse_plan(
        {"model.head": {"reshard_after_forward": False, "cpu_offload_policy": {"pin_memory": False}, "act_ckpt": None}},
        {"reshard_after_forward": True, "act_ckpt": "composable", "mp_policy": {"param_dtype": "bfloat16"}},
    )
    assert entry.shard_kwargs["reshard_after_forward"] is False
    assert entry.shard_kwargs["offload_policy"] == CPUOffloadPolicy(pin_memory=False)
    assert entry.shard_kwargs["mp_policy"] == MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    assert entry.act_ckpt is None


# ------------------------------------------------------------------------------------------------ matching


def test_match_plan_names_entries_that_match_nothing_with_suggestions():
    entries = parse_plan({"model.heads": {}, r"model\.blocks\.\d+": {}})
    with pytest.raises(ConfigurationError) as e:
        match_plan(Wrapper(), entries)
    msg = str(e.value)
    assert "fsdp_plan entry 'model.heads' matches no module of Wrapper; did you mean 'model.head'" in msg
    assert "fsdp_plan entry 'model\\.blocks\\.\\d+' matches no module" in msg


def test_match_plan_rejects_module_list_containers_and_suggests_their_items():
    with pytest.raises(ConfigurationError) as e:
        match_plan(Wrapper(), parse_plan({"model.layers": {}}))
    assert "ModuleList 'model.layers', a container that has no forward" in str(e.value)
    assert "shard its items instead, e.g. 'model\\.layers\\.\\d+'" in str(e.value)


def test_match_plan_rejects_an_outer_module_listed_before_an_inner_one():
    with pytest.raises(ConfigurationError, match=r"'model\.layers\.0', which lies inside 'model' sharded before it"):
        match_plan(Wrapper(), parse_plan({"model": {}, "model.layers.0": {}}))


def test_match_plan_orders_regex_matches_inner_first():
    ((_, names),) = match_plan(Wrapper(), parse_plan({r"model(\.layers\.[01])?": {}}))
    assert names == ["model.layers.0", "model.layers.1", "model"]


def test_logical_names_and_root():
    assert logical_name("model.layers.0._checkpoint_wrapped_module.lin.weight") == "model.layers.0.lin.weight"
    assert root_name(Wrapper()) == "model"
    assert root_name(Net()) == ""


# ------------------------------------------------------------------------------------------------ applying


def test_apply_plan_shards_in_order_then_the_root_and_keeps_logical_names(pg):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule

    m = Wrapper()
    before = [n for n, _ in m.named_parameters()]
    report = apply_plan(
        m,
        {r"model\.layers\.\d+": {"act_ckpt": "wrapped"}, "model.head": {"act_ckpt": "composable"}},
        mesh=pg,
        default_kwargs={"reshard_after_forward": False},
    )
    assert report.sharded == ["model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3", "model.head", "model"]
    assert report.root == "model"
    assert all(isinstance(layer, CheckpointWrapper) and isinstance(layer, FSDPModule) for layer in m.model.layers)
    assert [logical_name(n) for n, _ in m.named_parameters()] == before
    units = param_units(m)
    assert units["model.layers.2.lin.weight"] == "model.layers.2"
    assert units["model.embed.weight"] == "model"  # left to the root unit
    out = m(torch.randn(4, 8))
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


class OnlyBlocks(nn.Module):
    """Every parameter inside a ModuleList, which is never called itself."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_the_root_unit_is_a_module_that_is_called_not_a_bare_module_list(pg):
    assert root_name(OnlyBlocks()) == ""
    outer = nn.Sequential(OnlyBlocks())
    assert root_name(outer) == "0"
    m = OnlyBlocks()
    report = apply_plan(m, {r"layers\.0": {}}, mesh=pg)
    assert report.sharded == ["layers.0", ""]  # the model: FSDP2's root hooks run when it is called
    m(torch.randn(4, 8)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_apply_plan_skips_modules_already_sharded_with_a_note(pg):
    from torch.distributed.fsdp import fully_shard

    m = Wrapper()
    fully_shard(m.model.head, mesh=pg)
    report = apply_plan(m, {"model.head": {}, "model.embed": {}}, mesh=pg)
    assert report.sharded == ["model.embed", "model"]
    assert report.notes == ["'model.head' was already sharded by configure_model; fsdp_plan entry 'model.head' skipped it"]


# ------------------------------------------------------------------------------------------------ groups


def _dtensor(t: torch.Tensor, mesh) -> torch.Tensor:
    from torch.distributed.tensor import Replicate, distribute_tensor

    return nn.Parameter(distribute_tensor(t, mesh, [Replicate()] * mesh.ndim))


def test_split_groups_makes_each_group_one_dtype_and_one_mesh(pg):
    from torch.distributed.device_mesh import init_device_mesh

    mesh2d = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    a, b = _dtensor(torch.ones(2), pg), _dtensor(torch.ones(3), pg)
    c = _dtensor(torch.ones(2), mesh2d)
    d = nn.Parameter(torch.ones(2))
    e = nn.Parameter(torch.ones(2, dtype=torch.float64))
    names = {id(a): "a", id(b): "b", id(c): "c", id(d): "d", id(e): "e"}
    groups, notes = split_groups([{"params": [a, c, d, b, e], "lr": 0.1, "ft_phase": 2}, {"params": [d], "lr": 1.0}], names)
    assert [[names[id(p)] for p in g["params"]] for g in groups] == [["a", "b"], ["c"], ["d"], ["e"], ["d"]]
    assert all(g["lr"] == 0.1 and g["ft_phase"] == 2 for g in groups[:4])
    assert len(notes) == 1
    assert notes[0].startswith("group 0 mixed float32 DTensors on mesh ('dp',)(1,) (e.g. 'a'); float32 DTensors on mesh")
    assert "plain float32 tensors (e.g. 'd'); plain float64 tensors (e.g. 'e'); split into 4 groups" in notes[0]


def test_split_optimizer_groups_appends_the_extra_kinds_and_extends_the_scheduler(pg):
    a, d = _dtensor(torch.ones(2), pg), nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [a, d], "lr": 0.5}], lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    notes = split_optimizer_groups(opt, [sched])
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    assert sched.base_lrs == [0.5, 0.5]
    assert len(notes) == 1 and "optimizer group 0 mixed" in notes[0]


# ------------------------------------------------------------------------------------------------ clipping


@pytest.mark.numerical
def test_global_norm_spans_meshes_and_plain_tensors_and_clips_like_the_unsharded_model(pg):
    from torch.distributed.device_mesh import init_device_mesh

    mesh2d = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    grads = [torch.randn(3), torch.randn(4), torch.randn(2)]
    params = [_dtensor(torch.zeros(3), pg), _dtensor(torch.zeros(4), mesh2d), nn.Parameter(torch.zeros(2))]
    params[0].grad = _dtensor(grads[0], pg).data
    params[1].grad = _dtensor(grads[1], mesh2d).data
    params[2].grad = grads[2].clone()
    with pytest.raises((RuntimeError, ValueError, NotImplementedError)):  # what this module exists for
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    ref = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(ref, grads):
        p.grad = g.clone()
    expected = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    # numerical: per-mesh sums of squares against one sum of the 9 elements (9 roundings); the clipped gradients
    # add the coefficient's division and their product's rounding
    norm_tol, clipped_tol = float32_drift(1, 9), float32_drift(1, 11)
    torch.testing.assert_close(grad_norm(params), expected, rtol=norm_tol, atol=0)
    total = clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(total, expected, rtol=norm_tol, atol=0)
    got = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in params]
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r.grad, rtol=clipped_tol, atol=0)
    largest = torch.stack([r.grad.abs().max() for r in ref]).max()
    torch.testing.assert_close(grad_norm(params, float("inf")), largest, rtol=clipped_tol, atol=0)


# ------------------------------------------------------------------------------------------------ snapshots


def _sharded_net(mesh, thawed: tuple[str, ...]) -> Net:
    torch.manual_seed(0)
    net = Net()
    apply_plan(net, {r"layers\.\d+": {}}, mesh=mesh)
    for n, p in net.named_parameters():
        p.requires_grad_(n.startswith(thawed))
    return net


def test_snapshots_of_sharded_parameters_hold_local_shards_and_restore_dtensor_state(pg):
    from phasetune.features.snapshots import Snapshot, restore_snapshot, take_snapshot

    net = _sharded_net(pg, ("head",))
    params = dict(net.head.named_parameters())
    opt = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)
    net(torch.randn(3, 8)).sum().backward()
    opt.step()
    snap = take_snapshot(depth=0, epoch=0, step=1, value=1.0, params=params, buffers={}, optimizer=opt)
    assert all(type(t) is torch.Tensor for t in snap.params.values())
    assert snap.optimizer_dtensors == {"weight": ["momentum_buffer"], "bias": ["momentum_buffer"]}
    expected = {n: p.detach().full_tensor().clone() for n, p in params.items()}
    snap = Snapshot.from_state(snap.to_state())
    net(torch.randn(3, 8)).sum().backward()
    opt.step()
    assert restore_snapshot(snap, params=params, buffers={}, optimizer=opt) == []
    assert all(torch.equal(p.detach().full_tensor(), expected[n]) for n, p in params.items())  # exact: restored copies
    assert type(opt.state[params["weight"]]["momentum_buffer"]).__name__ == "DTensor"
    opt.step()  # the restored state works with the sharded parameters


# ------------------------------------------------------------------------------------------------ docs


def _tested_blocks(path: str) -> list[str]:
    """Python blocks of a doc that a ``<!-- tested`` comment precedes."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / path).read_text()
    return re.findall(r"<!-- tested.*?-->\n```python\n(.*?)```", text, flags=re.S)


def test_docs_fsdp2_examples_are_the_tested_configurations_and_run(pg):
    import warnings

    from fsdp2_models import ACT_CKPT_DEFAULTS, ACT_CKPT_PLAN, PLAN, SCHEDULE

    lightning_example, act_ckpt_example, plain_example = _tested_blocks("docs/fsdp2.md")
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(lightning_example, ns)
    assert ns["schedule"] == SCHEDULE and ns["fsdp_plan"] == PLAN
    assert ns["fts"].strategy_adapter_cfg == {"fsdp_plan": PLAN}
    ns = {}
    exec(act_ckpt_example, ns)
    assert ns["strategy_adapter_cfg"] == {"fsdp_plan": ACT_CKPT_PLAN, "fsdp_default_kwargs": ACT_CKPT_DEFAULTS}
    ns = {}
    exec(plain_example, ns)
    assert ns["total_norm"] > 0
