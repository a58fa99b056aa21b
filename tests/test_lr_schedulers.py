"""Every lr scheduler in torch.optim.lr_scheduler keeps working when phase groups are added."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim import lr_scheduler as lrs
from torch.optim.swa_utils import SWALR

from helpers import lr_approx
from phasetune.core.param_groups import add_groups

SCHEDULERS = {
    "LambdaLR": lambda o: lrs.LambdaLR(o, lambda e: 0.9**e),
    "MultiplicativeLR": lambda o: lrs.MultiplicativeLR(o, lambda e: 0.9),
    "StepLR": lambda o: lrs.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: lrs.MultiStepLR(o, milestones=[2, 5], gamma=0.5),
    "ConstantLR": lambda o: lrs.ConstantLR(o, factor=0.5, total_iters=4),
    "LinearLR": lambda o: lrs.LinearLR(o, start_factor=0.25, total_iters=6),
    "ExponentialLR": lambda o: lrs.ExponentialLR(o, gamma=0.9),
    "PolynomialLR": lambda o: lrs.PolynomialLR(o, total_iters=10, power=2.0),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=6, eta_min=1e-4),
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=3),
    "CyclicLR": lambda o: lrs.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=0.1, total_steps=20),
    "SequentialLR": lambda o: lrs.SequentialLR(
        o, [lrs.LinearLR(o, start_factor=0.5, total_iters=2), lrs.ExponentialLR(o, gamma=0.9)], milestones=[2]
    ),
    "ChainedScheduler": lambda o: lrs.ChainedScheduler(
        [lrs.ConstantLR(o, factor=0.5, total_iters=3), lrs.ExponentialLR(o, gamma=0.9)]
    ),
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "SWALR": lambda o: SWALR(o, swa_lr=0.05, anneal_epochs=3),
}


def test_every_scheduler_in_torch_is_covered():
    in_torch = {
        name
        for name, obj in vars(lrs).items()
        if isinstance(obj, type) and issubclass(obj, (lrs.LRScheduler, lrs.ReduceLROnPlateau))
        and not name.startswith("_") and name not in ("LRScheduler",)
    }
    assert in_torch <= set(SCHEDULERS), in_torch - set(SCHEDULERS)


def run(name: str, *, split_at: int | None = None, apply_lambdas: bool = False):
    """Three steps on one group, add a group, six more steps; ``split_at`` saves and reloads (resume)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    opt = torch.optim.SGD([params[0]], lr=0.1, momentum=0.9)
    sched = SCHEDULERS[name](opt)
    lrs_seen = []

    def step(i: int) -> None:
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if isinstance(sched, lrs.ReduceLROnPlateau):
            sched.step(1.0)  # never improves: reduces every step (patience 0)
        else:
            sched.step()
        lrs_seen.append([g["lr"] for g in opt.param_groups])

    for i in range(3):
        step(i)
    add_groups(opt, [{"params": [params[1]], "lr": 0.05}], [sched], apply_lambdas_new_pgs=apply_lambdas)
    for i in range(3, 9):
        if split_at == i:
            saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
            params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt = torch.optim.SGD([params[0]], lr=0.1, momentum=0.9)
            sched = SCHEDULERS[name](opt)
            add_groups(opt, [{"params": [params[1]], "lr": 0.05}], [sched], apply_lambdas_new_pgs=apply_lambdas)
            opt.load_state_dict(saved_opt)
            sched.load_state_dict(saved_sched)
        step(i)
    return lrs_seen, sched


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_handles_an_added_group(name):
    seen, sched = run(name)
    after = [lr for _, lr in (row for row in seen[3:])]
    assert all(math.isfinite(lr) and lr > 0 for lr in after), after
    if hasattr(sched, "get_last_lr"):
        assert len(sched.get_last_lr()) == 2
    assert after != [] and len(seen[-1]) == 2


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_extended_scheduler_resumes_exactly(name):
    straight, _ = run(name)
    resumed, _ = run(name, split_at=5)
    assert resumed == straight  # exact: a resume against the uninterrupted run


def test_added_group_follows_the_schedule_from_its_own_lr():
    seen, _ = run("StepLR")  # halves every 2 steps; the group joins after step 3 (last_epoch 3) at 0.05
    # numerical: float64 lr arithmetic against decimals (lr_approx), here and below
    assert [row[1] for row in seen[3:]] == lr_approx([0.025, 0.025, 0.0125, 0.0125, 0.00625, 0.00625])


def test_lambda_schedulers_keep_new_groups_constant_unless_asked_to_apply_the_lambda():
    seen, _ = run("LambdaLR")
    assert {row[1] for row in seen[3:]} == {0.05}
    seen, _ = run("LambdaLR", apply_lambdas=True)
    assert seen[3][1] == lr_approx(0.05 * 0.9**4)


def test_plateau_min_lrs_and_onecycle_bounds_are_extended():
    _, sched = run("ReduceLROnPlateau")
    assert len(sched.min_lrs) == 2
    _, sched = run("OneCycleLR")
    g = sched.optimizer.param_groups[1]
    assert g["max_lr"] == 0.05 and g["initial_lr"] == lr_approx(0.05 / 25) and g["min_lr"] < g["initial_lr"]


def test_sequential_lr_reports_one_last_lr_per_group_after_a_group_is_added():
    # SequentialLR shares its last-lr list with the active inner scheduler: it must grow by one, not two
    w1, w2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w1], lr=0.1)
    seq = lrs.SequentialLR(opt, [lrs.ConstantLR(opt, factor=0.5, total_iters=2), lrs.ExponentialLR(opt, 0.9)],
                           milestones=[2])
    add_groups(opt, [{"params": [w2], "lr": 0.01}], [seq])
    assert len(seq.get_last_lr()) == len(opt.param_groups) == 2
    opt.step()
    seq.step()
    assert len(seq.get_last_lr()) == 2
