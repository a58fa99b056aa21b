"""The kill harnesses' children: processes forked from one forkserver (that imported Lightning and these tests'
support modules once), each running tests/crash_train.py, killed where ``PHASETUNE_TEST_KILL`` says; and what the
harnesses check their files with. Used by tests/test_kill_harness.py, tests/test_kill_harness_distributed.py, and
the one-process ModelParallel fits of tests/test_exact_resume_sharded.py (``run_in_child``).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import crash_train

KILLED = -signal.SIGKILL

# what the forkserver imports once for every child (what crash_train's front ends import, the 2-process ones too)
PRELOAD = ["lightning.pytorch", "kill_harness", "phasetune.lightning", "torch.distributed.checkpoint",
           "torch.distributed.fsdp", "lightning.pytorch.strategies", "fsdp_cpu", "helpers"]


def _child(out: str, front_end: str, kill: str | None, record: bool, dist_env: dict[str, str] | None = None) -> None:
    """Body of a child process: ``dist_env`` (the distributed variables of one rank of a 2-process job) is set,
    and that rank's output goes to ``out/log<rank>.txt`` (the test shows it when the job fails)."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID", "PHASETUNE_TEST_KILL", "PHASETUNE_TEST_RECORD"):
        os.environ.pop(k, None)
    if dist_env:
        os.environ.update(dist_env)
        Path(out).mkdir(parents=True, exist_ok=True)
        log = os.open(Path(out) / f"log{dist_env['RANK']}.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
    if kill:
        os.environ["PHASETUNE_TEST_KILL"] = kill
    if record:
        os.environ["PHASETUNE_TEST_RECORD"] = "1"
    tempfile.tempdir = str(Path(out) / "tmp")  # Lightning's checkpoint writes go through temporary files
    (Path(out) / "tmp").mkdir(parents=True, exist_ok=True)
    crash_train.main(out, front_end)


def forkserver() -> Any:
    """The multiprocessing context of the children (the first caller's preload list is the one that counts)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_in_child(target: Callable[..., None], *args: Any) -> int:
    """Run ``target(*args)`` in a child process; its exit code (``-SIGKILL`` when it killed itself).

    Children are forked from a forkserver that imported Lightning and these tests once: each starts in
    a moment, and none inherits this process's threads (OpenMP's pool hangs in a child forked after use).
    """
    proc = forkserver().Process(target=target, args=args)
    proc.start()
    proc.join(timeout=300)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
    return proc.exitcode


def train(out: Path, front_end: str, kill: str | None = None, record: bool = False) -> int:
    """Run crash_train in a child process; its exit code (``-SIGKILL`` when it killed itself)."""
    return run_in_child(_child, str(out), front_end, kill, record)


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Exact: a killed and resumed run's tensors bit-equal to the never-killed run's (same machine, operations and
    batches)."""
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def visible(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if not p.name.startswith(".")) if path.is_dir() else []


def hidden(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith(".")) if path.is_dir() else []
