"""Results over seeds: mean ± sd per arm, paired differences against the baseline, cost ratios."""

from __future__ import annotations

import pytest

from phasetune.lightning.seed_tables import SeedRun, mean_sd, metrics_table, paired_table

RUNS = [
    SeedRun("scheduled", 0, {"test_acc": 0.80}, wall_time=6.0, peak_memory=600),
    SeedRun("full fine-tuning", 0, {"test_acc": 0.78}, wall_time=10.0, peak_memory=1000),
    SeedRun("scheduled", 1, {"test_acc": 0.70}, wall_time=8.0, peak_memory=800),
    SeedRun("full fine-tuning", 1, {"test_acc": 0.72}, wall_time=10.0, peak_memory=1000),
]


def test_mean_sd_uses_the_sample_sd_and_a_dash_for_one_value():
    assert mean_sd([0.80, 0.70]) == "0.7500 ± 0.0707"
    assert mean_sd([0.5]) == "0.5000 ± -"
    assert mean_sd([]) == "-"


def test_metrics_table_has_one_row_per_arm_with_mean_and_sd():
    rows = metrics_table(RUNS).splitlines()
    assert rows[0].split()[:3] == ["arm", "seeds", "test_acc"]
    assert rows[2].startswith("scheduled") and "0.7500 ± 0.0707" in rows[2] and "7.0s" in rows[2]
    assert rows[3].startswith("full fine-tuning") and "0.7500 ± 0.0424" in rows[3]


def test_paired_table_differences_are_taken_seed_by_seed():
    rows = paired_table(RUNS, "full fine-tuning").splitlines()
    # differences +0.02 and -0.02: mean 0, sd 0.0283; the unpaired sds would hide how they cancel
    assert rows[2].split() == ["scheduled", "2", "+0.0000", "±", "0.0283", "0.70x", "0.70x"]


def test_paired_table_needs_the_baseline_arm():
    with pytest.raises(ValueError, match="no runs of the baseline arm 'plain'"):
        paired_table(RUNS, "plain")
