"""Run the FTS reference scenarios under phasetune and diff them against the recorded FTS trajectories.

Importable by tests (no FTS import)::

    from fts_reference.compare import load_reference, run_phasetune, diff_records
    ref = load_reference()["scenarios"]["es_restore_best"]
    assert diff_records(ref, run_phasetune(scenario("es_restore_best"), tmp_path)) == []

or, from the repository root with the project's environment, a match/differ table for every scenario::

    .venv/bin/python -m tests.fts_reference.compare [--only NAME ...] [--tol 1e-6] [--no-weights]

The exit status is 1 when any scenario differs or fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .record import DEFAULT_OUT
from .scenarios import SCENARIOS, Scenario, run_scenario

TRAJECTORY_FIELDS = ("depth", "thawed", "groups", "lrs", "sched_last_lr", "global_step")
WEIGHT_FIELDS = ("param_sum_start", "param_sum_end")
LR_RTOL = 1e-9


def load_reference(path: str | Path = DEFAULT_OUT) -> dict[str, Any]:
    """The recorded FTS document (``{"recorded_with": ..., "scenarios": {name: record}}``)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def run_phasetune(sc: Scenario, root_dir: str | Path | None = None) -> dict[str, Any]:
    """Fit ``sc`` with phasetune's FinetuningScheduler, FTSEarlyStopping and FTSCheckpoint; records as FTS's."""
    from phasetune import FinetuningScheduler, FTSCheckpoint, FTSEarlyStopping

    if root_dir is not None:
        return run_scenario(sc, FinetuningScheduler, FTSEarlyStopping, FTSCheckpoint, root_dir)
    with tempfile.TemporaryDirectory(prefix=f"phasetune_{sc.name}_") as root:
        return run_scenario(sc, FinetuningScheduler, FTSEarlyStopping, FTSCheckpoint, root)


# ---------------------------------------------------------------------------------------------- diffing
def _close(a: float | None, b: float | None, rtol: float, atol: float = 0.0) -> bool:
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= max(atol, rtol * max(abs(a), abs(b)))


def _close_list(a: Sequence[float] | None, b: Sequence[float] | None, rtol: float) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(_close(x, y, rtol) for x, y in zip(a, b))


def _close_prefix(a: Sequence[float] | None, b: Sequence[float] | None, rtol: float) -> bool:
    """``get_last_lr()`` over the groups both sides report: FTS adds groups without updating the scheduler's
    ``_last_lr``, so until the next scheduler step its list is shorter than the optimizer's groups."""
    if a is None or b is None:
        return a is b
    n = min(len(a), len(b))
    return _close_list(a[:n], b[:n], rtol)


def _names(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "-"


def _fmt(values: Sequence[float] | None) -> str:
    return "None" if values is None else "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def _epoch_diffs(exp: Mapping[str, Any], act: Mapping[str, Any], tol: float, weights: bool) -> list[str]:
    """What differs in one epoch row, one phrase per field ('FTS' is the expected side)."""
    out: list[str] = []
    if exp.get("depth") != act.get("depth"):
        out.append(f"phase {act.get('depth')} (FTS {exp.get('depth')})")
    et, at = exp["thawed"], act["thawed"]
    if et != at:
        more = [n for n in at if n not in et]
        fewer = [n for n in et if n not in at]
        if more or fewer:
            out.append(f"{len(at)} tensors thawed (FTS {len(et)}; extra: {_names(more)}; missing: {_names(fewer)})")
        else:
            out.append("thawed tensors in another order")
    eg, ag = exp["groups"], act["groups"]
    if len(eg) != len(ag):
        out.append(f"{len(ag)} param groups (FTS {len(eg)})")
    elif eg != ag:
        out.append(f"param group contents {ag} (FTS {eg})")
    if not _close_list(exp["lrs"], act["lrs"], LR_RTOL):
        out.append(f"group lrs {_fmt(act['lrs'])} (FTS {_fmt(exp['lrs'])})")
    if not _close_prefix(exp["sched_last_lr"], act["sched_last_lr"], LR_RTOL):
        out.append(f"scheduler get_last_lr() {_fmt(act['sched_last_lr'])} (FTS {_fmt(exp['sched_last_lr'])})")
    if exp["global_step"] != act["global_step"]:
        out.append(f"global_step {act['global_step']} (FTS {exp['global_step']})")
    if not _close(exp.get("val_loss"), act.get("val_loss"), tol):
        out.append(f"val_loss {act.get('val_loss')} (FTS {exp.get('val_loss')})")
    if weights:
        for key, when in (("param_sum_start", "at epoch start"), ("param_sum_end", "at epoch end")):
            if not _close(exp.get(key), act.get(key), tol):
                out.append(f"weight sum {when} {act.get(key):.9g} (FTS {exp.get(key):.9g})"
                           if act.get(key) is not None and exp.get(key) is not None else f"{key} missing")
    return out


def _timeline(record: Mapping[str, Any]) -> str:
    return " ".join(str(e["depth"]) for e in record["epochs"])


def diff_records(expected: Mapping[str, Any], actual: Mapping[str, Any], tol: float = 1e-6,
                 weights: bool = True) -> list[str]:
    """Human-readable differences between two records of one scenario; ``[]`` when they match.

    Compared per epoch: phase, thawed set, param groups, group lrs, the scheduler's last lr (over the groups both
    report), global step and the monitored value; with ``weights`` also the weight sums at each epoch's start and end and the final
    per-parameter sums (relative tolerance ``tol``). The first line names the first differing epoch.
    """
    out: list[str] = []
    ee, ae = expected["epochs"], actual["epochs"]
    first: int | None = None
    later = 0
    for exp, act in zip(ee, ae):
        diffs = _epoch_diffs(exp, act, tol, weights)
        if not diffs:
            continue
        if first is None:
            first = exp["epoch"]
            out.append(f"first difference at epoch {first}: " + "; ".join(diffs))
        else:
            later += 1
    if later:
        out.append(f"{later} later epoch(s) differ as well")
    if len(ee) != len(ae):
        out.append(f"trained {len(ae)} epochs (FTS {len(ee)})")
        if first is None:
            first = min(len(ee), len(ae))
            out.insert(0, f"first difference at epoch {first}: "
                       + ("phasetune trained it, FTS had stopped" if len(ae) > len(ee) else "FTS trained it, phasetune had stopped"))
    if out:
        out.append(f"phase by epoch: phasetune {_timeline(actual)} | FTS {_timeline(expected)}")
    ef, af = expected["final"], actual["final"]
    for key in ("global_step", "depth"):
        if ef.get(key) != af.get(key):
            out.append(f"final {key} {af.get(key)} (FTS {ef.get(key)})")
    if "thawed" in ef and set(ef["thawed"]) != set(af.get("thawed", [])):
        out.append(f"{len(af.get('thawed', []))} tensors thawed at fit end (FTS {len(ef['thawed'])})")
    if weights:
        es, as_ = ef.get("param_sums", {}), af.get("param_sums", {})
        bad = [n for n in es if not _close(es[n], as_.get(n), tol)]
        if set(es) != set(as_):
            out.append(f"final parameters named differently: {sorted(set(es) ^ set(as_))}")
        if bad:
            worst = max(bad, key=lambda n: abs(es[n] - as_[n]) if as_.get(n) is not None else math.inf)
            out.append(f"final weights differ in {len(bad)} of {len(es)} tensors beyond rtol {tol:g} "
                       f"(largest: {worst} {as_.get(worst)!r} vs FTS {es[worst]!r})")
    return out


# ---------------------------------------------------------------------------------------------- CLI
def compare_all(names: Sequence[str] | None = None, reference: str | Path = DEFAULT_OUT, tol: float = 1e-6,
                weights: bool = True) -> dict[str, list[str] | str]:
    """Per scenario name: its differences (``[]``: match) or, if phasetune raised, the error text."""
    ref = load_reference(reference)["scenarios"]
    results: dict[str, list[str] | str] = {}
    for sc in SCENARIOS:
        if (names and sc.name not in names) or sc.name not in ref:
            continue
        print(f"[compare] {sc.name}", file=sys.stderr, flush=True)
        try:
            actual = run_phasetune(sc)
        except Exception as e:  # a scenario phasetune refuses is a finding, not a crash of the tool
            results[sc.name] = f"{type(e).__name__}: {e}".strip() + "\n" + traceback.format_exc(limit=-3)
            continue
        results[sc.name] = diff_records(ref[sc.name], actual, tol=tol, weights=weights)
    return results


def format_table(results: Mapping[str, list[str] | str]) -> str:
    width = max((len(n) for n in results), default=8)
    lines = [f"{'scenario':<{width}}  result   first difference", f"{'-' * width}  -------  ----------------"]
    for name, res in results.items():
        if isinstance(res, str):
            lines.append(f"{name:<{width}}  ERROR    {res.splitlines()[0]}")
        elif not res:
            lines.append(f"{name:<{width}}  match")
        else:
            lines.append(f"{name:<{width}}  DIFFER   {res[0]}")
    details = [(n, r) for n, r in results.items() if r]
    for name, res in details:
        lines.append(f"\n{name}:")
        body = res.splitlines() if isinstance(res, str) else res
        lines.extend(f"  {line}" for line in body)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare phasetune with the recorded FTS trajectories.")
    parser.add_argument("--only", nargs="*", help="scenario names (default: all recorded)")
    parser.add_argument("--reference", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tol", type=float, default=1e-6, help="relative tolerance of weight sums")
    parser.add_argument("--no-weights", action="store_true", help="compare trajectories only")
    args = parser.parse_args(argv)
    results = compare_all(args.only, args.reference, args.tol, not args.no_weights)
    print(format_table(results))
    return 0 if all(r == [] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
