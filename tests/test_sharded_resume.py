"""The sharded adapters' read of a checkpoint's FinetuningScheduler state before the strategy loads it.

Paths are read through fsspec as Lightning reads them (``memory://`` stands in for remote storage), with the
``weights_only`` the strategy's own load uses; a checkpoint that cannot be read is one clear line. A resume
through a real FSDP1 fit is in tests/test_fsdp.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import fsspec
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn

from phasetune import ConfigurationError
from phasetune.lightning.sharded import ShardedStrategyAdapter, read_callback_state

KEY = "FinetuningScheduler"
CHECKPOINT = {"epoch": 3, "callbacks": {KEY: {"depth": 1}}}


def write(url: str, obj: Any) -> str:
    with fsspec.open(url, "wb") as f:
        torch.save(obj, f)
    return url


def resuming_adapter() -> tuple[ShardedStrategyAdapter, list[dict]]:
    """An adapter in a fit, connected to a stand-in scheduler that records the state it is asked to resume."""
    resumed: list[dict] = []
    adapter = ShardedStrategyAdapter()
    adapter.trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING))  # type: ignore[assignment]
    adapter._fts = SimpleNamespace(run=object(), state_key=KEY,
                                   resume_early=lambda state, mid_epoch=False: resumed.append(state))
    return adapter, resumed


def test_a_checkpoint_file_behind_an_fsspec_url_is_read(tmp_path):
    url = write(f"memory://{tmp_path.name}/epoch=3.ckpt", CHECKPOINT)
    assert read_callback_state(url, KEY, weights_only=True) == {"depth": 1}


def test_a_sharded_checkpoint_directory_behind_a_url_is_read_from_its_metadata_file(tmp_path):
    write(f"memory://{tmp_path.name}/epoch=3.ckpt/meta.pt", CHECKPOINT)
    assert read_callback_state(f"memory://{tmp_path.name}/epoch=3.ckpt", KEY, weights_only=True) == {"depth": 1}
    assert read_callback_state(f"memory://{tmp_path.name}", KEY) is None  # a directory without meta.pt


def test_a_local_file_url_is_read_like_its_path(tmp_path):
    torch.save(CHECKPOINT, tmp_path / "epoch=3.ckpt")
    assert read_callback_state(f"file://{tmp_path}/epoch=3.ckpt", KEY, weights_only=True) == {"depth": 1}


def test_resuming_from_a_url_rebuilds_the_saved_phase_instead_of_skipping_it(tmp_path):
    adapter, resumed = resuming_adapter()
    url = write(f"memory://{tmp_path.name}/epoch=3.ckpt", CHECKPOINT)
    assert adapter.resume_from(url) is True
    assert resumed == [{"depth": 1}]


def test_a_missing_checkpoint_is_left_to_the_strategy_to_report(tmp_path):
    adapter, resumed = resuming_adapter()
    assert adapter.resume_from(f"memory://{tmp_path.name}/missing.ckpt") is False
    assert adapter.resume_from(tmp_path / "missing.ckpt") is False
    assert resumed == []


def test_a_checkpoint_without_scheduler_state_is_refused_with_its_path(tmp_path):
    adapter, _ = resuming_adapter()
    url = write(f"memory://{tmp_path.name}/plain.ckpt", {"epoch": 3, "callbacks": {}})
    with pytest.raises(ConfigurationError, match=r"plain\.ckpt: it holds no FinetuningScheduler state"):
        adapter.resume_from(url)


def test_a_corrupt_checkpoint_is_reported_in_one_line_naming_it(tmp_path):
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigurationError) as e:
        read_callback_state(tmp_path / "broken.ckpt", KEY, weights_only=True)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "broken.ckpt") in message and "complete checkpoint" in message
