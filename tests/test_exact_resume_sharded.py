"""Exact resume under Lightning on 2 processes (DDP, FSDP1, FSDP2 through ModelParallelStrategy; one launch of
tests/distributed/resume_scenarios.py), with a shuffling distributed sampler, Dropout, noise from random/NumPy and
restore-best: resumed from epoch checkpoints, and with torchdata's StatefulDataLoader from the middle of an epoch,
every rank ends bit-equal to the uninterrupted run. ModelParallel checkpoints move 2 -> 1 and 1 -> 2 re-seeded.
Kills mid-write: tests/test_kill_harness_distributed.py; the plain strategy on other numbers of processes:
tests/test_topology.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kill_harness import run_in_child
from launch import launch
from phasetune import ConfigurationError

# tests/distributed/resume_scenarios.py: one 2-process launch; each strategy trains uninterrupted, then resumes
# from several epoch checkpoints (inside phase 0, the last epoch before a transition, the first after it, the
# last of phase 1) and, with a StatefulDataLoader over torchdata's StatefulDistributedSampler, from step checkpoints
# in the middle of an epoch (mid phase 0; after the first batch following a transition), with a shuffling
# distributed sampler, Dropout, noise from random/NumPy, restore_best
SHARDED = ("ddp", "fsdp1", "fsdp2", "fsdp2_full")
# FSDP1's full optimizer state was gathered with offload_to_cpu=True, which on CPU (torch 2.13) saved exp_avg_sq's
# values as exp_avg too; epoch resumes did not show it (a restore-best rollback followed each), a mid-epoch one did
@pytest.mark.parametrize("kind", ["ddp", "fsdp1", "fsdp2_full"])
def test_a_full_checkpoint_keeps_the_two_adam_moments_of_each_parameter_apart(sharded_ranks, kind):
    assert sharded_ranks[0][kind]["moments_apart"] is True


# FSDP and ModelParallel resume through the sharded adapter, which applies the scheduler's state before Lightning
# calls on_load_checkpoint: it must learn there that the checkpoint is mid-epoch, or the random state comes back
# before Lightning re-creates the StatefulDataLoader's iterator (which draws from torch's generator)
MID_EPOCH = ("ddp", "fsdp1", "fsdp2")


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_resume")
    # a ModelParallel checkpoint saved by one process, for the launch to continue on 2 (1 -> 2)
    one = fit_on_one_process(out / "fsdp2_one_device", None, "exact")
    assert one["phases"] == [[0, 2, True], [2, 4, True], [4, 5, False]]
    return launch("resume_scenarios.py", out, "lightning", str(out / "fsdp2_one_device" / "fit" / "epoch=2.ckpt")), out


@pytest.fixture(scope="module")
def sharded_ranks(sharded_run):
    return sharded_run[0]


def resumed_fits(rank: dict, kind: str, point: str = "epoch=") -> dict[str, dict]:
    return {k: v for k, v in rank[kind].items() if k.startswith(point)}


@pytest.mark.parametrize("kind", SHARDED)
def test_a_sharded_resume_from_each_epoch_checkpoint_is_bit_equal_with_shuffling_and_dropout(sharded_ranks, kind):
    assert sharded_ranks[0][kind]["reference"]["phases"] == [[0, 2, True], [2, 4, True], [4, 5, False]]  # rolled back
    assert len(resumed_fits(sharded_ranks[0], kind)) >= 2
    for rank in sharded_ranks:  # each rank's parameters (under FSDP1 its shards)
        reference = rank[kind]["reference"]
        for point, fit in resumed_fits(rank, kind).items():
            assert fit["phases"] == reference["phases"], point
            assert fit["final"] == reference["final"], point  # exact: resume against the uninterrupted run
            assert fit["warnings"] == [], point  # every snapshot and random state came back
    for fit in sharded_ranks[0][kind].values():
        if isinstance(fit, dict) and "final" in fit:  # saved atomically (nothing hidden left behind), the strategy given back unpatched
            assert fit["hidden_files"] == [] and fit["patches_left"] == []


@pytest.mark.parametrize("kind", MID_EPOCH)
def test_a_2_process_mid_epoch_resume_with_stateful_dataloader_and_sampler_is_bit_equal(sharded_ranks, kind):
    assert sharded_ranks[0][kind]["sds_reference"]["phases"] == [[0, 2, True], [2, 4, True], [4, 5, False]]
    # mid phase 0; phase 1's first step, after a rollback
    assert sorted(resumed_fits(sharded_ranks[0], kind, "sds_step=")) == ["sds_step=6", "sds_step=9"]
    for rank in sharded_ranks:
        reference = rank[kind]["sds_reference"]
        for point, fit in resumed_fits(rank, kind, "sds_step=").items():
            assert fit["phases"] == reference["phases"], point
            assert fit["final"] == reference["final"], point  # exact: resume against the uninterrupted run
            step = int(point.removeprefix("sds_step="))
            assert fit["losses"] == {k: v for k, v in reference["losses"].items() if int(k) > step}, point
            assert fit["warnings"] == [], point  # no "saved no position" warning, every snapshot and generator back
            assert fit["hidden_files"] == [] and fit["patches_left"] == [], point


# StatefulDataLoader(shuffle=True) under DDP: Lightning wraps torchdata's RandomSampler, which draws each epoch's
# order from a generator of its own, in its DistributedSamplerWrapper (not stateful). A mid-epoch resume needs that
# generator as the epoch started and the sampler's epoch before Lightning 2.6 creates the iterator (before
# set_epoch), and the fast-forward, which starts the sampler twice, to draw the same order both times
def test_a_2_process_resume_with_a_stateful_dataloader_over_lightnings_distributed_sampler_is_bit_equal(sharded_ranks):
    for rank in sharded_ranks:
        reference = rank["ddp"]["stateful_reference"]
        for point, first_step in (("step=6", 7), ("stateful_epoch=2", 13)):
            fit = rank["ddp"][point]
            assert fit["phases"] == reference["phases"], point
            assert fit["final"] == reference["final"], point  # exact: resume against the uninterrupted run
            # every step after the resume saw the same batch and dropout mask: the rest of epoch 1 too, which
            # restore-best rolls back (the final parameters alone would not show it)
            assert sorted(fit["losses"], key=int)[0] == str(first_step), point
            assert fit["losses"] == {k: v for k, v in reference["losses"].items() if int(k) >= first_step}, point
            assert fit["warnings"] == [] and fit["patches_left"] == [], point


def test_a_sharded_resume_without_the_random_state_differs(sharded_ranks):
    expected = sharded_ranks[0]["fsdp2"]["reference"]["final"]
    assert sharded_ranks[0]["fsdp2"]["without_random_state"]["final"] != expected  # exact: the control differs


@pytest.mark.parametrize("kind", SHARDED)
def test_a_sharded_checkpoint_holds_the_random_state_of_every_rank(sharded_ranks, kind):
    assert sharded_ranks[0][kind]["saved_rng"] == {"world_size": 2, "ranks": [0, 1],
                                                   "generators": ["numpy", "python", "torch"]}


def _fit_on_one_process(out: str, ckpt: str | None, resume_rng: str) -> None:
    """Child: the scenarios' ModelParallel fit on one device (from ``ckpt``, if given); what it saw (or raised) to
    out/result.json."""
    import importlib.util
    import json

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("resume_scenarios", Path(__file__).parent / "distributed" / "resume_scenarios.py")
    scenarios = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scenarios)
    try:
        result = scenarios.lightning_fit()("fsdp2", Path(out), "fit", Path(ckpt) if ckpt else None, devices=1,
                                           resume_rng=resume_rng)
    except ConfigurationError as e:
        result = {"error": str(e)}
    Path(out, "result.json").write_text(json.dumps(result))


def fit_on_one_process(out: Path, ckpt: Path | None, resume_rng: str) -> dict:
    import json

    assert run_in_child(_fit_on_one_process, str(out), str(ckpt) if ckpt else None, resume_rng) == 0
    return json.loads((out / "result.json").read_text())


def test_a_2_process_model_parallel_checkpoint_on_1_is_refused_then_continues_re_seeded(sharded_run, tmp_path):
    ranks, out = sharded_run
    ckpt = out / "fsdp2_ref" / "epoch=2.ckpt"  # phase 1, sharded on 2 processes
    refused = fit_on_one_process(tmp_path / "exact", ckpt, "exact")["error"]
    assert "saved by 2 processes and this run has 1" in refused and "resume_rng='reseed'" in refused
    assert "\n" not in refused
    fit = fit_on_one_process(tmp_path / "reseed", ckpt, "reseed")
    # DCP resharded model and optimizer state, the phase state as saved: the schedule goes on where it was
    assert [p[:2] for p in fit["phases"]] == [[0, 2], [2, 4], [4, 5]]
    said = " ".join(fit["warnings"])
    assert "re-seeded" in said  # the random state
    assert "restore-best snapshot was taken on 2 ranks, this run has 1" in said  # each rank's shards: dropped


def test_a_1_process_model_parallel_checkpoint_continues_on_2_re_seeded(sharded_ranks):
    for rank in sharded_ranks:
        fit = rank["fsdp2"]["from_one_device"]
        assert [p[:2] for p in fit["phases"]] == [[0, 2], [2, 4], [4, 5]]  # resharded by DCP, the phase state as saved
        assert fit["hidden_files"] == [] and fit["patches_left"] == []
    said = " ".join(sharded_ranks[0]["fsdp2"]["from_one_device"]["warnings"])
    assert "re-seeded" in said
    assert "restore-best snapshot was taken on 1 rank" in said
    # both ranks trained the same model (DCP gathered from shards of one full state); exact, rank against rank
    assert sharded_ranks[0]["fsdp2"]["from_one_device"]["final"] == sharded_ranks[1]["fsdp2"]["from_one_device"]["final"]
