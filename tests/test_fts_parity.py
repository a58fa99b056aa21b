"""Same schedule, same callbacks, same trajectory as finetuning-scheduler (FTS) 2.14.1.

The reference runs were recorded from FTS itself (tests/fts_reference/record.py, with FTS in a scratch folder: it
is not a dependency). Each scenario runs here under phasetune and must match per epoch, exactly: phase, thawed set,
param groups, lrs, global step; and numerically the weights: FTS ran on another CPU, whose kernels round
differently (the weight sums within ``weight_tolerance`` of their magnitudes, derived in compare.py).
"""

from __future__ import annotations

import pytest

from fts_reference.compare import diff_records, load_reference, run_phasetune
from fts_reference.scenarios import SCENARIOS

REFERENCE = load_reference()["scenarios"]


@pytest.mark.numerical
@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_phasetune_runs_the_fts_trajectory(sc, tmp_path):
    # trajectory exact; weights numerical: within weight_tolerance (16 roundings per step) of their magnitudes
    assert diff_records(REFERENCE[sc.name], run_phasetune(sc, tmp_path)) == []
