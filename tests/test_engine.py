"""The phase engine, parameter groups, thawing and snapshots, without a Trainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import SCHEDULE_3, Net, lr_approx
from phasetune import PhaseEngine, resolve_schedule
from phasetune.core.param_groups import PHASE_KEY
from phasetune.core.thaw import apply_frozen_batchnorm_mode
from phasetune.features.snapshots import Snapshot, restore_snapshot, take_snapshot


class Wrapped(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.model = Net(**kw)


def make(schedule=SCHEDULE_3, **kw):
    module = Wrapped()
    params = dict(module.named_parameters())
    sched = resolve_schedule(schedule, list(params))
    return module, params, PhaseEngine(sched, params, **kw)


def trainable(params):
    return {n for n, p in params.items() if p.requires_grad}


def test_start_freezes_everything_but_phase_zero():
    _, params, engine = make()
    engine.start()
    assert trainable(params) == {"model.head.weight", "model.head.bias"}
    assert engine.depth == 0 and engine.final_depth == 2 and engine.depth_remaining == 2


def test_advance_thaws_cumulatively_and_adds_tagged_groups_with_the_phase_lr():
    _, params, engine = make()
    engine.start()
    opt = torch.optim.SGD([p for p in params.values() if p.requires_grad], lr=0.1, momentum=0.9)
    engine.prepare_optimizer(opt)
    t = engine.advance(opt)
    assert t.depth == 1 and t.lr == 0.05 and t.groups_added == 1
    assert len(t.thawed) == 8
    assert trainable(params) == set(engine.schedule.params_through(1))
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.05]
    assert [g[PHASE_KEY] for g in opt.param_groups] == [0, 1]
    assert opt.param_groups[1]["momentum"] == 0.9  # the user's hyperparameters carry over
    engine.advance(opt)
    assert trainable(params) == set(params)
    with pytest.raises(RuntimeError, match="already at the final phase"):
        engine.advance(opt)


def test_max_depth_caps_the_phases_run():
    _, _, engine = make(max_depth=1)
    assert engine.final_depth == 1
    _, _, engine = make(max_depth=7)
    assert engine.final_depth == 2
    with pytest.raises(ValueError, match="max_depth"):
        make(max_depth=-2)


def test_base_lr_none_is_a_tenth_of_phase_zero_lr():
    sched = {0: {"params": ["model.head.*"]}, 1: {"params": ["model.embed.*"]}}
    _, params, engine = make(sched, base_lr=None)
    engine.start()
    opt = torch.optim.SGD([params["model.head.weight"], params["model.head.bias"]], lr=0.3)
    engine.prepare_optimizer(opt)
    assert engine.advance(opt).lr == lr_approx(0.03)  # numerical: 0.3 * 0.1 in float64 against a decimal


def test_phase_groups_follow_the_users_grouping_and_no_decay():
    _, params, engine = make(no_decay=["bias", "norm.weight"])
    engine.start()
    decay = [p for n, p in params.items() if "bias" not in n]
    no_decay = [p for n, p in params.items() if "bias" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "betas": (0.8, 0.9)}], lr=1e-3
    )
    engine.prepare_optimizer(opt)
    # phase 0 (head.weight in group 0, head.bias in group 1) keeps both user groups
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    engine.advance(opt)
    added = opt.param_groups[2:]
    # phase 1: user group 0 split by no_decay (lin.weight decays; norm.weight does not), user group 1 (biases)
    assert [(len(g["params"]), g["weight_decay"]) for g in added] == [(2, 0.1), (2, 0.0), (4, 0.0)]
    assert added[2]["betas"] == (0.8, 0.9)
    assert all(g["lr"] == 0.05 and g[PHASE_KEY] == 1 for g in added)


def test_enforce_phase0_restricts_the_optimizer_and_reports_what_changed():
    _, params, engine = make()
    engine.start()
    opt = torch.optim.SGD(list(params.values()), lr=0.1)  # every parameter, frozen ones included
    report = engine.prepare_optimizer(opt, enforce=True)
    assert len(report.extra) == len(params) - 2 and report.missing == []
    assert [len(g["params"]) for g in opt.param_groups] == [2]
    engine.advance(opt)  # no "parameter appears in more than one group" error
    assert len(opt.param_groups) == 2


def test_without_enforcement_the_optimizer_is_left_alone_and_later_phases_skip_held_params():
    _, params, engine = make()
    engine.start()
    opt = torch.optim.SGD(list(params.values()), lr=0.1)
    report = engine.prepare_optimizer(opt, enforce=False)
    assert report.changed
    t = engine.advance(opt)
    assert t.groups_added == 0 and len(t.already_in_optimizer) == 8


def test_missing_phase0_params_join_group_zero():
    _, params, engine = make()
    engine.start()
    opt = torch.optim.SGD([params["model.head.weight"]], lr=0.1)
    report = engine.prepare_optimizer(opt)
    assert report.missing == ["model.head.bias"]
    assert len(opt.param_groups[0]["params"]) == 2


def test_replay_reaches_the_same_group_structure_as_live_transitions():
    def run(replay: bool):
        _, params, engine = make()
        engine.start()
        opt = torch.optim.SGD([p for p in params.values() if p.requires_grad], lr=0.1)
        engine.prepare_optimizer(opt)
        if replay:
            engine.replay(2, opt, [])
        else:
            engine.advance(opt)
            engine.advance(opt)
        return [(g["lr"], g[PHASE_KEY], len(g["params"])) for g in opt.param_groups]

    assert run(True) == run(False) == [(0.1, 0, 2), (0.05, 1, 8), (0.02, 2, 10)]


def test_frozen_batchnorm_keeps_tracking_by_default_and_can_be_put_in_eval():
    module = Wrapped(batchnorm=True)
    params = dict(module.named_parameters())
    engine = PhaseEngine(resolve_schedule(SCHEDULE_3, list(params)), params)
    engine.start()
    module.train()
    assert apply_frozen_batchnorm_mode(module, track_running_stats=True) == []
    assert module.model.layers[0].norm.training
    evaluated = apply_frozen_batchnorm_mode(module, track_running_stats=False)
    assert evaluated == [f"model.layers.{i}.norm" for i in range(4)]
    before = module.model.layers[0].norm.running_mean.clone()
    module.model(torch.randn(4, 8))
    assert torch.equal(module.model.layers[0].norm.running_mean, before)  # exact: a frozen statistic is not written
    engine.advance(torch.optim.SGD([params["model.head.weight"]], lr=0.1))
    assert apply_frozen_batchnorm_mode(module, track_running_stats=False) == ["model.layers.0.norm", "model.layers.1.norm"]
    assert module.model.layers[3].norm.training


def test_snapshot_restores_trainable_params_optimizer_and_scheduler_state_exactly():
    module, params, engine = make()
    module.model.layers[0].norm = nn.BatchNorm1d(16)  # a buffer that moves
    params = dict(module.named_parameters())
    engine = PhaseEngine(resolve_schedule(SCHEDULE_3, list(params)), params)
    engine.start()
    opt = torch.optim.Adam([p for p in params.values() if p.requires_grad], lr=0.01)
    engine.prepare_optimizer(opt)
    engine.advance(opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)

    def step():
        loss = module.model(torch.randn(8, 8)).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    step()
    buffers = dict(module.named_buffers())
    snap = take_snapshot(depth=1, epoch=0, step=1, value=0.5, params=engine.trainable(), buffers=buffers,
                         optimizer=opt, schedulers=[sched])
    expected_params = {n: p.detach().clone() for n, p in params.items()}
    expected_state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    expected_buffers = {n: b.clone() for n, b in buffers.items()}
    expected_lrs = [g["lr"] for g in opt.param_groups]
    for _ in range(3):
        step()
    # the snapshot is plain tensors and numbers: it survives torch.save / weights_only loading
    buf = __import__("io").BytesIO()
    torch.save(snap.to_state(), buf)
    buf.seek(0)
    snap = Snapshot.from_state(torch.load(buf, weights_only=True))
    assert restore_snapshot(snap, params=engine.trainable(), buffers=buffers, optimizer=opt, schedulers=[sched]) == []
    for n, p in params.items():  # exact, here and below: restored copies of the snapshot
        assert torch.equal(p, expected_params[n]), n
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, expected_state[id(p)][k])
    for n, b in buffers.items():
        assert torch.equal(b, expected_buffers[n]), n
    assert [g["lr"] for g in opt.param_groups] == expected_lrs
    assert sched.last_epoch == 1
    frozen_bytes = sum(p.numel() * 4 for n, p in params.items() if n not in engine.trainable())
    assert snap.nbytes < sum(p.numel() * 4 for p in params.values()) * 3 - frozen_bytes


def test_import_phasetune_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, phasetune; "
        "heavy = [m for m in ('lightning', 'torch.distributed.checkpoint', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy; "
        "assert set(phasetune.__all__) <= set(dir(phasetune)); "
        "from phasetune import FSDP2Strategy, ScheduledFinetuning"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
