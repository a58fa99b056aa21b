"""FinetuningScheduler under real 2-process DDP (gloo, CPU): one torchrun launch shared by these tests."""

from __future__ import annotations

import pytest

from launch import launch


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch("ddp_scenarios.py", tmp_path_factory.mktemp("ddp"))


def test_epoch_driven_run_ends_at_the_final_depth_with_identical_parameters_on_both_ranks(ranks):
    r0, r1 = ranks[0]["epoch_run"], ranks[1]["epoch_run"]
    assert r0["depth"] == r1["depth"] == 2
    assert r0["epoch"] == 6
    assert [p[:2] for p in r0["phases"]] == [[0, 2], [2, 4], [4, 6]]
    assert r0["params"] == r1["params"]
    assert [n for _, n in r0["groups"]] == [2, 8, 10]
    assert [lr for lr, _ in r0["groups"]][1:] == [lr for lr, _ in r1["groups"]][1:]
    # Each rank sees different batches (DistributedSampler): identical parameters prove that gradients of
    # parameters thawed after DDP was built are synchronised (without the re-wrap they diverge).


def test_ddp_resume_from_phase_0_and_phase_1_matches_the_uninterrupted_run_exactly(ranks):
    for rank in ranks:
        ref = rank["epoch_run"]
        for name in ("resumed_phase0", "resumed_phase1"):
            assert rank[name]["params"] == ref["params"], name
            assert rank[name]["groups"] == ref["groups"], name


def test_early_stopping_transitions_and_restore_best_agree_across_ranks(ranks):
    r0, r1 = ranks[0]["es_run"], ranks[1]["es_run"]
    assert r0["phases"] == r1["phases"] == [
        [0, 4, "early stopping", True],
        [4, 7, "early stopping", True],
        [7, 11, "early stopping", False],
    ]
    assert r0["params"] == r1["params"]
    assert ranks[0]["es_resumed"]["params"] == r0["params"] == ranks[1]["es_resumed"]["params"]
