"""Run the FTS reference scenarios under phasetune and diff them against the recorded FTS trajectories.

Importable by tests (no FTS import)::

    from fts_reference.compare import load_reference, run_phasetune, diff_records
    ref = load_reference()["scenarios"]["es_restore_best"]
    assert diff_records(ref, run_phasetune(scenario("es_restore_best"), tmp_path)) == []

or, from the repository root with the project's environment, a match/differ table for every scenario::

    .venv/bin/python -m tests.fts_reference.compare [--only NAME ...] [--tol 1e-5] [--no-weights]

The exit status is 1 when any scenario differs or fails.

Two kinds of comparison. The trajectory (phase, thawed set, param groups, lrs, the scheduler's last lr, global
step, and a scripted monitored value) is exact: it is decided by integer counts, Python floats and the scripted
curves, identical on every machine. The weights are numerical: FTS was recorded on one CPU, and another CPU (or
another ``ATEN_CPU_CAPABILITY``) runs other kernels, which round in other orders (see :func:`weight_tolerance`).
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
FLOAT32_UNIT_ROUNDOFF = 2.0**-24
WIDEST_DOT = 16  # the longest float32 dot product of the scenarios' forward and backward (D_HIDDEN, > BATCH 8)


def weight_tolerance(record: Mapping[str, Any]) -> float:
    """How far, relative to the sum of the weights' magnitudes, a weight sum of ``record`` may move on another CPU.

    A float32 dot product of ``WIDEST_DOT`` terms rounds to within ``WIDEST_DOT`` unit roundoffs of the sum of its
    terms' magnitudes, and another kernel may sum them in another order; so may each optimizer step's update, which
    later steps carry on: ``WIDEST_DOT * global_step * 2**-24`` (e.g. 2.7e-5 for 28 steps). Measured between
    FTS recordings under ``ATEN_CPU_CAPABILITY=default`` and ``avx2`` and the first recording (another machine):
    at most 1.1e-6 (steplr_es_restore, final ``layers.3.bias``), 4% of this bound.
    """
    return WIDEST_DOT * record["final"]["global_step"] * FLOAT32_UNIT_ROUNDOFF


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
def _close(a: float | None, b: float | None, tol: float, scale: float | None) -> bool:
    """``|a - b| <= tol * scale``: ``scale`` is the sum of the magnitudes the sum ``a`` was taken over (a signed
    sum can cancel to near zero; its rounding error scales with the magnitudes)."""
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tol * (scale if scale is not None else max(abs(a), abs(b)))


def _same_prefix(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    """``get_last_lr()`` over the groups both sides report: FTS adds groups without updating the scheduler's
    ``_last_lr``, so until the next scheduler step its list is shorter than the optimizer's groups."""
    if a is None or b is None:
        return a is b
    n = min(len(a), len(b))
    return list(a[:n]) == list(b[:n])  # exact: Python floats from the same lr arithmetic


def _names(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "-"


def _fmt(values: Sequence[float] | None) -> str:
    return "None" if values is None else "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def _epoch_diffs(exp: Mapping[str, Any], act: Mapping[str, Any], tol: float, weights: bool,
                 scenario_curve: Sequence[float] | None) -> list[str]:
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
    if exp["lrs"] != act["lrs"]:  # exact: Python floats from the same lr arithmetic
        out.append(f"group lrs {_fmt(act['lrs'])} (FTS {_fmt(exp['lrs'])})")
    if not _same_prefix(exp["sched_last_lr"], act["sched_last_lr"]):
        out.append(f"scheduler get_last_lr() {_fmt(act['sched_last_lr'])} (FTS {_fmt(exp['sched_last_lr'])})")
    if exp["global_step"] != act["global_step"]:
        out.append(f"global_step {act['global_step']} (FTS {exp['global_step']})")
    # a scripted value is exact; the real val_mse (val_curve=None) is numerical: a mean of non-negative squares of
    # predictions whose weights are within tol, relative to itself
    scripted = scenario_curve is not None
    if not (exp.get("val_loss") == act.get("val_loss") if scripted else
            _close(exp.get("val_loss"), act.get("val_loss"), tol, None)):
        out.append(f"val_loss {act.get('val_loss')} (FTS {exp.get('val_loss')})")
    if weights:
        for key, when in (("param_sum_start", "at epoch start"), ("param_sum_end", "at epoch end")):
            scale = exp.get(key.replace("param_sum", "param_abs_sum"))
            if not _close(exp.get(key), act.get(key), tol, scale):
                out.append(f"weight sum {when} {act.get(key):.9g} (FTS {exp.get(key):.9g}, magnitudes {scale:.6g})"
                           if None not in (act.get(key), exp.get(key), scale) else f"{key} missing")
    return out


def _timeline(record: Mapping[str, Any]) -> str:
    return " ".join(str(e["depth"]) for e in record["epochs"])


def diff_records(expected: Mapping[str, Any], actual: Mapping[str, Any], tol: float | None = None,
                 weights: bool = True) -> list[str]:
    """Human-readable differences between two records of one scenario; ``[]`` when they match.

    Compared exactly per epoch: phase, thawed set, param groups, group lrs, the scheduler's last lr (over the
    groups both report), global step and a scripted monitored value. With ``weights``, numerically: the weight sums
    at each epoch's start and end and the final per-parameter sums, within ``tol`` (default
    :func:`weight_tolerance`) of the sum of the weights' magnitudes, and a real monitored value within ``tol`` of
    itself. The first line names the first differing epoch.
    """
    tol = weight_tolerance(expected) if tol is None else tol
    curve = expected["scenario"]["val_curve"] if "scenario" in expected else ()
    out: list[str] = []
    ee, ae = expected["epochs"], actual["epochs"]
    first: int | None = None
    later = 0
    for exp, act in zip(ee, ae):
        diffs = _epoch_diffs(exp, act, tol, weights, curve)
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
        es, as_, scales = ef.get("param_sums", {}), af.get("param_sums", {}), ef.get("param_abs_sums", {})
        bad = [n for n in es if not _close(es[n], as_.get(n), tol, scales.get(n))]
        if set(es) != set(as_):
            out.append(f"final parameters named differently: {sorted(set(es) ^ set(as_))}")
        if bad:
            worst = max(bad, key=lambda n: abs(es[n] - as_[n]) / scales.get(n, 1.0) if as_.get(n) is not None
                        else math.inf)
            out.append(f"final weights differ in {len(bad)} of {len(es)} tensors beyond {tol:.3g} of their "
                       f"magnitudes (largest: {worst} {as_.get(worst)!r} vs FTS {es[worst]!r}, magnitudes "
                       f"{scales.get(worst)!r})")
    return out


# ---------------------------------------------------------------------------------------------- CLI
def compare_all(names: Sequence[str] | None = None, reference: str | Path = DEFAULT_OUT, tol: float | None = None,
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
    parser.add_argument("--tol", type=float, default=None,
                        help="tolerance of weight sums, relative to the sum of magnitudes (default: per scenario, "
                             "weight_tolerance)")
    parser.add_argument("--no-weights", action="store_true", help="compare trajectories only")
    args = parser.parse_args(argv)
    results = compare_all(args.only, args.reference, args.tol, not args.no_weights)
    print(format_table(results))
    return 0 if all(r == [] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
