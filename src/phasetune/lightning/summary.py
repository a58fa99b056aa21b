"""What a finished run shows: a per-phase summary table and a plot of validation metrics by phase.

``ValidationHistory`` records the validation metrics after every check (the CLI adds it to ``fit``);
:func:`summary_table` formats ``FinetuningScheduler.history``; :func:`plot_phases` draws the recorded
curves with each phase shaded and labelled (matplotlib is imported only there).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from phasetune.features.peak_memory import KIND_LABELS
from phasetune.util.text import fmt_bytes, fmt_count, fmt_seconds, fmt_value, format_table

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from phasetune.run import PhaseRecord


@dataclass
class ValidationPoint:
    """The validation metrics of one check, at the global step and epoch it ran."""

    step: int
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)


class ValidationHistory(Callback):
    """Keeps the metrics logged during validation (names starting with ``prefix``) after every check.

    ``points`` is what :func:`plot_phases` draws; sanity checks are skipped.
    """

    def __init__(self, prefix: str = "val") -> None:
        self.prefix = prefix
        self.points: list[ValidationPoint] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith(self.prefix) and getattr(v, "numel", lambda: 1)() == 1}
        self.points.append(ValidationPoint(trainer.global_step, trainer.current_epoch, metrics))

    def state_dict(self) -> dict[str, Any]:
        return {"points": [(p.step, p.epoch, p.metrics) for p in self.points]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = [ValidationPoint(s, e, dict(m)) for s, e, m in state_dict.get("points", [])]


def summary_table(history: Sequence[PhaseRecord], monitor: str | None = None) -> str:
    """One row per phase: epochs, steps, trainable parameters (count and share), lr, best monitored
    value, wall time, peak memory, why the phase ended and the thaw audit's verdict; a total row; a note saying
    what the memory column measured, the audit line of each phase that failed it and each cached phase's prefix-cache
    line."""
    rows = []
    for r in history:
        share = 100.0 * r.trainable_params / max(r.total_params, 1)
        rows.append([
            r.depth,
            _or_dash(r.epochs),
            _or_dash(r.steps),
            f"{fmt_count(r.trainable_params)} ({share:.1f}%)",
            "optimizer's" if r.lr is None else f"{r.lr:.3g}",
            fmt_value(r.best_value) + ("" if r.best_epoch is None else f" @ {r.best_epoch}"),
            fmt_seconds(r.wall_time),
            fmt_bytes(r.peak_memory),
            _short_reason(r.end_reason),
            _short_audit(r.audit),
        ])
    if len(history) > 1:
        done = [r for r in history if r.steps is not None]
        rows.append([
            "all",
            sum(r.epochs or 0 for r in done),
            sum(r.steps or 0 for r in done),
            "", "", "",
            fmt_seconds(sum(r.wall_time for r in history)),
            fmt_bytes(max((r.peak_memory for r in history if r.peak_memory is not None), default=None)),
            "", "",
        ])
    best = f"best {monitor} @ epoch" if monitor else "best @ epoch"
    table = format_table(
        ["phase", "epochs", "steps", "trainable params", "lr", best, "wall time", "peak memory", "ended by", "audit"],
        rows,
        align="lrrrrrrrll",
    )
    kinds = {r.peak_memory_kind for r in history if r.peak_memory_kind}
    notes = [f"peak memory: {KIND_LABELS.get(k, k)}" for k in sorted(kinds)]
    notes += [r.audit for r in history if r.audit and _short_audit(r.audit) == "FAILED"]
    notes += [r.prefix_cache for r in history if getattr(r, "prefix_cache", None)]  # "phase 0: prefix cache up to ..."
    return "\n".join([table, *notes])


_REASONS = {  # the run's end reasons, short enough for a table column
    "max_transition_epoch reached": "epoch cap",
    "max_transition_step reached": "step cap",
}


def _short_reason(reason: str | None) -> str:
    if reason is None:
        return "-"
    if reason.startswith("trainer stopped"):  # every front end's own limit (max_epochs, max_steps, ...)
        return "trainer limit"
    return _REASONS.get(reason, reason)


def _short_audit(line: str | None) -> str:
    """The audit column: "passed" (after the phase's first step), "FAILED", "no step" (checked at its start
    only: the phase ended before an optimizer step) or "-" (not audited)."""
    if line is None:
        return "-"
    if " FAILED" in line:
        return "FAILED"
    return "no step" if line.split(":")[0].endswith(")") else "passed"  # "audit phase 1 (transition): ..."


def _or_dash(v: int | None) -> str:
    return "-" if v is None else str(v)


def metrics_line(metrics: Mapping[str, Any]) -> str:
    """``test_acc 0.8123, test_loss 0.4211`` from a metrics dict (tensors or floats)."""
    return ", ".join(f"{k} {float(v):.4g}" for k, v in sorted(metrics.items()))


def plot_phases(
    path: str | os.PathLike[str],
    points: Sequence[ValidationPoint],
    history: Sequence[PhaseRecord],
    metrics: Sequence[str] = ("val_loss", "val_acc"),
    baseline: Sequence[ValidationPoint] | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG of ``metrics`` over training steps, one panel each, phases shaded and labelled.

    ``baseline`` points (e.g. plain full fine-tuning) are drawn dashed on the same axes.
    Needs matplotlib (``pip install matplotlib``).
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError(
            "plotting needs matplotlib, which is not installed; install it with: pip install matplotlib "
            "(it is in phasetune's 'examples' extra)"
        )
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    present = [m for m in metrics if any(m in p.metrics for p in [*points, *(baseline or [])])]
    if not present:
        raise ValueError(f"none of {list(metrics)} was logged during validation; nothing to plot")
    fig, axes = plt.subplots(len(present), 1, sharex=True, figsize=(8, 2.6 * len(present) + 0.6), squeeze=False)
    last_step = max([p.step for p in [*points, *(baseline or [])]] + [r.end_step or 0 for r in history] + [1])
    colors = ("#dbe9f6", "#fde8cf", "#dff2dd", "#f3dcee", "#ececec")
    for ax, name in zip(axes[:, 0], present):
        for i, r in enumerate(history):
            end = r.end_step if r.end_step is not None else last_step
            ax.axvspan(r.start_step, end, color=colors[i % len(colors)], lw=0)
            if ax is axes[0, 0]:
                ax.text((r.start_step + end) / 2, 1.0, f"phase {r.depth}\n{_share(r)} trainable", ha="center",
                        va="bottom", fontsize=8, transform=ax.get_xaxis_transform())
        _line(ax, points, name, "scheduled", "-", "C0")
        if baseline:
            _line(ax, baseline, name, "full fine-tuning", "--", "0.35")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="best", fontsize=8)
    axes[-1, 0].set_xlabel("training step")
    axes[-1, 0].set_xlim(0, last_step)
    if title:
        fig.suptitle(title, fontsize=10, y=0.995)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def _share(r: PhaseRecord) -> str:
    return f"{100.0 * r.trainable_params / max(r.total_params, 1):.0f}%"


def _line(ax: Any, points: Sequence[ValidationPoint], name: str, label: str, style: str, color: str) -> None:
    xy = [(p.step, p.metrics[name]) for p in points if name in p.metrics and math.isfinite(p.metrics[name])]
    if xy:
        xs, ys = zip(*xy)
        ax.plot(xs, ys, style, marker="o", ms=3, color=color, label=label)
