"""Results over seeds: mean ± sd per metric and arm, and paired differences against a baseline arm.

One seed moves fine-tuning metrics about as much as a change of method does, so comparisons are made
over several seeds and paired: each seed's scheduled run is compared with the baseline run of the same
seed (same classifier init, same data order), and the mean and sd of those differences are reported.
``phasetune fit --seeds N`` (:mod:`phasetune.lightning.fit_command`) prints these tables.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from phasetune.util.text import fmt_bytes, fmt_seconds, format_table


@dataclass
class SeedRun:
    """One training run of one arm with one seed."""

    arm: str
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    wall_time: float | None = None
    peak_memory: int | None = None
    steps: int | None = None


def mean_sd(values: Sequence[float], digits: int = 4) -> str:
    """``mean ± sd`` of ``values`` (sd over seeds, n - 1; '-' for one value)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    sd = f"{statistics.stdev(values):.{digits}f}" if len(values) > 1 else "-"
    return f"{statistics.mean(values):.{digits}f} ± {sd}"


def _arms(runs: Sequence[SeedRun]) -> dict[str, list[SeedRun]]:
    arms: dict[str, list[SeedRun]] = {}
    for r in runs:
        arms.setdefault(r.arm, []).append(r)
    return arms


def metrics_table(runs: Sequence[SeedRun], metrics: Sequence[str] | None = None) -> str:
    """Per arm: number of seeds, mean ± sd of each metric, mean wall time and peak memory."""
    arms = _arms(runs)
    metrics = list(metrics or sorted({k for r in runs for k in r.metrics}))
    rows = []
    for arm, rs in arms.items():
        walls = [r.wall_time for r in rs if r.wall_time is not None]
        peaks = [r.peak_memory for r in rs if r.peak_memory is not None]
        rows.append([arm, len(rs), *(mean_sd([r.metrics[m] for r in rs if m in r.metrics]) for m in metrics),
                     fmt_seconds(statistics.mean(walls)) if walls else "-",
                     fmt_bytes(int(statistics.mean(peaks))) if peaks else "-"])
    return format_table(["arm", "seeds", *metrics, "wall time", "peak memory"], rows, align="lr" + "r" * (len(metrics) + 2))


def paired_table(runs: Sequence[SeedRun], baseline: str, metrics: Sequence[str] | None = None) -> str:
    """Per non-baseline arm: mean ± sd over seeds of (arm - baseline) for each metric, wall and memory ratios."""
    arms = _arms(runs)
    if baseline not in arms:
        raise ValueError(f"no runs of the baseline arm {baseline!r} (arms: {', '.join(arms)})")
    base = {r.seed: r for r in arms[baseline]}
    metrics = list(metrics or sorted({k for r in runs for k in r.metrics}))
    rows = []
    for arm, rs in arms.items():
        if arm == baseline:
            continue
        pairs = [(r, base[r.seed]) for r in rs if r.seed in base]
        diffs = [_signed(mean_sd([a.metrics[m] - b.metrics[m] for a, b in pairs if m in a.metrics and m in b.metrics]))
                 for m in metrics]
        rows.append([arm, len(pairs), *diffs, _ratio([(a.wall_time, b.wall_time) for a, b in pairs]),
                     _ratio([(a.peak_memory, b.peak_memory) for a, b in pairs])])
    heads = ["arm - baseline", "pairs", *(f"Δ {m}" for m in metrics), "wall time ratio", "peak memory ratio"]
    return format_table(heads, rows, align="lr" + "r" * (len(metrics) + 2))


def _signed(text: str) -> str:
    return text if text == "-" or text.startswith("-") else "+" + text


def _ratio(pairs: Sequence[tuple[float | None, float | None]]) -> str:
    ratios = [a / b for a, b in pairs if a is not None and b]
    return f"{statistics.mean(ratios):.2f}x" if ratios else "-"
