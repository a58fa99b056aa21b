"""Same schedule, same callbacks, same trajectory as finetuning-scheduler (FTS) 2.14.1.

The reference runs were recorded from FTS itself (tests/fts_reference/record.py, in a scratch environment: FTS
is not a dependency). Each scenario runs here under phasetune and must match per epoch: phase, thawed set,
param groups, lrs, global step, and the weights (parameter sums within 1e-6).
"""

from __future__ import annotations

import pytest

from fts_reference.compare import diff_records, load_reference, run_phasetune
from fts_reference.scenarios import SCENARIOS

REFERENCE = load_reference()["scenarios"]


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_phasetune_runs_the_fts_trajectory(sc, tmp_path):
    assert diff_records(REFERENCE[sc.name], run_phasetune(sc, tmp_path)) == []
