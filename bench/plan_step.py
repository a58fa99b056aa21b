"""The optimizer step from shards against the step tracked on real tensors, and what fake tensors would have said.

For an FSDP2-sharded tiny Llama (tests/data/plan/tiny_llama.json) on fake process groups of 2, 4 and 8 ranks, in
a partly and a fully thawed phase, with AdamW (foreach and single-tensor), Adam (fused) and SGD with momentum:

- real: torch's FSDPMemTracker around a steady-state ``optimizer.step()`` (the second one) on real tensors;
- planned: what the memory plan uses -- this rank's parameter and gradient shards, plus
  :func:`phasetune.plan.step_memory` (torch's optimizer run on fake tensors shaped like the local shards);
- fake-tracked: the same tracker around the first step under FakeTensorMode, with DTensor's propagation cache
  cleared first (torch 2.13 counts the global-shape tensors of sharding propagation, made once per operator and
  shape; see docs/memory_plan.md).

    python bench/plan_step.py            # 3 world sizes x 2 phases x 4 optimizers
    python bench/plan_step.py --quick    # 2 ranks, the full phase
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "plan"
OPTIMIZERS = {
    "adamw-foreach": (torch.optim.AdamW, {"foreach": True}),
    "adamw-single": (torch.optim.AdamW, {"foreach": False}),
    "adam-fused": (torch.optim.Adam, {"fused": True}),
    "sgd-momentum": (torch.optim.SGD, {"foreach": True, "momentum": 0.9}),
}
PHASES = {"partial": r"(lm_head|model\.norm|model\.layers\.3)\..*|lm_head\.weight|model\.norm\.weight", "full": r".*"}


def tracked_step(world: int, phase: str, cls, kwargs, fake: bool) -> tuple[int, int]:
    """(tracked peak of the second step, planned peak) for one configuration."""
    import re

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from phasetune.core.param_groups import phase_groups
    from phasetune.plan import PlanSetup, step_memory
    from phasetune.plan.model_source import model_source
    from phasetune.plan.shard import apply_strategy, fake_world
    from phasetune.plan.states import local_shard
    from phasetune.sharding.groups import split_groups

    if fake:
        from torch.distributed.tensor import DTensor

        DTensor._op_dispatcher.sharding_propagator._propagate_tensor_meta_cached.cache_clear()
    source = model_source(str(DATA / "tiny_llama.json"))
    setup = PlanSetup(world_size=world, seq_len=16, micro_batch=2)
    with fake_world(world) as mesh, FakeTensorMode() if fake else torch.device("cpu"):
        model = source.build()
        shapes = {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters()}
        model.requires_grad_(False)
        apply_strategy(model, setup, mesh)
        params = dict(model.named_parameters())
        names = [n for n in params if re.fullmatch(PHASES[phase], n)]
        for n in names:
            params[n].requires_grad_(True)
        args, kw = source.inputs_for(model, 2, 16)
        model(*args, **kw).loss.backward()
        groups, _ = split_groups(phase_groups(0, names, params, 1e-3))
        optimizer = cls(groups, lr=1e-3, **kwargs)
        if not fake:  # real: the steady-state step; fake: the first step, before DTensor cached its propagation
            optimizer.step()
        tracker = FSDPMemTracker(model, optimizer)
        with tracker:
            optimizer.step()
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # tracked beside the parameters
    shards = [(n, local_shard(*shapes[n], "fsdp2", world, 0)) for n in names]
    step = step_memory([shards], cls, {"lr": 1e-3, **kwargs})
    resident = sum(local_shard(*shapes[n], "fsdp2", world, 0).nbytes for n in shapes)
    planned = resident + buffers + sum(s.nbytes for _, s in shards) + step.state + step.temporaries
    return peak, planned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 ranks, the full phase")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    worlds = (2,) if args.quick else (2, 4, 8)
    phases = ("full",) if args.quick else ("partial", "full")
    print(f"{'optimizer':14} {'ranks':>5} {'phase':>7} | {'real KiB':>9} {'planned':>9} {'ratio':>7} | {'fake-tracked':>12} {'ratio':>6}")
    worst = 0.0
    for (name, (cls, kwargs)), world, phase in itertools.product(OPTIMIZERS.items(), worlds, phases):
        fake_peak, _ = tracked_step(world, phase, cls, kwargs, fake=True)
        real_peak, planned = tracked_step(world, phase, cls, kwargs, fake=False)
        worst = max(worst, abs(planned / real_peak - 1))
        print(f"{name:14} {world:>5} {phase:>7} | {real_peak / 1024:9.1f} {planned / 1024:9.1f} {planned / real_peak:7.4f} | "
              f"{fake_peak / 1024:12.1f} {fake_peak / real_peak:6.2f}")
    print(f"\nlargest |planned/real - 1| = {worst:.2e} (target <= 5e-2); fake-tracked ratios show torch's over-count")


if __name__ == "__main__":
    main()
