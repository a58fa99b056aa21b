"""FinetuningScheduler under real 2-process DDP (gloo, CPU): one torchrun launch shared by these tests."""

from __future__ import annotations

import pytest
import torch

from helpers import float32_drift
from launch import launch


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch("ddp_scenarios.py", tmp_path_factory.mktemp("ddp"))


def test_epoch_driven_run_ends_at_the_final_depth_with_identical_parameters_on_both_ranks(ranks):
    r0, r1 = ranks[0]["epoch_run"], ranks[1]["epoch_run"]
    assert r0["depth"] == r1["depth"] == 2
    assert r0["epoch"] == 6
    assert [p[:2] for p in r0["phases"]] == [[0, 2], [2, 4], [4, 6]]
    assert r0["params"] == r1["params"]  # exact: rank against rank
    assert [n for _, n in r0["groups"]] == [2, 8, 10]
    assert [lr for lr, _ in r0["groups"]][1:] == [lr for lr, _ in r1["groups"]][1:]  # exact: rank against rank
    # Each rank sees different batches (DistributedSampler): identical parameters prove that gradients of
    # parameters thawed after DDP was built are synchronised (without the re-wrap they diverge).


def test_ddp_resume_from_phase_0_and_phase_1_matches_the_uninterrupted_run_exactly(ranks):
    for rank in ranks:
        ref = rank["epoch_run"]
        for name in ("resumed_phase0", "resumed_phase1"):
            assert rank[name]["params"] == ref["params"], name  # exact: resume against the uninterrupted run
            assert rank[name]["groups"] == ref["groups"], name


def test_early_stopping_transitions_and_restore_best_agree_across_ranks(ranks):
    r0, r1 = ranks[0]["es_run"], ranks[1]["es_run"]
    assert r0["phases"] == r1["phases"] == [
        [0, 4, "early stopping", True],
        [4, 7, "early stopping", True],
        [7, 11, "early stopping", False],
    ]
    assert r0["params"] == r1["params"]  # exact: rank against rank
    assert ranks[0]["es_resumed"]["params"] == r0["params"] == ranks[1]["es_resumed"]["params"]  # exact: resume


FTS_SCENARIOS = ("es_restore_best", "epoch_only_123")


@pytest.fixture(scope="module")
def one_process_thawed(tmp_path_factory):
    """The same FTS reference scenarios on one process: ``[epoch, depth, thawed names]`` per epoch."""
    from fts_reference.scenarios import scenario, thawed_per_epoch
    from phasetune import FinetuningScheduler, FTSCheckpoint, FTSEarlyStopping

    return {name: thawed_per_epoch(scenario(name), FinetuningScheduler, FTSEarlyStopping, FTSCheckpoint,
                                   tmp_path_factory.mktemp(name)) for name in FTS_SCENARIOS}


def test_fts_reference_scenarios_thaw_the_same_sets_each_epoch_on_two_ddp_ranks_as_on_one_process(
        ranks, one_process_thawed):
    for name in FTS_SCENARIOS:
        assert ranks[0]["fts_thawed"][name] == ranks[1]["fts_thawed"][name] == one_process_thawed[name], name


def test_fts_reference_scenarios_on_two_ddp_ranks_thaw_as_many_tensors_each_epoch_as_fts_on_one(ranks):
    from fts_reference.compare import load_reference

    reference = load_reference()["scenarios"]
    for name in FTS_SCENARIOS:
        fts = [[e["epoch"], e["depth"], len(e["thawed"])] for e in reference[name]["epochs"]]
        assert [[e, d, len(t)] for e, d, t in ranks[0]["fts_thawed"][name]] == fts, name


def test_a_metric_the_ranks_see_differently_is_one_decision_for_all_ranks(ranks):
    r0, r1 = ranks[0]["unsynced"], ranks[1]["unsynced"]
    assert r0["reduce_transition_decisions"] is r1["reduce_transition_decisions"] is True
    # rank 1's early stopping ends each phase (rank 0's loss keeps falling); both ranks move together
    assert r0["phases"] == r1["phases"] and len(r0["phases"]) == 3 and r0["epoch"] == r1["epoch"] < 8
    assert len(r0["warnings"]) == 1 and "sync_dist=True" in r0["warnings"][0] and r1["warnings"] == []


def test_ddp_resume_with_dropout_and_random_data_is_bit_equal_on_every_rank(ranks):
    for rank in ranks:
        ref = rank["random_run"]
        assert [p[:2] for p in ref["phases"]] == [[0, 4], [4, 7], [7, 11]] and ref["phases"][0][2]
        for epoch in (3, 8):
            assert rank[f"random_resumed_{epoch}"]["params"] == ref["params"], (epoch, "differs")  # exact: resume


def replay_prefix_cache(epochs: list[list[list[int]]]) -> tuple[int, int, int]:
    """What a rank's cache does with its batches (sample indices by epoch): (batches served, computed, samples).
    A batch is served when all its samples are stored and a stored sample has been checked against a fresh
    computation, which the first batch bringing one back does."""
    stored: set[int] = set()
    verified, served, computed = False, 0, 0
    for batch in (b for epoch in epochs for b in epoch):
        if verified and stored.issuperset(batch):
            served += 1
            continue
        computed += 1
        verified = verified or not stored.isdisjoint(batch)
        stored.update(batch)
    return served, computed, len(stored)


@pytest.mark.numerical
@pytest.mark.launched
def test_prefix_cache_under_ddp_serves_each_ranks_reshuffled_samples_and_trains_as_without_it(ranks):
    seen = [rank["prefix_cached"]["seen"] for rank in ranks]
    for epoch in range(6):  # DistributedSampler: the ranks split the data each epoch, and reshuffle it
        halves = [sorted(i for batch in s[epoch] for i in batch) for s in seen]
        assert sorted(halves[0] + halves[1]) == list(range(48)), epoch
    assert all({i for b in s[0] for i in b} != {i for b in s[1] for i in b} for s in seen)
    for rank, s in zip(ranks, seen):
        cached, plain = rank["prefix_cached"], rank["prefix_plain"]
        assert plain["seen"] == s  # both fits drew the same batches
        assert cached["phases"] == plain["phases"] == [[0, 4], [4, 6]]
        served, computed, samples = replay_prefix_cache(s[:4])
        line = cached["cache_lines"][0]
        assert line.startswith("phase 0: prefix cache up to body.3 (prefix in eval mode"), line
        assert f"{samples} samples" in line and f"{served} batches served from it, {computed} computed" in line, line
        assert served > 0
        assert cached["cache_lines"][1] is None and plain["cache_lines"] == [None, None]
        assert cached["spill_files"] > 0 and cached["spill_folders_left"] == 0
        assert not cached["hooks_left"] and cached["all_in_train_mode"]
        for name, values in cached["params"].items():
            # numerical: a cached row was computed in another batch (a kernel may round it differently there);
            # 6 epochs of 6 steps, sums of 16 terms (width 16), weights below 1
            torch.testing.assert_close(torch.tensor(values), torch.tensor(plain["params"][name]), rtol=0,
                                       atol=float32_drift(36, 16), msg=lambda m, name=name: f"{name}: {m}")
    for run in ("prefix_cached", "prefix_plain"):  # DDP: every rank ends with the same parameters
        assert ranks[0][run]["params"] == ranks[1][run]["params"], run  # exact: rank against rank
