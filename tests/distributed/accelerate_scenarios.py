"""2-process DDP runs (gloo, CPU) of AcceleratedFinetuning, run by tests/test_accelerate.py under torchrun (Accelerate
reads torchrun's environment, as under ``accelerate launch``): the step-capped schedule with each rank training on
half of every batch, a resume from ``save_state`` in phase 1, and the same run without the DDP re-wrap."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from accelerate_runs import step_run
from launch import digest, write_report
from loop_runs import trajectory_point
from phasetune.loop.accelerated import AcceleratedFinetuning

warnings.simplefilter("ignore")
torch.set_num_threads(1)
OUT = Path(sys.argv[1])


class Recorded(AcceleratedFinetuning):
    """Keeps the name of each model it trains with after a thaw; ``rewrap=False`` never rebuilds DDP (the control
    that shows what the re-wrap does; the audit then only warns)."""

    rewrap = True

    def install(self, *, optimizer: Any, scheduler: Any, scheduler_cfg: Any, thawed: bool) -> None:
        before = self.model
        super().install(optimizer=optimizer, scheduler=scheduler, scheduler_cfg=scheduler_cfg,
                        thawed=thawed and self.rewrap)
        if thawed:
            self.rebuilt = [*getattr(self, "rebuilt", []), [type(self.model).__name__, self.model is not before]]


class WithoutRewrap(Recorded):
    rewrap = False


def fit(front_end: type[AcceleratedFinetuning] = Recorded, **kw: Any) -> dict:
    # lr shapes count optimizer steps, as in the one-process loop (by default Accelerate steps a prepared scheduler
    # once per process at each optimizer step)
    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    initial: dict = {}

    def record(module: torch.nn.Module, optimizer: Any) -> tuple:
        if not initial:
            initial.update(digest(module))
        return trajectory_point(module, optimizer)

    module, ft, trajectory = step_run(accelerator=accelerator, record=record, front_end=front_end, **kw)
    return {"distributed": accelerator.distributed_type.name, "processes": accelerator.num_processes,
            "trajectory": trajectory, "phases": [[r.depth, r.start_step, r.end_step] for r in ft.history],
            "rebuilt": getattr(ft, "rebuilt", []), "initial": initial, "params": digest(module)}


report = {"run": fit(save_at=8, save_dir=OUT / "ckpt")}  # step 8: in phase 1 (6 to 11)
report["resumed"] = fit(resume=OUT / "ckpt")
report["without_rewrap"] = fit(WithoutRewrap, audit="warn")
write_report(str(OUT), torch.distributed.get_rank(), report)
