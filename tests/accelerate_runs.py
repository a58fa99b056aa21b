"""The loops of tests/loop_runs.py through AcceleratedFinetuning: the same model, optimizer, schedules and batches,
with an ``accelerate.Accelerator`` on one process (tests/test_accelerate.py compares them with the plain loop) or on
each of 2 DDP processes (tests/distributed/accelerate_scenarios.py, where each rank trains on half of every batch).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from helpers import ToyModule, dataset
from loop_runs import MIXED, MIXED_VAL_LOSSES, STEP_VAL_LOSSES, STEPS, Record, trajectory_point
from phasetune.loop.accelerated import AcceleratedFinetuning


def build(schedule: dict, accelerator: Accelerator | None = None, val_losses: list[float] | None = None,
          front_end: type[AcceleratedFinetuning] = AcceleratedFinetuning,
          **kw: Any) -> tuple[ToyModule, AcceleratedFinetuning]:
    """loop_runs' model and optimizer (SGD with momentum at lr 0.1, seed 0) under an AcceleratedFinetuning."""
    torch.manual_seed(0)
    module = ToyModule(val_losses=val_losses, lr=0.1)  # used as a plain nn.Module: same init, same names
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    return module, front_end(schedule, accelerator or Accelerator(cpu=True), module, opt, patience=2, **kw)


def train_step(ft: AcceleratedFinetuning, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimizer step on this rank's share of the batch (all of it on one process)."""
    acc = ft.accelerator
    xb, yb = x[acc.process_index::acc.num_processes], y[acc.process_index::acc.num_processes]
    acc.backward(nn.functional.cross_entropy(ft.model(xb), yb))
    ft.optimizer.step()
    if ft.lr_scheduler is not None:
        ft.lr_scheduler.step()
    ft.optimizer.zero_grad()
    ft.step_end()


def step_run(schedule: dict = STEPS, steps: int = 16, save_at: int | None = None, save_dir: Path | None = None,
             resume: Path | None = None, accelerator: Accelerator | None = None, record: Record = trajectory_point,
             watch: Callable | None = None, **kw: Any) -> tuple[ToyModule, AcceleratedFinetuning, list]:
    """loop_runs.step_loop_run: ``schedule`` for ``steps`` optimizer steps of 16 samples, the val loss after every 4
    (from ``accelerator.load_state(resume)`` if given); ``accelerator.save_state(save_dir)`` after step ``save_at``
    (and its epoch end). The module, the AcceleratedFinetuning and ``record``'s value before each step."""
    module, ft = build(schedule, accelerator, **kw)
    if watch is not None:
        ft.run.add_step_watch(watch)
    if resume is not None:
        ft.accelerator.load_state(str(resume))
    x, y = dataset(64, 0).tensors
    trajectory = []
    for step in range(ft.global_step or 0, steps):
        trajectory.append(record(module, ft.optimizer))
        i = (step % 4) * 16
        train_step(ft, x[i:i + 16], y[i:i + 16])
        if (step + 1) % 4 == 0:
            ft.step(step // 4, metric=STEP_VAL_LOSSES[step // 4])
        if step + 1 == save_at:
            ft.accelerator.save_state(str(save_dir))
    return module, ft, trajectory


def epoch_run(record: Record = trajectory_point, **kw: Any) -> tuple[ToyModule, AcceleratedFinetuning, list]:
    """loop_runs.epoch_loop_run: MIXED for up to 12 epochs of 4 batches, the scripted val loss after each; the
    module, the AcceleratedFinetuning and ``record``'s value at each epoch start."""
    module, ft = build(MIXED, val_losses=MIXED_VAL_LOSSES, **kw)
    x, y = dataset(64, 0).tensors
    epochs = []
    for epoch in range(12):
        epochs.append(record(module, ft.optimizer))
        for i in range(0, 64, 16):
            train_step(ft, x[i:i + 16], y[i:i + 16])
        ft.step(epoch, metric=MIXED_VAL_LOSSES[min(epoch, len(MIXED_VAL_LOSSES) - 1)])
        if ft.done:
            break
    return module, ft, epochs
