"""Run a test script on 2 CPU processes (torchrun, gloo) and collect what each rank reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def launch(script: str, out_dir: Path, *args: str, nproc: int = 2, timeout: float = 600) -> list[dict]:
    """Start ``tests/distributed/<script>`` under torchrun; return each rank's ``rank<N>.json`` report.

    A failing run raises with the output of every rank so the cause is visible in the test report.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(ROOT / "distributed" / script), str(out_dir), *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=out_dir)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-12000:]}")
    reports = []
    for rank in range(nproc):
        path = out_dir / f"rank{rank}.json"
        if not path.exists():
            raise RuntimeError(f"{script}: rank {rank} wrote no report\n{proc.stderr[-6000:]}")
        reports.append(json.loads(path.read_text()))
    return reports


def digest(module) -> dict[str, list[float]]:
    """Parameters as exact float lists (JSON-safe, bit-comparable across processes)."""
    return {n: p.detach().double().flatten().tolist() for n, p in module.named_parameters()}


def write_report(out_dir: str, rank: int, report: dict) -> None:
    path = Path(out_dir) / f"rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    tmp.replace(path)
