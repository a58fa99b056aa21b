"""phasetune.sharding.optim_state: optimizer state of some parameters only, through DCP (torch only).

A one-process gloo group: DTensors of world size 1 take the same code paths as on more ranks. The
2-process resumes right after a transition are in tests/test_fsdp2.py (Lightning) and tests/test_strategy.py
(FSDP2Strategy).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from helpers import Net
from phasetune.sharding import apply_plan
from phasetune.sharding.optim_state import (
    no_placeholder_state,
    prime_optimizer_state,
    saved_state_names,
    shaped_like_checkpoint,
)


@pytest.fixture(scope="module")
def mesh(gloo_one_rank):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (1,))


def sharded_net(mesh, thawed: tuple[str, ...]) -> Net:
    torch.manual_seed(0)
    net = Net()
    apply_plan(net, {r"layers\.\d+": {}}, mesh=mesh)
    for n, p in net.named_parameters():
        p.requires_grad_(n.startswith(thawed))
    return net


def step(net: Net, opt: torch.optim.Optimizer) -> None:
    torch.manual_seed(1)
    net(torch.randn(3, 8)).sum().backward()
    opt.step()
    opt.zero_grad()


def saved_right_after_phase_1_began(mesh, path) -> tuple[Net, torch.optim.Optimizer]:
    """Phase 0 trains the head one step; phase 1 adds layers.3; the checkpoint comes before its first step."""
    net = sharded_net(mesh, ("head",))
    opt = torch.optim.Adam(net.head.parameters(), lr=0.1)
    step(net, opt)
    for p in net.layers[3].parameters():
        p.requires_grad_(True)
    opt.add_param_group({"params": list(net.layers[3].parameters()), "lr": 0.01})
    with no_placeholder_state(opt):
        dcp.save({"optim": get_optimizer_state_dict(net, opt)}, checkpoint_id=str(path))
    return net, opt


def rebuilt_at_phase_1(mesh) -> tuple[Net, torch.optim.Optimizer]:
    net = sharded_net(mesh, ("head", "layers.3"))
    groups = [{"params": list(net.head.parameters())}, {"params": list(net.layers[3].parameters()), "lr": 0.01}]
    return net, torch.optim.Adam(groups, lr=0.1)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.detach().full_tensor() if hasattr(t, "full_tensor") else t.detach()


def test_a_checkpoint_holds_only_the_state_of_parameters_that_stepped(mesh, tmp_path):
    saved_right_after_phase_1_began(mesh, tmp_path)
    assert saved_state_names(tmp_path, "optim") == {"head.weight", "head.bias"}
    assert saved_state_names(tmp_path, "optimizer_0") == set()
    assert saved_state_names(tmp_path / "nothing", "optim") is None


def test_torch_alone_cannot_load_it_into_an_optimizer_rebuilt_at_the_same_phase(mesh, tmp_path):
    saved_right_after_phase_1_began(mesh, tmp_path)
    net, opt = rebuilt_at_phase_1(mesh)
    with pytest.raises(CheckpointException, match="Missing key in checkpoint state_dict"):  # torch primes all
        dcp.load({"optim": get_optimizer_state_dict(net, opt)}, checkpoint_id=str(tmp_path))


def test_shaped_like_the_checkpoint_it_loads_exactly_and_the_next_step_matches_the_uninterrupted_run(mesh, tmp_path):
    reference, ref_opt = saved_right_after_phase_1_began(mesh, tmp_path)
    net, opt = rebuilt_at_phase_1(mesh)
    net.load_state_dict(reference.state_dict())
    before = {n: full(p).clone() for n, p in net.named_parameters()}
    with shaped_like_checkpoint(opt, saved_state_names(tmp_path, "optim"), dict(net.named_parameters())) as fresh:
        assert fresh == list(net.layers[3].parameters()) and not any(p.requires_grad for p in fresh)
        state = {"optim": get_optimizer_state_dict(net, opt)}
        dcp.load(state, checkpoint_id=str(tmp_path))
        set_optimizer_state_dict(net, opt, state["optim"])
    assert all(p.requires_grad for p in net.layers[3].parameters())  # thawed again
    assert all(torch.equal(full(p), before[n]) for n, p in net.named_parameters())  # exact: placeholders moved nothing
    # exact: the moments loaded back as the reference saved them
    assert torch.equal(full(opt.state[net.head.weight]["exp_avg"]), full(ref_opt.state[reference.head.weight]["exp_avg"]))
    assert all(p not in opt.state for p in net.layers[3].parameters())  # fresh, as in the uninterrupted run
    step(reference, ref_opt)
    step(net, opt)  # exact: a resumed step against the uninterrupted one (same batch, same operations)
    assert all(torch.equal(full(p), full(q)) for p, q in zip(net.parameters(), reference.parameters(), strict=True))


def test_a_load_replaces_state_the_live_optimizer_had_for_parameters_without_saved_state(mesh, tmp_path):
    saved_right_after_phase_1_began(mesh, tmp_path)
    net, opt = rebuilt_at_phase_1(mesh)
    step(net, opt)  # every parameter has state now
    with shaped_like_checkpoint(opt, saved_state_names(tmp_path, "optim"), dict(net.named_parameters())):
        state = {"optim": get_optimizer_state_dict(net, opt)}
        dcp.load(state, checkpoint_id=str(tmp_path))
        set_optimizer_state_dict(net, opt, state["optim"])
    assert {n for n, p in net.named_parameters() if p in opt.state} == {"head.weight", "head.bias"}


def test_saving_a_never_stepped_optimizer_leaves_no_placeholder_state_in_it_or_the_checkpoint(mesh):
    net = sharded_net(mesh, ("head",))
    opt = torch.optim.Adam(net.head.parameters(), lr=0.1)
    with no_placeholder_state(opt):
        saved = get_optimizer_state_dict(net, opt)
    assert saved["state"] == {} and not opt.state and all(p.requires_grad for p in net.head.parameters())
    get_optimizer_state_dict(net, opt)  # what torch does unguarded: a zero-lr step for every trainable parameter
    assert len(opt.state) == 2


def test_priming_creates_only_missing_state_and_moves_nothing():
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([a], lr=0.1, weight_decay=0.1)
    a.grad = torch.ones(3)
    opt.step()
    opt.add_param_group({"params": [b], "lr": 0.1})
    a_state = {k: v.clone() for k, v in opt.state[a].items()}
    before = a.detach().clone(), b.detach().clone()
    a.grad = torch.full((3,), 5.0)
    assert prime_optimizer_state(opt, [a, b]) == 1
    assert set(opt.state[b]) == {"step", "exp_avg", "exp_avg_sq"}
    assert all(torch.equal(opt.state[a][k], v) for k, v in a_state.items())  # exact: untouched, as below
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert torch.equal(a.grad, torch.full((3,), 5.0)) and b.grad is None  # gradients as they were
    assert opt.param_groups[1]["lr"] == 0.1
