"""phasetune.util.files's put-in-place helpers: a complete file or directory replaces what is under its name without a
moment where the name holds nothing (or a mix of old and new), with the two-step fallback where the system cannot
swap two names."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest

from phasetune.util import files


def make(path: Path, text: str, directory: bool) -> None:
    if directory:
        path.mkdir()
        (path / "meta.pt").write_text(text)
        (path / "shard").write_text(text)
    else:
        path.write_text(text)


def content(path: Path) -> Any:
    """What ``path`` holds: its text, ``{name: text}`` for a directory, None when nothing is there."""
    if path.is_dir():
        return {p.name: p.read_text() for p in sorted(path.iterdir())}
    return path.read_text() if path.exists() else None


def names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.fixture
def watched(monkeypatch):
    """Every rename (os.replace) and name swap (files._exchange) replace_path makes, with what the final name holds
    right after it: a kill can fall between any two."""
    seen: list[tuple[str, Any]] = []
    final: list[Path] = []
    replace, exchange = os.replace, files._exchange

    def replace_and_look(src: Any, dst: Any) -> None:
        replace(src, dst)
        seen.append(("replace", content(final[0])))

    def exchange_and_look(a: Path, b: Path) -> bool:
        done = exchange(a, b)
        seen.append(("exchange" if done else "no exchange", content(final[0])))
        return done

    monkeypatch.setattr(os, "replace", replace_and_look)
    monkeypatch.setattr(files, "_exchange", exchange_and_look)
    return seen, final


REAL_EXCHANGE = files._exchange  # the tests' watch replaces it


def swap_works(tmp_path: Path) -> bool:
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return REAL_EXCHANGE(a, b)
    finally:
        a.rmdir()
        b.rmdir()


def test_a_file_replaces_a_file_in_one_rename(tmp_path, watched):
    seen, final = watched
    final.append(tmp_path / "last.ckpt")
    make(final[0], "old", directory=False)
    make(tmp_path / ".partial-last.ckpt-1", "new", directory=False)
    files.replace_path(tmp_path / ".partial-last.ckpt-1", final[0])
    assert seen == [("replace", "new")]
    assert names(tmp_path) == ["last.ckpt"]


@pytest.mark.parametrize("directory", [True, False], ids=["directory", "file"])
def test_a_new_name_is_one_rename(tmp_path, watched, directory):
    seen, final = watched
    final.append(tmp_path / "epoch=3.ckpt")
    make(tmp_path / ".partial-epoch=3.ckpt-1", "new", directory)
    files.replace_path(tmp_path / ".partial-epoch=3.ckpt-1", final[0])
    assert seen == [("replace", content(final[0]))] and content(final[0]) in ("new", {"meta.pt": "new", "shard": "new"})
    assert names(tmp_path) == ["epoch=3.ckpt"]


@pytest.mark.parametrize("old_directory", [True, False], ids=["over a directory", "over a file"])
def test_a_directory_is_swapped_in_and_the_old_one_removed(tmp_path, watched, old_directory):
    if not swap_works(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is unavailable here (the fallback test covers this system)")
    seen, final = watched
    final.append(tmp_path / "last.ckpt")
    make(final[0], "old", old_directory)
    make(tmp_path / ".partial-last.ckpt-2", "new", directory=True)
    files.replace_path(tmp_path / ".partial-last.ckpt-2", final[0])
    new = {"meta.pt": "new", "shard": "new"}
    assert seen == [("exchange", new)]  # no rename at all: the old one went with the swap's removal
    assert content(final[0]) == new and names(tmp_path) == ["last.ckpt"]


def test_a_file_replaces_a_directory_by_a_swap(tmp_path, watched):
    if not swap_works(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is unavailable here (the fallback test covers this system)")
    seen, final = watched
    final.append(tmp_path / "last.ckpt")
    make(final[0], "old", directory=True)  # a sharded last.ckpt of an earlier run, now saved as a full file
    make(tmp_path / ".partial-last.ckpt-2", "new", directory=False)
    files.replace_path(tmp_path / ".partial-last.ckpt-2", final[0])
    assert seen == [("exchange", "new")] and names(tmp_path) == ["last.ckpt"]


def test_without_a_swap_the_old_directory_is_moved_aside_first_and_removed(tmp_path, watched, monkeypatch):
    seen, final = watched
    monkeypatch.setattr(files, "_renameat2", lambda: None)  # another system, or a C library without renameat2
    final.append(tmp_path / "last.ckpt")
    make(final[0], "old", directory=True)
    make(tmp_path / ".partial-last.ckpt-2", "new", directory=True)
    files.replace_path(tmp_path / ".partial-last.ckpt-2", final[0])
    new = {"meta.pt": "new", "shard": "new"}
    # the gap the docstring names: between the two renames the name holds nothing
    assert seen == [("no exchange", {"meta.pt": "old", "shard": "old"}), ("replace", None), ("replace", new)]
    assert content(final[0]) == new and names(tmp_path) == ["last.ckpt"]


@pytest.mark.parametrize("err", ["EINVAL", "EOPNOTSUPP", "ENOSYS"])
def test_a_filesystem_that_cannot_swap_falls_back(tmp_path, monkeypatch, err):
    import errno

    class Refusing:
        def __call__(self, *args: Any) -> int:
            import ctypes

            ctypes.set_errno(getattr(errno, err))
            return -1

    monkeypatch.setattr(files, "_renameat2", lambda: Refusing())
    monkeypatch.setattr(files.sys, "platform", "linux")
    final = tmp_path / "last.ckpt"
    make(final, "old", directory=True)
    make(tmp_path / ".partial-last.ckpt-2", "new", directory=True)
    files.replace_path(tmp_path / ".partial-last.ckpt-2", final)
    assert content(final) == {"meta.pt": "new", "shard": "new"} and names(tmp_path) == ["last.ckpt"]


def test_another_swap_error_is_raised(tmp_path):
    missing = tmp_path / "missing"
    (tmp_path / "there").mkdir()
    if not swap_works(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is unavailable here")
    with pytest.raises(FileNotFoundError):
        files._exchange(missing, tmp_path / "there")


def test_leftovers_of_killed_saves_are_removed_and_nothing_else(tmp_path):
    for name in (".partial-epoch=3.ckpt-17", ".trash-last.ckpt-18", ".partial-export-19"):
        make(tmp_path / name, "dead", directory=name.endswith("9"))
    for name in ("epoch=3.ckpt", ".partial-notes", ".trash-me", ".hidden", ".partial-x-1a"):
        make(tmp_path / name, "kept", directory=False)
    files.remove_leftovers(tmp_path, "last.ckpt")
    assert ".trash-last.ckpt-18" not in names(tmp_path) and ".partial-epoch=3.ckpt-17" in names(tmp_path)
    files.remove_leftovers(tmp_path)
    assert names(tmp_path) == [".hidden", ".partial-notes", ".partial-x-1a", ".trash-me", "epoch=3.ckpt"]


def test_atomic_write_under_a_given_name_gets_normal_permissions_and_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "sub" / "epoch=0.ckpt"
    tmp = files.partial_path(final)
    assert tmp.parent == final.parent and tmp.name.startswith(".partial-epoch=0.ckpt-")
    tmp.parent.mkdir()
    files.atomic_write(final, lambda f: f.write(b"data"), tmp=tmp)
    umask = os.umask(0)
    os.umask(umask)
    assert final.read_bytes() == b"data" and (final.stat().st_mode & 0o777) == 0o666 & ~umask
    assert names(final.parent) == ["epoch=0.ckpt"]

    def fail(f: Any) -> None:
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        files.atomic_write(final, fail, tmp=files.partial_path(final))
    assert final.read_bytes() == b"data" and names(final.parent) == ["epoch=0.ckpt"]


# ---------------------------------------------------------------------------------------------- Lightning's files
# During a fit the strategy adapters write Lightning's full checkpoint files with atomic_write, under a hidden name
# next to the final one (not through a temporary file elsewhere, copied in when that is another filesystem).
def fit_and_list(root: Path, save_last: Any) -> tuple[list[tuple[Any, ...]], Any]:
    """A short fit with FTSCheckpoint (top 2 kept, ``save_last``); every checkpoint entry with what Lightning
    decides about it: name, symlink target, permissions, epoch saved."""
    import warnings

    import torch

    from helpers import SCHEDULE_3, ToyModule, trainer
    from phasetune import FinetuningScheduler, FTSCheckpoint

    ck = FTSCheckpoint(monitor="val_loss", save_top_k=2, save_last=save_last, dirpath=str(root / "ckpts"),
                       filename="{epoch}")
    t = trainer(root, [FinetuningScheduler(ft_schedule=SCHEDULE_3), ck], max_epochs=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(ToyModule(val_losses=[1.0, 0.9, 0.95, 0.8, 0.85]))
    listing = [(p.name, os.readlink(p) if p.is_symlink() else None, p.lstat().st_mode & 0o777,
                torch.load(p, map_location="cpu", weights_only=False)["epoch"]) for p in sorted((root / "ckpts").iterdir())]
    return listing, t


@pytest.mark.parametrize("save_last", [True, "link"])
def test_lightning_checkpoint_files_keep_their_names_links_removals_and_permissions(tmp_path, monkeypatch, save_last):
    from phasetune.lightning.adapters import StrategyAdapter

    written: list[str] = []
    atomic_write = files.atomic_write

    def watch(path: Any, write: Any, *, tmp: Any = None) -> Path:
        if str(path).endswith(".ckpt"):
            written.append(Path(tmp).name if tmp is not None else "a temporary file of its own")
        return atomic_write(path, write, tmp=tmp)

    monkeypatch.setattr(files, "atomic_write", watch)
    ours, t = fit_and_list(tmp_path / "ours", save_last)
    assert "save_checkpoint" not in vars(t.strategy.checkpoint_io)  # the patch is gone with the fit
    copies = 5 if save_last is True else 0  # a link: last.ckpt is no file of its own
    assert len(written) == 5 + copies and all(re.fullmatch(r"\.partial-(epoch=\d|last)\.ckpt-\d+", w) for w in written)
    monkeypatch.setattr(StrategyAdapter, "route_file_saves", lambda self, strategy: None)
    lightnings, _ = fit_and_list(tmp_path / "lightnings", save_last)
    assert ours == lightnings
    # old top-k files removed (FTSCheckpoint keeps the best of the phase), last.ckpt a copy or a link
    assert [entry[:2] for entry in ours] == [("epoch=3.ckpt", None), ("epoch=4.ckpt", None),
                                             ("last.ckpt", "epoch=4.ckpt" if save_last == "link" else None)]


def test_only_local_paths_of_lightnings_own_checkpoint_io_are_routed(tmp_path, monkeypatch):
    import fsspec
    import torch
    from lightning.pytorch.plugins import AsyncCheckpointIO, TorchCheckpointIO
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from phasetune.lightning.adapters import StrategyAdapter

    system_tmp = tmp_path / "system-tmp"  # where Lightning's own save writes first
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    strategy = SingleDeviceStrategy("cpu")
    adapter = StrategyAdapter()
    adapter.route_file_saves(strategy)
    checkpoint_io = strategy.checkpoint_io
    checkpoint_io.save_checkpoint({"epoch": 3}, tmp_path / "new" / "epoch=3.ckpt")
    assert torch.load(tmp_path / "new" / "epoch=3.ckpt")["epoch"] == 3 and names(tmp_path / "new") == ["epoch=3.ckpt"]
    assert names(system_tmp) == []
    checkpoint_io.save_checkpoint({"epoch": 4}, "memory://phasetune-test/epoch=4.ckpt")  # Lightning's way
    assert fsspec.filesystem("memory").exists("/phasetune-test/epoch=4.ckpt")
    with pytest.raises(TypeError, match="storage_options"):
        checkpoint_io.save_checkpoint({}, tmp_path / "x.ckpt", storage_options={"a": 1})
    adapter.release()
    assert "save_checkpoint" not in vars(checkpoint_io)

    wrapped = SingleDeviceStrategy("cpu", checkpoint_io=AsyncCheckpointIO())
    StrategyAdapter().route_file_saves(wrapped)
    assert "save_checkpoint" in vars(wrapped.checkpoint_io.checkpoint_io)  # the one it saves through

    class Mine(TorchCheckpointIO):
        def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
            super().save_checkpoint(*args, **kwargs)

    own = SingleDeviceStrategy("cpu", checkpoint_io=Mine())
    StrategyAdapter().route_file_saves(own)
    assert "save_checkpoint" not in vars(own.checkpoint_io)


def test_an_export_replaces_its_files_and_subdirectories_one_rename_each_and_keeps_other_files(tmp_path):
    from phasetune.sharding.export import _move_into

    out, new = tmp_path / "export", tmp_path / ".partial-export"
    out.mkdir()
    (out / "README.md").write_text("the user's")
    (out / "model.safetensors").write_text("old")
    make(out / "tokenizer", "old", directory=True)
    new.mkdir()
    (new / "model.safetensors").write_text("new")
    make(new / "tokenizer", "new", directory=True)
    (tmp_path / "export" / ".trash-tokenizer-5").mkdir()  # left by an export killed while replacing it
    _move_into(new, out)
    assert names(out) == ["README.md", "model.safetensors", "tokenizer"] and not new.exists()
    assert (out / "model.safetensors").read_text() == "new" and content(out / "tokenizer") == {"meta.pt": "new",
                                                                                               "shard": "new"}
