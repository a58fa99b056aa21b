"""The memory plan as a text table: one row per phase, then host memory, advice and notes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from phasetune.plan.setup import GiB

if TYPE_CHECKING:
    from phasetune.plan.result import MemoryPlan

_UNITS = {"GiB": GiB, "MiB": 1 << 20}


def _count(n: int) -> str:
    for size, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= size:
            return f"{n / size:.2f}{suffix}"
    return str(n)


def describe_setup(plan: MemoryPlan) -> str:
    s = plan.setup
    strategy = {"single": "one device", "ddp": f"DDP on {s.world_size} ranks", "fsdp2": f"FSDP2 on {s.world_size} ranks",
                "fsdp1": f"FSDP1 on {s.world_size} ranks"}[s.strategy]
    precision = f"{s.mixed_precision} mixed precision" if s.mixed_precision else f"{s.param_dtype} compute"
    extras = [x for x in (("activation checkpointing" if s.act_ckpt else ""), ("CPU offload" if s.cpu_offload else "")) if x]
    accum = f" x {s.accumulation} accumulation steps" if s.accumulation > 1 else ""
    return (f"{strategy}, {s.param_dtype} parameters, {precision}, {s.optimizer} ({s.optimizer_impl}), micro-batch "
            f"{s.micro_batch} x {s.seq_len} tokens{accum}" + ("".join(f", {x}" for x in extras)))


def format_plan(plan: MemoryPlan, unit: str | None = None, timing: bool = True) -> str:
    """Render ``plan`` (see :meth:`phasetune.plan.MemoryPlan.table`)."""
    biggest = max([p.peak for p in plan.phases] + [1])
    unit = unit or ("GiB" if biggest >= GiB else "MiB")
    div = _UNITS[unit]

    def num(n: int | None) -> str:
        return "-" if n is None else f"{n / div:.2f}"

    s = plan.setup
    lines = [f"Memory plan: {plan.model}, {_count(plan.n_params)} parameters", describe_setup(plan)]
    if plan.budget is not None:
        lines.append(f"rank 0, {unit}; budget {num(plan.budget)} {unit} = {s.device_gib} GiB device - {s.reserve_gib} GiB "
                     f"reserve (CUDA context, NCCL), / (1 + {s.fragmentation:.0%} fragmentation)")
    else:
        lines.append(f"rank 0, {unit}; no device size given (device_gib): no headroom or micro-batch limit")
    lines.append("")
    accum = s.accumulation > 1
    head = ["phase", "trainable", "params", "grads", *(["accum."] if accum else []), "optim", "activ.", "gathered",
            "collect.", "peak", "peak at", "headroom", "max mb"]
    rows = []
    for p in plan.phases:
        at = p.peak_at + (" *" if p.source != "simulated" else "")
        rows.append([str(p.phase), f"{100 * p.trainable_fraction:.1f}%", num(p.params), num(p.grads),
                     *([num(p.accumulated_grads)] if accum else []), num(p.optimizer), num(p.activations),
                     num(p.params_unsharded), num(p.collectives), num(p.peak), at, num(p.headroom),
                     "-" if p.max_micro_batch is None else str(p.max_micro_batch)])
    lines.extend(_grid(head, rows, left={len(head) - 3}))
    lines.append("params/grads/optim: resident shards; accum.: gradients kept between micro-steps; activ., gathered "
                 "(all-gathered parameters), collect. (reduce-scatter, DDP buckets): at the peak"
                 if accum else "params/grads/optim: resident shards; activ., gathered (all-gathered parameters), "
                 "collect. (reduce-scatter, DDP buckets): at the peak")
    if any(p.source != "simulated" for p in plan.phases):
        lines.append("* analytic: model states only (the model did not run under fake tensors; see notes)")
    if any(p.act_ckpt_peak is not None for p in plan.phases):
        lines.append("with activation checkpointing on every block: " + ", ".join(
            f"phase {p.phase} peak {num(p.act_ckpt_peak)}" for p in plan.phases if p.act_ckpt_peak is not None))
    host = [p for p in plan.phases if p.host.total]
    if host:
        lines += ["", f"host RAM of rank 0, {unit} (snapshot: held twice while a better one replaces it)"]
        rows = [[str(p.phase), num(p.host.offload), num(p.host.snapshot), num(p.host.prefix_cache), num(p.host.total)]
                for p in host]
        lines.extend(_grid(["phase", "offload", "snapshot", "prefix cache", "total"], rows))
    for title, items in (("advice", plan.advice), ("notes", plan.notes)):
        if items:
            lines += ["", f"{title}:"] + [f"  - {x}" for x in items]
    if plan.units or timing:
        units = (f"units: {', '.join(u or '<root>' for u in plan.units[:4])}"
                 + (f" ... ({len(plan.units)} in all)" if len(plan.units) > 4 else "")) if plan.units else ""
        lines += ["", "; ".join(x for x in ((f"planned in {plan.seconds:.1f} s" if timing else ""), units) if x)]
    return "\n".join(lines)


def _grid(head: list[str], rows: list[list[str]], left: set[int] | None = None) -> list[str]:
    left = left or set()
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return [fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


__all__ = ["describe_setup", "format_plan"]
