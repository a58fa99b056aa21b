"""bench/gpu_check.py --cpu: the device check runs end to end at tiny sizes (both FSDP2 front ends, the plan, the
prefix cache), so it is known to work the day a GPU is available."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_and_writes_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["front_end"], r["phase"]): r for r in result["rows"]}
    assert set(rows) == {(f, k) for f in ("lightning", "plain") for k in range(3)}
    planned = [rows["plain", k]["planned_peak"] for k in range(3)]
    assert planned[0] < planned[1] < planned[2]
    assert all(r["measured_peak"] is None and r["step_ms"] > 0 for r in rows.values())  # no CUDA: nothing measured
    # numerical: the served epoch skips the embedding and all 4 layers; 10x was measured, 1x would mean no cache
    assert result["prefix_cache"]["speedup"] > 1
    assert "prefix cache" in done.stdout and "lightning" in done.stdout
