"""Kill harness: a training process SIGKILLed at the worst moments, then resumed, ends bit-equal.

tests/crash_train.py trains (plain strategy, or Lightning) with Dropout, a shuffled DataLoader, restore-best
snapshots on disk, a checkpoint and a full-weights export every epoch. Each run here is a child process (forked
from the forkserver of tests/kill_harness.py: no imports to repeat) that kills itself where ``PHASETUNE_TEST_KILL``
says: in the middle of a checkpoint write or while a checkpoint is moved to its name, a snapshot write, an export,
right after a transition, mid-phase. After every kill the files a resume could pick up are checked (complete,
loadable, nothing half-written visible); the next child resumes from them and is killed at the next point; the
last one finishes. Its final parameters must equal, bit for bit, those of a run that was never killed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kill_harness import KILLED, assert_equal, hidden, load, train, visible
from phasetune.loop.strategy import list_checkpoints
from phasetune.loop.strategy.checkpoint_dirs import is_checkpoint

STEPS_PER_EPOCH = 4
PLAIN_PHASES = [(0, 1, True), (1, 2, True), (2, 3, False)]


def assert_export_usable(export: Path, expected: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import load_file

    assert [p.name for p in visible(export)] == ["model.safetensors"]
    assert_equal(load_file(str(export / "model.safetensors")), expected)  # exact: the export holds the bits


# ---------------------------------------------------------------------------------------------- plain strategy
@pytest.fixture(scope="module")
def plain_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain_reference")
    assert train(out, "plain", record=True) == 0
    return out


def plain_usable(out: Path, reference: Path, exported: int) -> int:
    """Check every file a resume could pick up (the export: the parameters after epoch ``exported``); return the
    epoch of the latest complete checkpoint."""
    ckpts = out / "checkpoints"
    assert all(is_checkpoint(p) for p in visible(ckpts))  # a visible checkpoint directory is a complete one
    for snap in visible(out / "snapshots" / "phasetune_snapshots"):
        torch.load(snap, weights_only=True)  # complete
    assert_export_usable(out / "export", load(reference / f"params_epoch{exported}.pt"))
    return int(list_checkpoints(ckpts)[-1].tag.removeprefix("epoch"))


def test_plain_strategy_killed_at_each_point_resumes_bit_equal(tmp_path, plain_reference):
    ref = plain_reference
    assert eval((ref / "phases.txt").read_text()) == PLAIN_PHASES
    out = tmp_path / "run"

    # 1. during the second checkpoint (epoch1): its rank file half written, inside the hidden directory
    assert train(out, "plain", "write:rank0.pt:2") == KILLED
    assert [c.tag for c in list_checkpoints(out / "checkpoints")] == ["epoch0"]
    assert [h.split("-")[0] for h in hidden(out / "checkpoints")] == [".partial"]
    assert plain_usable(out, ref, exported=0) == 0

    # 2. during the first restore-best snapshot of phase 1 (epoch 1, resumed from epoch0)
    assert train(out, "plain", "write:phase1:1") == KILLED
    assert any(h.startswith(".rank0_phase1") for h in hidden(out / "snapshots" / "phasetune_snapshots"))
    assert plain_usable(out, ref, exported=0) == 0

    # 3. during an export: epoch1's checkpoint is complete, the export still epoch 0's
    assert train(out, "plain", "write:model.safetensors:1") == KILLED
    assert plain_usable(out, ref, exported=0) == 1

    # 4. right after the transition to phase 2 (saved with epoch1): before the first optimizer step of epoch 2
    assert train(out, "plain", f"step:{2 * STEPS_PER_EPOCH + 1}") == KILLED
    assert plain_usable(out, ref, exported=0) == 1

    # 5. mid-phase: in the middle of epoch 3
    assert train(out, "plain", f"step:{3 * STEPS_PER_EPOCH + 3}") == KILLED
    assert plain_usable(out, ref, exported=2) == 2

    assert train(out, "plain") == 0
    assert_equal(load(out / "final.pt"), load(ref / "final.pt"))  # exact: the killed run against the uninterrupted
    assert (out / "phases.txt").read_text() == (ref / "phases.txt").read_text()
    assert [p.name for p in visible(out / "checkpoints")] == ["epoch3", "epoch4"]
    assert hidden(out / "checkpoints") == [] and hidden(out) == []  # what the killed writes left is removed
    assert hidden(out / "snapshots" / "phasetune_snapshots") == []
    assert_export_usable(out / "export", load(ref / "final.pt"))


# ---------------------------------------------------------------------------------------------- Lightning
# ModelParallelStrategy (FSDP2) on one device: sharded checkpoint directories, which Lightning writes in place
@pytest.fixture(scope="module")
def lightning_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning_reference")
    assert train(out, "modelparallel", record=True) == 0
    return out


def lightning_usable(out: Path, reference: Path, exported: int) -> int:
    """Check every checkpoint a resume could pick up (the export: the parameters after epoch ``exported``);
    return the epoch ``last.ckpt`` was saved at."""
    for ckpt in visible(out / "ckpts"):
        assert ckpt.suffix == ".ckpt" and sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp",
                                                                                     "meta.pt"]
        torch.load(ckpt / "meta.pt", weights_only=True)  # complete
    for snap in visible(out / "phasetune_snapshots"):
        torch.load(snap, weights_only=True)
    assert_export_usable(out / "export", load(reference / f"params_epoch{exported}.pt"))
    return torch.load(out / "ckpts" / "last.ckpt" / "meta.pt", weights_only=True)["epoch"]


def test_lightning_killed_at_each_point_resumes_bit_equal_with_sharded_checkpoints_and_disk_snapshots(
        tmp_path, lightning_reference):
    ref = lightning_reference
    assert eval((ref / "phases.txt").read_text()) == [(0, 4, True), (4, 8, True), (8, 11, False)]
    out = tmp_path / "run"

    # 1. while writing epoch=1.ckpt (its metadata, after the shards; epoch 1's new best had replaced phase 0's
    #    snapshot file: the resume from epoch 0 takes that snapshot again when it reruns epoch 1)
    assert train(out, "modelparallel", "write:meta.pt:3") == KILLED
    assert [p.name for p in visible(out / "ckpts")] == ["epoch=0.ckpt", "last.ckpt"]
    assert [h.split("-")[0] for h in hidden(out / "ckpts")] == [".partial"]  # not picked up
    assert lightning_usable(out, ref, exported=1) == 0  # Lightning saves checkpoints after other epoch-end hooks

    # 2. while writing last.ckpt again (epoch 1's): the previous last.ckpt (epoch 0's) stays whole
    assert train(out, "modelparallel", "write:meta.pt:2") == KILLED
    assert [p.name for p in visible(out / "ckpts")] == ["epoch=0.ckpt", "epoch=1.ckpt", "last.ckpt"]
    assert lightning_usable(out, ref, exported=1) == 0

    # 3. during the restore-best snapshot of phase 1 taken at the transition (epoch 4)
    assert train(out, "modelparallel", "write:phase1:1") == KILLED
    assert any(h.startswith(".rank0_phase1") for h in hidden(out / "phasetune_snapshots"))
    assert lightning_usable(out, ref, exported=3) == 3

    # 4. right after the transition to phase 2: before epoch 8's first optimizer step
    assert train(out, "modelparallel", f"step:{8 * STEPS_PER_EPOCH + 1}") == KILLED
    assert lightning_usable(out, ref, exported=7) == 7

    assert train(out, "modelparallel") == 0
    assert_equal(load(out / "final.pt"), load(ref / "final.pt"))  # exact: the killed run against the uninterrupted
    assert (out / "phases.txt").read_text() == (ref / "phases.txt").read_text()
    assert (out / "warnings.txt").read_text() == ""  # every snapshot and random state came back
    assert hidden(out / "ckpts") == [] and hidden(out / "phasetune_snapshots") == []  # killed writes' leftovers removed
    assert_export_usable(out / "export", load(ref / "final.pt"))


# ---------------------------------------------------------------------------------------------- Lightning, full files
# one device: Lightning's full checkpoint files, which phasetune writes under a hidden name next to their final one
def full_file_usable(out: Path, reference: Path, exported: int) -> int:
    """Check every checkpoint a resume could pick up (each loads whole); return the epoch of ``last.ckpt``."""
    for ckpt in visible(out / "ckpts"):
        assert ckpt.suffix == ".ckpt", ckpt
        assert "FinetuningScheduler" in torch.load(ckpt, map_location="cpu", weights_only=False)["callbacks"]
    for snap in visible(out / "phasetune_snapshots"):
        torch.load(snap, weights_only=True)
    assert_export_usable(out / "export", load(reference / f"params_epoch{exported}.pt"))
    assert visible(out / "tmp") == []  # nothing written through the temporary directory, on another filesystem maybe
    return torch.load(out / "ckpts" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"]


def test_lightning_full_checkpoint_killed_while_moved_into_place_or_written_never_shows_a_partial_file(tmp_path):
    ref = tmp_path / "reference"
    assert train(ref, "lightning", record=True) == 0
    out = tmp_path / "run"

    # 1. while epoch=1.ckpt is moved to its name (Lightning's own save: copied there from the temporary directory
    #    when that is on another filesystem, and a kill mid-copy left it half written under its name)
    assert train(out, "lightning", "move:epoch=1.ckpt:1") == KILLED
    assert [p.name for p in visible(out / "ckpts")] == ["epoch=0.ckpt", "last.ckpt"]
    [whole] = hidden(out / "ckpts")  # complete, never renamed: not picked up, removed by the next save
    assert whole.startswith(".partial-epoch=1.ckpt-")
    torch.load(out / "ckpts" / whole, map_location="cpu", weights_only=False)
    assert full_file_usable(out, ref, exported=1) == 0

    # 2. while writing last.ckpt again (epoch 1's, after epoch=1.ckpt): the previous one (epoch 0's) stays whole
    assert train(out, "lightning", "write:last.ckpt:1") == KILLED
    assert [p.name for p in visible(out / "ckpts")] == ["epoch=0.ckpt", "epoch=1.ckpt", "last.ckpt"]
    [torn] = hidden(out / "ckpts")
    assert torn.startswith(".partial-last.ckpt-")
    with pytest.raises(Exception):  # noqa: B017 - torch reports a torn file in several ways
        torch.load(out / "ckpts" / torn, map_location="cpu", weights_only=False)
    assert full_file_usable(out, ref, exported=1) == 0

    assert train(out, "lightning") == 0
    assert_equal(load(out / "final.pt"), load(ref / "final.pt"))  # exact: the killed run against the uninterrupted
    assert (out / "phases.txt").read_text() == (ref / "phases.txt").read_text()
    # resumed from epoch 0's checkpoint, whose restore-best snapshot epoch 1's new best had replaced before the
    # kills: said, and the rerun epoch 1 takes it again
    assert re.fullmatch(r"restore-best snapshot \S+rank0_phase0\.pt was overwritten after this checkpoint \(step 8, "
                        r"checkpoint expects 4\); the phase restores the best state seen after resuming",
                        (out / "warnings.txt").read_text())
    # Lightning's names: epoch 1 saved again after epoch=1.ckpt of the second run; nothing else apart
    assert [p.name for p in visible(out / "ckpts")] == sorted([p.name for p in visible(ref / "ckpts")] +
                                                               ["epoch=1-v1.ckpt"])
    assert hidden(out / "ckpts") == [] and visible(out / "tmp") == []


def test_resuming_from_a_sharded_checkpoint_directory_without_metadata_is_refused_as_incomplete(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from phasetune import ConfigurationError
    from phasetune.lightning.sharded import ShardedStrategyAdapter

    partial = tmp_path / "epoch=3.ckpt"  # what a save killed before its metadata file leaves (outside phasetune's fit)
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\0" * 64)
    adapter = ShardedStrategyAdapter()
    adapter.trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING))  # type: ignore[assignment]
    adapter._fts = SimpleNamespace(run=object(), state_key="FinetuningScheduler", resume_early=None)
    with pytest.raises(ConfigurationError, match=r"epoch=3\.ckpt: it is a directory without meta\.pt, not a complete "
                                                 r"sharded checkpoint .* resume from an earlier checkpoint"):
        adapter.resume_from(partial)
