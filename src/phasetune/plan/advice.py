"""Advice read off a memory plan, each line quoting the plan's numbers.

- **The phase that will not fit**, by how much, and what the plan measured would change it (a smaller
  micro-batch, activation checkpointing, more ranks for model states that alone overflow).
- **Micro-batch / gradient-accumulation pairs** per phase that keep the global batch: early phases, with
  fewer activations and no optimizer state for frozen parameters, can run larger micro-batches.
- **Gradients kept for accumulation**: between the micro-steps of a cycle FSDP2 keeps unsharded gradients
  of every trainable parameter (sync off), which can outweigh everything else in a late phase.
- **Where activation checkpointing is needed**: blocks below the lowest trainable block run without
  autograd (frozen parameters, inputs that need no gradient) and keep no activations, so checkpointing
  them saves nothing; it pays only from the lowest trainable block up.
- **A low trainable block under a frozen top**: backward must run through every block above the lowest
  trainable one, so those frozen blocks keep their activations without training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from phasetune.plan.setup import GiB

MiB = 1 << 20

if TYPE_CHECKING:
    from phasetune.plan.result import MemoryPlan, PhaseMemory


def size(n: int | float) -> str:
    """Bytes as GiB, or as MiB below 1 GiB (a small model's excess reads "0.37 MiB over", not "0.00 GiB over")."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.2f} MiB"


def advise(plan: MemoryPlan, blocks: Sequence[str], schedule: Any) -> list[str]:
    """Advice lines for ``plan`` (``blocks``: the model's transformer blocks, bottom first)."""
    out = [_not_fitting(plan, p) for p in plan.phases if p.fits is False]
    pairs = _batch_pairs(plan)
    if pairs:
        out.append(pairs)
    out.extend(_accumulation(plan, p) for p in plan.phases if p.accumulated_grads > 0.1 * max(p.peak, 1))
    out.extend(_checkpointing(plan, p, blocks) for p in plan.phases if _tight(plan, p) and p.lowest_trainable_block)
    out.extend(w for p in plan.phases if (w := _frozen_top(p, blocks, schedule)))
    return [line for line in out if line]


def _tight(plan: MemoryPlan, p: PhaseMemory) -> bool:
    return plan.budget is not None and p.headroom is not None and p.headroom < 0.1 * plan.budget and p.activations > 0


def _not_fitting(plan: MemoryPlan, p: PhaseMemory) -> str:
    s = plan.setup
    assert plan.budget is not None and p.headroom is not None
    head = (f"phase {p.phase} will not fit: peak {size(p.peak)} at {p.peak_at} is {size(-p.headroom)} over the "
            f"{size(plan.budget)} budget ({s.device_gib} GiB less {s.reserve_gib} GiB reserve and "
            f"{s.fragmentation:.0%} fragmentation)")
    fixes = []
    states = p.params + p.grads + p.optimizer + p.step_temporaries
    if states > plan.budget:
        needed = s.world_size * states / plan.budget
        fixes.append(f"its model states alone take {size(states)} per rank: shard them over more ranks (they shrink "
                     f"about as 1/ranks: ~{int(needed) + 1} ranks) or offload them (cpu_offload=True)")
    if p.max_micro_batch and p.max_micro_batch < s.micro_batch:
        fixes.append(f"micro_batch {p.max_micro_batch} fits")
    elif p.max_micro_batch == 0 and states <= plan.budget:
        fixes.append("not even micro-batch 1 fits")
    if p.act_ckpt_peak is not None:
        left = plan.budget - p.act_ckpt_peak
        fixes.append(f"with activation checkpointing on every block the peak is {size(p.act_ckpt_peak)} ("
                     + (f"fits, {size(left)} to spare)" if left >= 0 else f"still {size(-left)} over)"))
    return head + ("; " + "; ".join(fixes) if fixes else "")


def _batch_pairs(plan: MemoryPlan) -> str:
    s = plan.setup
    limits = [p.max_micro_batch for p in plan.phases]
    if plan.budget is None or any(m is None for m in limits):
        return ""
    if s.global_batch is None:
        if all(m == s.micro_batch for m in limits):
            return ""
        return "largest micro-batch per phase: " + ", ".join(f"phase {p.phase}: {p.max_micro_batch}" for p in plan.phases)
    parts = []
    for p in plan.phases:
        pair = best_pair(s.global_batch, s.world_size, p.max_micro_batch or 0)
        parts.append(f"phase {p.phase}: {pair[0]} x {pair[1]}" if pair else f"phase {p.phase}: none fits")
    if all(part.endswith(f"{s.micro_batch} x {s.accumulation}") for part in parts):
        return ""
    return (f"micro-batch x accumulation steps per phase that keep the global batch of {s.global_batch} on "
            f"{s.world_size} rank(s): " + "; ".join(parts))


def _accumulation(plan: MemoryPlan, p: PhaseMemory) -> str:
    s = plan.setup
    kept = ("unsharded gradients between micro-steps (FSDP2 does not reduce-scatter while gradient sync is off)"
            if s.strategy == "fsdp2" else "the gradients between micro-steps")
    return (f"phase {p.phase}: accumulating {s.accumulation} micro-steps keeps {size(p.accumulated_grads)} of {kept}, "
            f"{p.accumulated_grads / p.peak:.0%} of its {size(p.peak)} peak; fewer, larger micro-batches (the pairs "
            "above) or synchronising gradients on every micro-step avoid it")


def best_pair(global_batch: int, world_size: int, limit: int) -> tuple[int, int] | None:
    """The largest micro-batch <= ``limit`` that divides ``global_batch / world_size``, with its accumulation."""
    per_rank = global_batch // world_size
    for m in range(min(limit, per_rank), 0, -1):
        if per_rank % m == 0:
            return m, per_rank // m
    return None


def _checkpointing(plan: MemoryPlan, p: PhaseMemory, blocks: Sequence[str]) -> str:
    if plan.setup.act_ckpt or p.lowest_trainable_block not in blocks:
        return ""
    i = list(blocks).index(p.lowest_trainable_block)
    ckpt = list(blocks)[i:]
    below = i
    return (f"phase {p.phase}: activations are {size(p.activations)} of its {size(p.peak)} peak; checkpoint only from "
            f"{p.lowest_trainable_block} up ({len(ckpt)} block(s): {ckpt[0]} .. {ckpt[-1]})"
            + (f" -- the {below} frozen block(s) below it keep no activations, so checkpointing them saves nothing"
               if below else ""))


def _frozen_top(p: PhaseMemory, blocks: Sequence[str], schedule: Any) -> str:
    if p.lowest_trainable_block is None:
        return ""
    names = schedule.params_through(p.phase)
    trained = {b for b in blocks if any(n.startswith(b + ".") for n in names)}
    i = list(blocks).index(p.lowest_trainable_block)
    frozen_above = [b for b in blocks[i + 1:] if b not in trained]
    if not frozen_above:
        return ""
    span = len(blocks) - i
    share = p.activations * len(frozen_above) / span if p.activations else 0
    return (f"phase {p.phase} trains {p.lowest_trainable_block} under {len(frozen_above)} frozen block(s) "
            f"({frozen_above[0]} .. {frozen_above[-1]}): backward runs through them to reach it, so they keep their "
            f"activations without training" + (f" (about {size(share)} of this phase's {size(p.activations)})" if share else "")
            + "; thaw from the top down, or train those blocks too")


__all__ = ["advise", "best_pair", "size"]
