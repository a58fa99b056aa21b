"""Record the reference trajectories of every scenario under finetuning-scheduler (FTS) 2.14.1.

Writes ``tests/fts_reference/fts_2.14.1.json``: per scenario its settings, the per-epoch rows and final
parameter sums (and sums of magnitudes) of :class:`~.scenarios.TrajectoryRecorder`, and FTS's info messages and
warnings; plus the FTS, torch, Lightning and Python versions and the CPU kernel level torch ran. FTS is not a
dependency of phasetune: never install it into the project's ``.venv``. Install it alone into a scratch folder
outside the repository and put that folder on ``PYTHONPATH``, so that it runs beside the project's own torch and
Lightning; from the repository root::

    .venv/bin/python -m pip install --no-deps --target ../fts-pkg finetuning-scheduler==2.14.1
    ATEN_CPU_CAPABILITY=default PYTHONPATH=../fts-pkg nice -n 10 .venv/bin/python -m tests.fts_reference.record

(``[--only NAME ...] [--out PATH]``). The committed file was recorded with ``ATEN_CPU_CAPABILITY=default``. It
takes about 15 s on 2 CPU cores. The output is deterministic on one machine and kernel level: two runs give
byte-identical JSON (``--out`` to a second path and ``cmp`` them). Another CPU, or another kernel level, moves the
weight sums in their last digits (tests/fts_reference/compare.py compares them within a derived tolerance); the
trajectories stay the same.

``--checkpoint`` instead writes ``fts_2.14.1_phase1.ckpt``: the ``last.ckpt`` FTS saves after epoch 4 of the
``es_restore_best`` scenario (in phase 1), with the run's temporary directory in its paths replaced by
``<root>``; the tests check what phasetune says when asked to resume from it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from .scenarios import SCENARIOS, run_scenario

HERE = Path(__file__).resolve().parent
FTS_VERSION = "2.14.1"
DEFAULT_OUT = HERE / f"fts_{FTS_VERSION}.json"
CHECKPOINT_OUT = HERE / f"fts_{FTS_VERSION}_phase1.ckpt"


def record(names: list[str] | None = None) -> dict[str, Any]:
    """Run the scenarios (all, or those named) under FTS and return the JSON-ready document."""
    import finetuning_scheduler
    import lightning
    import torch
    from finetuning_scheduler import FinetuningScheduler, FTSCheckpoint, FTSEarlyStopping

    if finetuning_scheduler.__version__ != FTS_VERSION:
        sys.exit(f"expected finetuning-scheduler {FTS_VERSION}, found {finetuning_scheduler.__version__}")
    doc: dict[str, Any] = {
        "recorded_with": {
            "finetuning_scheduler": finetuning_scheduler.__version__,
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "scenarios": {},
    }
    for sc in SCENARIOS:
        if names and sc.name not in names:
            continue
        print(f"[record] {sc.name}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix=f"fts_{sc.name}_") as root:
            result = run_scenario(sc, FinetuningScheduler, FTSEarlyStopping, FTSCheckpoint, root)
        doc["scenarios"][sc.name] = {"scenario": sc.to_dict(), **result}
    return doc


def record_checkpoint(out: Path) -> None:
    """Write the ``last.ckpt`` of a 5-epoch ``es_restore_best`` run under FTS (it ends in phase 1) to ``out``."""
    import dataclasses

    import torch
    from finetuning_scheduler import FinetuningScheduler, FTSCheckpoint, FTSEarlyStopping

    from .scenarios import scenario

    sc = dataclasses.replace(scenario("es_restore_best"), trainer={"max_epochs": 5},
                             checkpoint={**scenario("es_restore_best").checkpoint, "save_last": True})
    with tempfile.TemporaryDirectory(prefix="fts_checkpoint_") as root:
        run_scenario(sc, FinetuningScheduler, FTSEarlyStopping, FTSCheckpoint, root)
        ckpt = torch.load(Path(root) / "checkpoints" / "last.ckpt", weights_only=False)

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(root, "<root>")
        if isinstance(value, dict):
            return {scrub(k): scrub(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(scrub(v) for v in value)
        return value

    torch.save(scrub(ckpt), out)
    depth = ckpt["callbacks"]["FinetuningScheduler"]["fts_metadata"]["current_ckpt_depth"]
    print(f"[record] wrote the FTS checkpoint of epoch {ckpt['epoch']} (phase {depth}) to {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="scenario names (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--checkpoint", action="store_true", help=f"write {CHECKPOINT_OUT.name} instead")
    args = parser.parse_args(argv)
    if args.checkpoint:
        record_checkpoint(CHECKPOINT_OUT)
        return
    doc = record(args.only)
    args.out.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"[record] wrote {len(doc['scenarios'])} scenarios to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
