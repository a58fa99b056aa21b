"""WarmupLinearDecay: the per-phase lr shape (warm-up, then linear decay), restarting at each transition."""

from __future__ import annotations

import pytest
import torch

from helpers import Net, lr_approx
from phasetune import ScheduledFinetuning, generate_schedule
from phasetune.core.param_groups import add_groups
from phasetune.core.recipes import phase_lr_shape
from phasetune.lr_shapes import WarmupLinearDecay


def sgd(*lrs: float) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in lrs]
    return torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)]), params


def lrs_over(sched: WarmupLinearDecay, steps: int) -> list[list[float]]:
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in sched.optimizer.param_groups])
        sched.optimizer.step()
        sched.step()
    return seen


def test_warms_up_linearly_then_decays_linearly_to_zero():
    opt, _ = sgd(1.0, 0.1)
    seen = lrs_over(WarmupLinearDecay(opt, total_steps=6, warmup_steps=2), 8)
    # numerical, the lrs of this module against decimals: float64 arithmetic (lr_approx)
    assert [row[0] for row in seen] == lr_approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    assert [row[1] for row in seen] == lr_approx([x / 10 for x in (1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0)])


def test_without_warmup_starts_at_the_peak_and_end_factor_sets_the_floor():
    opt, _ = sgd(1.0)
    seen = lrs_over(WarmupLinearDecay(opt, total_steps=4, end_factor=0.2), 6)
    assert [row[0] for row in seen] == lr_approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.2])  # numerical (lr_approx)


def test_a_group_added_mid_shape_follows_it_from_its_own_lr():
    opt, _ = sgd(1.0)
    sched = WarmupLinearDecay(opt, total_steps=6, warmup_steps=2)
    lrs_over(sched, 3)  # t = 3: factor 0.75
    add_groups(opt, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.4}], [sched])
    assert opt.param_groups[1]["lr"] == 0.4  # keeps its lr until the next step
    seen = lrs_over(sched, 3)
    assert [row[1] for row in seen[1:]] == lr_approx([0.4 * 0.5, 0.4 * 0.25])  # numerical (lr_approx)
    assert sched.get_last_lr()[1] == lr_approx(0.4 * 0.0)


def test_state_dict_resumes_exactly():
    opt, _ = sgd(1.0)
    straight = lrs_over(WarmupLinearDecay(opt, total_steps=7, warmup_steps=3), 7)
    opt, _ = sgd(1.0)
    first = WarmupLinearDecay(opt, total_steps=7, warmup_steps=3)
    head = lrs_over(first, 4)
    opt2, _ = sgd(1.0)
    second = WarmupLinearDecay(opt2, total_steps=7, warmup_steps=3)  # built first, then both states loaded
    opt2.load_state_dict(opt.state_dict())
    second.load_state_dict(first.state_dict())
    assert [r[0] for r in head + lrs_over(second, 3)] == [r[0] for r in straight]  # exact: the same arithmetic


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"total_steps": 0}, "total_steps must be an integer >= 1"),
    ({"total_steps": 4, "warmup_steps": 4}, r"warmup_steps \(4\) must be less than total_steps \(4\)"),
    ({"total_steps": 4, "warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
    ({"total_steps": 4, "end_factor": 1.5}, r"end_factor must be a number in \[0, 1\]"),
])
def test_bad_arguments_say_which_and_why(kwargs, message):
    opt, _ = sgd(1.0)
    with pytest.raises(ValueError, match=message):
        WarmupLinearDecay(opt, **kwargs)


def test_phase_lr_shape_warms_up_for_a_fraction_of_the_phase():
    assert phase_lr_shape(40, 0.1) == {"total_steps": 40, "warmup_steps": 4}
    assert phase_lr_shape(1, 0.5) == {"total_steps": 1, "warmup_steps": 0}


def test_the_shape_restarts_at_each_transition_in_a_scheduled_run():
    torch.manual_seed(0)
    model = Net(n_layers=1)  # phases: head; layers.0; embed
    schedule = generate_schedule(model, "discriminative", lr=0.1, lr_decay=0.5, phase_steps=[2, 3, 2],
                                 warmup_fraction=0.34, steps_per_epoch=1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = WarmupLinearDecay(opt, **phase_lr_shape(2, 0.34))
    ft = ScheduledFinetuning(schedule, model, opt, sched, epoch_transitions_only=True, restore_best=False)
    seen = []
    for step in range(7):
        seen.append([g["lr"] for g in ft.optimizer.param_groups])
        model(torch.randn(4, 8)).sum().backward()
        ft.optimizer.step()
        ft.lr_scheduler.step()
        ft.optimizer.zero_grad()
        ft.step(step)
    # phase 0 (head, lr 1.0): 1 warm-up step of 2; phase 1 (+layers.0 at 0.1): 1 of 3; phase 2 (+embed at 0.05): 1 of 2
    expected = [
        [0.5], [1.0],
        [0.5, 0.05], [1.0, 0.1], [0.5, 0.05],
        [0.5, 0.05, 0.025], [1.0, 0.1, 0.05],
    ]
    assert [len(row) for row in seen] == [len(row) for row in expected]
    assert [lr for row in seen for lr in row] == lr_approx([lr for row in expected for lr in row])  # numerical
    assert ft.depth == 2  # the final phase
