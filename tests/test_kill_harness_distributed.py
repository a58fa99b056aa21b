"""Kill harness on 2 processes: a Lightning job (gloo, CPU) under DDP, FSDP1 and FSDP2, one rank SIGKILLed at the
worst moments, then resumed, ends bit-equal on both ranks.

tests/crash_train.py's 2-process front ends train a 3-phase schedule with Dropout, a shuffled DataLoader (Lightning's
DistributedSampler) over data drawing from Python's and NumPy's generators, restore-best snapshots on disk (a file
per rank) and a checkpoint after every epoch (and ``last.ckpt``), resuming from ``last.ckpt``. torchrun tears a
job down its own way, so :func:`run_job` is the launcher: 2 ranks forked from the forkserver of tests/kill_harness.py
(no imports to repeat), with the variables torchrun sets; when one rank kills itself (``PHASETUNE_TEST_KILL``
of that rank: in the middle of a checkpoint or snapshot write) the launcher SIGKILLs the other at once, as a node
crash or the job scheduler does. After every kill the files a resume could pick up are checked (complete, nothing
half-written visible; the interrupted write's leftovers hidden, or, for FSDP1's full files, in the temporary directory
where Lightning writes them first); the next job resumes from them. The last one finishes: every rank's final parameters
(FSDP1: its shards) must equal, bit for bit, those of a job never killed.
"""

from __future__ import annotations

import multiprocessing.connection
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kill_harness import KILLED, _child, assert_equal, forkserver, hidden, load, visible

WORLD = 2
JOB_TIMEOUT_S = 150  # one job (gloo's own timeout, set shorter by crash_train, ends a hung collective before this)
PHASES = [(0, 2, True), (2, 4, True), (4, 5, False)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(out: Path, kind: str, kills: dict[int, str] | None = None) -> list[int]:
    """Run a 2-process job of crash_train's ``kind`` front end in ``out``, ``kills[rank]`` the
    ``PHASETUNE_TEST_KILL`` of a rank; each rank's exit code (``-SIGKILL``: killed).

    A rank that ends with an error or is killed takes the other one with it (SIGKILL). A job still running after
    ``JOB_TIMEOUT_S`` is killed and fails the test, with what its ranks printed.
    """
    kills = kills or {}
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = {"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(WORLD),
               "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "TORCHELASTIC_RUN_ID": f"kill-harness-{port}"}  # Lightning sees a launcher like torchrun
        procs.append(forkserver().Process(target=_child, args=(str(out), kind, kills.get(rank), False, env)))
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while running := [p for p in procs if p.exitcode is None]:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in running:
                    p.kill()
                for p in running:
                    p.join(30)
                break
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"{kind} job in {out} still running after {JOB_TIMEOUT_S} s\n{logs(out)}")
            multiprocessing.connection.wait([p.sentinel for p in running], timeout=left)
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join(30)
    return [p.exitcode for p in procs]


def logs(out: Path) -> str:
    return "\n".join(f"--- rank {r}:\n{(out / f'log{r}.txt').read_text()[-4000:]}"
                     for r in range(WORLD) if (out / f"log{r}.txt").exists())


def finish(out: Path, kind: str) -> None:
    codes = run_job(out, kind)
    assert codes == [0] * WORLD, f"{kind}: exit codes {codes}\n{logs(out)}"


def killed(out: Path, kind: str, rank: int, spec: str) -> str:
    """Run a job whose ``rank`` kills itself where ``spec`` says; return what the hook matched (the other rank
    is killed by the launcher, or fails on its own first: either way it is gone)."""
    codes = run_job(out, kind, {rank: spec})
    marks = sorted(p.name for p in out.glob("killed*.txt"))
    assert codes[rank] == KILLED and 0 not in codes and marks == [f"killed{rank}.txt"], \
        f"{kind}: exit codes {codes}, {marks}\n{logs(out)}"
    what = (out / f"killed{rank}.txt").read_text()
    (out / f"killed{rank}.txt").unlink()
    return what


def assert_shards_complete(ckpt: Path) -> None:
    """Every byte the metadata of a DCP checkpoint directory points to is in its files."""
    from torch.distributed.checkpoint import FileSystemReader

    for info in FileSystemReader(str(ckpt)).read_metadata().storage_data.values():
        assert (ckpt / info.relative_path).stat().st_size >= info.offset + info.length, (ckpt, info)


def usable(out: Path, kind: str) -> int:
    """Check every checkpoint and snapshot a resume could pick up; return the epoch ``last.ckpt`` was saved at."""
    for ckpt in visible(out / "ckpts"):
        assert ckpt.suffix == ".ckpt", ckpt
        if kind == "fsdp2":
            assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
            assert_shards_complete(ckpt)
            state = torch.load(ckpt / "meta.pt", weights_only=True)
        else:
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            assert "state_dict" in state and "optimizer_states" in state
        assert "FinetuningScheduler" in state["callbacks"]
    for snap in visible(out / "phasetune_snapshots"):
        torch.load(snap, weights_only=True)
    last = out / "ckpts" / "last.ckpt"
    return torch.load(last / "meta.pt" if kind == "fsdp2" else last, map_location="cpu", weights_only=False)["epoch"]


def names(path: Path) -> list[str]:
    return [p.name for p in visible(path)]


def assert_torn(path: Path) -> None:
    """``path`` is what a write killed halfway left: not loadable."""
    with pytest.raises(Exception):  # noqa: B017 - torch reports a torn file in several ways
        torch.load(path, map_location="cpu", weights_only=False)


def lightning_temp_files(out: Path) -> list[Path]:
    """The temporary files of Lightning's own checkpoint writes (fsspec transactions: the children's temp dir; under
    FSDP1, whose full files phasetune puts in place itself; under DDP phasetune writes them next to their name)."""
    return visible(out / "tmp")


@pytest.fixture
def reference(tmp_path: Path) -> Any:
    def make(kind: str) -> Path:
        out = tmp_path / f"{kind}_reference"
        finish(out, kind)
        assert eval((out / "phases0.txt").read_text()) == PHASES
        return out

    return make


def assert_finished_like(out: Path, ref: Path) -> None:
    """The resumed job ended where the uninterrupted one did, and tidied up what the killed writes left."""
    for rank in range(WORLD):
        assert_equal(load(out / f"final{rank}.pt"), load(ref / f"final{rank}.pt"))  # exact: killed vs never killed
        assert (out / f"phases{rank}.txt").read_text() == (ref / f"phases{rank}.txt").read_text()
        # no warning in any job: every resume found last.ckpt, and every snapshot and random state came back
        assert not (out / f"warnings{rank}.txt").exists(), (out / f"warnings{rank}.txt").read_text()
    assert hidden(out / "ckpts") == [] and hidden(out / "phasetune_snapshots") == []


def test_ddp_killed_during_a_checkpoint_write_and_a_snapshot_write_resumes_bit_equal(tmp_path, reference):
    ref = reference("ddp")
    out = tmp_path / "run"

    # 1. rank 0 while writing epoch=1.ckpt (phasetune writes it under a hidden name next to it and renames it; not
    #    through Lightning's temporary file, copied in from another filesystem maybe)
    assert "epoch=1.ckpt" in killed(out, "ddp", 0, "write:epoch=1.ckpt:1")
    assert names(out / "ckpts") == ["epoch=0.ckpt", "last.ckpt"] and lightning_temp_files(out) == []
    [torn] = [out / "ckpts" / h for h in hidden(out / "ckpts")]
    assert torn.name.startswith(".partial-epoch=1.ckpt-")
    assert_torn(torn)
    assert usable(out, "ddp") == 0

    # 2. rank 1 while writing its restore-best snapshot of epoch 2 (rank 0 waits for it in ModelCheckpoint's
    #    collective: no checkpoint refers to it)
    assert "rank1_phase1" in killed(out, "ddp", 1, "write:rank1_phase1:2")
    assert names(out / "ckpts") == ["epoch=0.ckpt", "epoch=1.ckpt", "last.ckpt"]
    # (rank 0 writes its own at the same time: when the launcher's kill falls inside, its temporary file is left too)
    [torn] = [out / "phasetune_snapshots" / h for h in hidden(out / "phasetune_snapshots") if h.startswith(".rank1_")]
    assert torn.name.startswith(".rank1_phase1.pt.")
    assert_torn(torn)
    assert usable(out, "ddp") == 1

    finish(out, "ddp")
    assert_finished_like(out, ref)


def test_fsdp1_killed_while_rewriting_last_ckpt_resumes_bit_equal(tmp_path, reference):
    ref = reference("fsdp1")
    out = tmp_path / "run"

    # rank 0 while writing last.ckpt again (epoch 1's): phasetune saves it under a hidden name first, Lightning
    # writes that into a temporary file; the previous last.ckpt (epoch 0's) stays whole
    assert "last.ckpt" in killed(out, "fsdp1", 0, "write:last.ckpt:2")
    assert names(out / "ckpts") == ["epoch=0.ckpt", "epoch=1.ckpt", "last.ckpt"] and hidden(out / "ckpts") == []
    [torn] = lightning_temp_files(out)
    assert_torn(torn)
    assert usable(out, "fsdp1") == 0

    finish(out, "fsdp1")
    assert_finished_like(out, ref)
    assert "epoch=1-v1.ckpt" in names(out / "ckpts")  # epoch 1 again: Lightning does not overwrite epoch=1.ckpt


def test_fsdp2_killed_while_rank_1_writes_its_shard_resumes_bit_equal(tmp_path, reference):
    ref = reference("fsdp2")
    out = tmp_path / "run"

    # rank 1 while writing its shard file of epoch=1.ckpt (its third shard file: after epoch 0's two checkpoints)
    assert "__1_0.distcp" in killed(out, "fsdp2", 1, "write:__1_0.distcp:3")
    assert names(out / "ckpts") == ["epoch=0.ckpt", "last.ckpt"]
    [partial] = [out / "ckpts" / h for h in hidden(out / "ckpts")]
    assert partial.name.startswith(".partial-epoch=1.ckpt-")
    assert not (partial / ".metadata").exists() and not (partial / "meta.pt").exists()
    assert usable(out, "fsdp2") == 0

    finish(out, "fsdp2")
    assert_finished_like(out, ref)


@pytest.mark.parametrize("directory", [True, False], ids=["sharded directory", "full file"])
def test_a_checkpoint_saved_over_another_leaves_its_name_complete_at_every_step(tmp_path, monkeypatch, directory):
    """What the sharded adapters do once every rank has written a checkpoint under its hidden name: no step of
    putting it in place (where a kill could fall) leaves ``last.ckpt`` missing, and leftovers of killed saves go."""
    import os

    from phasetune.lightning.sharded import _put_in_place

    def make(path: Path, text: str) -> None:
        if directory:
            path.mkdir()
            (path / "meta.pt").write_text(text)
        else:
            path.write_text(text)

    def content(path: Path) -> str | None:
        path = path / "meta.pt" if directory else path
        return path.read_text() if path.exists() else None

    final, tmp = tmp_path / "last.ckpt", tmp_path / ".partial-last.ckpt-2"
    make(final, "old")
    make(tmp, "new")
    for left in (".partial-epoch=3.ckpt-1", ".trash-last.ckpt-1"):  # what saves killed earlier left
        make(tmp_path / left, "dead")
    seen = []
    replace = os.replace

    def replace_and_look(src: Any, dst: Any) -> None:
        replace(src, dst)
        seen.append(content(final))

    monkeypatch.setattr(os, "replace", replace_and_look)
    _put_in_place(tmp, final)
    assert content(final) == "new" and None not in seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
