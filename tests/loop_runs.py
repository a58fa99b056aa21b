"""The plain training loop (ScheduledFinetuning over the toy network) that the front-end tests compare with:
the Lightning callback (tests/test_run_core.py, tests/test_steps.py), the Hugging Face Trainer (tests/test_hf_parity.py)
and 2 DDP processes (tests/distributed/step_scenarios.py) run the same schedules and must follow its trajectory.

Two loops: :func:`epoch_loop_run` (the MIXED schedule, phases ended by early stopping and by epochs) and
:func:`step_loop_run` (phases capped in optimizer steps). SGD with momentum at lr 0.1, 4 unshuffled batches of 16
an epoch, the scripted val loss after each epoch.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from helpers import ToyModule, dataset
from phasetune.core.param_groups import PHASE_KEY
from phasetune.loop import ScheduledFinetuning

#: the scripted val_loss by epoch of the MIXED runs (the last value repeats)
MIXED_VAL_LOSSES = [1.0, 0.9, 0.95, 0.96, 0.8, 0.85, 0.86, 0.5, 0.6, 0.7]
MIXED = {  # phase 0 ends by early stopping, phase 1 by its max_transition_epoch, phase 2 by early stopping
    0: {"params": ["model.head.*"]},
    1: {"params": [r"model\.layers\.3\..*", r"model\.layers\.2\..*"], "lr": 0.05, "max_transition_epoch": 6},
    2: {"params": [r"model\.layers\.[01]\..*", "model.embed.*"], "lr": 0.02},
}

#: val_loss by epoch of the step-capped runs (4 epochs of 4 steps)
STEP_VAL_LOSSES = [1.0, 0.9, 0.95, 0.96]


def shape(total: int, warmup: int = 1) -> dict:
    """A phase's ``new_lr_scheduler``: a linear warm-up of ``warmup`` steps, then a linear decay to ``total``."""
    return {"lr_scheduler_init": {"class_path": "phasetune.lr_shapes.WarmupLinearDecay",
                                  "init_args": {"total_steps": total, "warmup_steps": warmup}},
            "pl_lrs_cfg": {"interval": "step"}}


#: 4 steps an epoch: phase 0 ends mid epoch 1, phase 1 mid epoch 2; each later phase restarts its lr shape
STEPS = {
    0: {"params": ["model.head.*"], "max_transition_step": 6},
    1: {"params": [r"model\.layers\.3\..*", r"model\.layers\.2\..*"], "lr": 0.05, "max_transition_step": 11,
        "new_lr_scheduler": shape(5)},
    2: {"params": [r"model\.layers\.[01]\..*", "model.embed.*"], "lr": 0.02, "new_lr_scheduler": shape(5)},
}

#: phase 0 brings its own lr shape; phase 2 a new optimizer (SGD) whose groups restart at their creation lr
RESTARTS = {
    0: {"params": ["model.head.*"], "max_transition_step": 4, "new_lr_scheduler": shape(4)},
    1: {"params": [r"model\.layers\.3\..*"], "lr": 0.05, "max_transition_step": 8, "new_lr_scheduler": shape(4)},
    2: {"params": ["model.embed.*"], "lr": 0.02, "new_lr_scheduler": shape(4),
        "new_optimizer": {"optimizer_init": {"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.9}}}},
}


def trajectory_point(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    """What trains next: the thawed names, and each param group's (phase, size, lr)."""
    thawed = tuple(sorted(n for n, p in module.named_parameters() if p.requires_grad))
    return thawed, tuple((g.get(PHASE_KEY, 0), len(g["params"]), round(g["lr"], 12)) for g in optimizer.param_groups)


Record = Callable[[nn.Module, torch.optim.Optimizer], Any]


def epoch_loop_run(record: Record = trajectory_point, **ft_kwargs: Any) -> tuple[ToyModule, ScheduledFinetuning, list]:
    """MIXED for up to 12 epochs; the module, the ScheduledFinetuning and ``record``'s value at each epoch start."""
    torch.manual_seed(0)
    module = ToyModule(val_losses=MIXED_VAL_LOSSES, lr=0.1)  # used as a plain nn.Module: same init, same names
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    ft = ScheduledFinetuning(MIXED, module, opt, patience=2, **ft_kwargs)
    x, y = dataset(64, 0).tensors
    epochs = []
    for epoch in range(12):
        epochs.append(record(module, ft.optimizer))
        module.train()
        for i in range(0, 64, 16):
            ft.optimizer.zero_grad()
            nn.functional.cross_entropy(module(x[i:i + 16]), y[i:i + 16]).backward()
            ft.optimizer.step()
        ft.step(epoch, metric=MIXED_VAL_LOSSES[min(epoch, len(MIXED_VAL_LOSSES) - 1)])
        if ft.done:
            break
    return module, ft, epochs


def step_loop_run(schedule: dict = STEPS, steps: int = 16, save_at: int | None = None, resume: bytes | None = None,
                  watch: Callable | None = None, record: Record = trajectory_point,
                  **kw: Any) -> tuple[ToyModule, ScheduledFinetuning, list, bytes | None]:
    """``schedule`` for ``steps`` optimizer steps (from a state :func:`step_loop_run` saved, if ``resume``); the
    module, the ScheduledFinetuning, ``record``'s value before each step, and the state saved after step
    ``save_at``."""
    torch.manual_seed(0)
    module = ToyModule(lr=0.1)
    ft = ScheduledFinetuning(schedule, module, torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9),
                             patience=2, **kw)
    if watch is not None:
        ft.run.add_step_watch(watch)
    start, saved, trajectory = 0, None, []
    if resume is not None:
        state = torch.load(io.BytesIO(resume), weights_only=True)
        ft.load_state_dict(state["ft"])
        module.load_state_dict(state["model"])
        ft.optimizer.load_state_dict(state["opt"])
        if state["sched"] is not None:
            ft.lr_scheduler.load_state_dict(state["sched"])
        start = state["step"]
    x, y = dataset(64, 0).tensors
    for step in range(start, steps):
        trajectory.append(record(module, ft.optimizer))
        i = (step % 4) * 16
        ft.optimizer.zero_grad()
        nn.functional.cross_entropy(module(x[i:i + 16]), y[i:i + 16]).backward()
        ft.optimizer.step()
        if ft.lr_scheduler is not None:
            ft.lr_scheduler.step()
        ft.step_end()
        if step + 1 == save_at:
            buf = io.BytesIO()
            torch.save({"ft": ft.state_dict(), "model": module.state_dict(), "opt": ft.optimizer.state_dict(),
                        "sched": ft.lr_scheduler.state_dict() if ft.lr_scheduler else None, "step": step + 1}, buf)
            saved = buf.getvalue()
        if (step + 1) % 4 == 0:
            epoch = step // 4
            ft.step(epoch, metric=STEP_VAL_LOSSES[epoch])
    return module, ft, trajectory, saved
