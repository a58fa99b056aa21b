"""Fixtures the test modules share: one plain process, a 1-rank gloo group, the documented examples, and the one
2-process launch two modules read.

Models, data and the plain training loops live in support modules (helpers.py, plain_models.py, loop_runs.py, ...)
because the scripts launched under torchrun import them too; no test module imports another test module.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launch import launch

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTED_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _destroy_group_started_since(had_group: bool) -> None:
    if not had_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def plain_process() -> Iterator[None]:
    """The module's code runs as one plain process: distributed variables an earlier in-process test left in the
    environment (Lightning sets some) would make a Hugging Face Trainer or the plain strategy start a process group
    that later tests inherit; they are removed for the module, and a group started meanwhile is destroyed."""
    had_group = dist.is_available() and dist.is_initialized()
    with pytest.MonkeyPatch.context() as mp:
        for name in DISTRIBUTED_VARIABLES:
            mp.delenv(name, raising=False)
        yield
    _destroy_group_started_since(had_group)


@pytest.fixture
def one_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """One test as one plain process in its own directory (returned), on one thread (tiny models: more threads
    only contend on the shared cores); no distributed variables, and no process group left after it."""
    had_group = dist.is_available() and dist.is_initialized()
    for name in DISTRIBUTED_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)
    _destroy_group_started_since(had_group)


@pytest.fixture(scope="module")
def gloo_one_rank() -> Iterator[None]:
    """A 1-rank gloo process group for the module: FSDP1, FSDP2 and DTensor shard and flatten on CPU as with more
    ranks."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def run_doc_example() -> Callable[[str, str], list[str]]:
    """``run_doc_example(doc, test_file)``: run the Python block of ``docs/<doc>`` that a ``<!-- tested:
    tests/<test_file> ... -->`` comment marks; the lines it printed."""

    def run(doc: str, test_file: str) -> list[str]:
        text = (ROOT / "docs" / doc).read_text()
        code = re.search(rf"<!-- tested: tests/{re.escape(test_file)} .*? -->\s*```python\n(.*?)```", text,
                         re.S).group(1)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"docs/{doc}", "exec"), {})
        return printed.getvalue().splitlines()

    return run


@pytest.fixture(scope="session")
def audit_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The one torchrun launch of tests/distributed/audit_scenarios.py, read by test_audit.py and test_compile.py."""
    return launch("audit_scenarios.py", tmp_path_factory.mktemp("audit_scenarios"))
