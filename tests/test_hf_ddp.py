"""phasetune.hf under 2-process DDP (gloo, CPU; one torchrun launch of tests/distributed/hf_scenarios.py): the ranks
agree, match one process on the same data order, and resume bit-equal."""

from __future__ import annotations

import pytest
import torch
from transformers.utils import logging as hf_logging

from distributed.hf_scenarios import ddp_run
from helpers import float32_drift
from launch import launch

pytestmark = pytest.mark.usefixtures("plain_process")  # the one-process reference runs in this process
hf_logging.set_verbosity_error()

@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch("hf_scenarios.py", tmp_path_factory.mktemp("hf_ddp"))


@pytest.mark.numerical
@pytest.mark.launched
def test_ddp_ranks_agree_and_match_one_process_with_the_same_data_order(ranks, tmp_path):
    r0, r1 = ranks[0]["run"], ranks[1]["run"]
    assert ranks[0]["world_size"] == 2
    assert r0["phases"] == r1["phases"] and r0["groups"] == r1["groups"] and r0["trainable"] == r1["trainable"]
    assert r0["params"] == r1["params"]  # exact, rank against rank: parameters thawed after DDP wrapped are synced
    assert r0["depth"] == 2 and len(r0["phases"]) == 3
    one, _ = ddp_run(tmp_path, "one", batch=16)
    assert one["phases"] == r0["phases"] and one["groups"] == r0["groups"]
    for n, values in one["params"].items():
        # numerical: 2 ranks' half batches against one process's whole ones (gradients summed in another order);
        # 6 epochs of 4 steps, sums of up to 64 terms (the tiny BERT's intermediate size), weights below 1
        torch.testing.assert_close(torch.tensor(values), torch.tensor(r0["params"][n]), rtol=0,
                                   atol=float32_drift(24, 64), msg=n)


def test_ddp_resume_in_a_later_phase_matches_the_uninterrupted_run_on_every_rank(ranks):
    for rank in ranks:
        assert rank["resumed"]["params"] == rank["run"]["params"]  # exact: resume against the uninterrupted run
        assert rank["resumed"]["phases"] == rank["run"]["phases"]


def test_ddp_every_rank_raises_the_same_memory_check_error_before_its_first_step(ranks):
    first, second = (rank["memory_check"] for rank in ranks)
    assert first == second  # the same problems on both ranks: rank 0's verdict, broadcast
    assert [p.split(":")[0] for p in first["problems"][:3]] == [f"phase {k} will not fit" for k in range(3)]
    assert "DDP on 2 ranks, micro-batch 8 x 8 tokens" in first["problems"][-1] and first["steps"] == 0
