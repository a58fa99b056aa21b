"""Sharded checkpoints on disk: atomic directories, finding the latest complete one, rotation.

A checkpoint is a directory ``<save_dir>/<tag>`` holding the DCP shards of the model and optimizer, one
``rank<N>.pt`` per rank (RNG state, the fine-tuning loop's state), ``shared.pt`` (lr scheduler and client
state) and ``phasetune.json`` (written last). Everything is written under a hidden ``.partial-*`` name and
renamed into place only when every rank has finished, so a directory with a visible name is always complete;
a save that dies halfway leaves a hidden directory that loading ignores and the next save removes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from phasetune.util import dist as _dist
from phasetune.util.dist import barrier, broadcast_object
from phasetune.util.files import (
    TRASH_PREFIX,
    atomic_torch_save,
    atomic_write_text,
    partial_path,
    remove_leftovers,
    remove_path,
    replace_path,
)

log = logging.getLogger("phasetune")

META_FILE = "phasetune.json"
SHARED_FILE = "shared.pt"
FORMAT = 1
GIB = 1024**3


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint directory and what its ``phasetune.json`` says."""

    path: Path
    seq: int
    meta: dict[str, Any]

    @property
    def tag(self) -> str:
        return self.path.name


def rank_file(path: Path, rank: int) -> Path:
    return path / f"rank{rank}.pt"


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads((Path(path) / META_FILE).read_text(encoding="utf-8"))


def list_checkpoints(save_dir: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Complete checkpoints under ``save_dir``, oldest first (by save order, not by name or mtime)."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.name.startswith(".") or not child.is_dir() or not is_checkpoint(child):
            continue
        try:
            meta = read_meta(child)
        except (OSError, ValueError):
            continue
        found.append(CheckpointInfo(child, int(meta.get("seq", -1)), meta))
    return sorted(found, key=lambda c: (c.seq, c.path.name))


def dir_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of all files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def rotate(save_dir: str | os.PathLike[str], max_num: int, max_mem_gib: float) -> list[Path]:
    """Delete the oldest checkpoints until at most ``max_num`` remain and they use at most ``max_mem_gib``.

    The newest checkpoint is always kept (a warning says so when it alone is over ``max_mem_gib``).
    Returns the deleted directories.
    """
    ckpts = list_checkpoints(save_dir)
    sizes = {c.path: dir_bytes(c.path) for c in ckpts}
    limit = max_mem_gib * GIB
    removed = []
    while len(ckpts) > 1 and (len(ckpts) > max_num or sum(sizes[c.path] for c in ckpts) > limit):
        oldest = ckpts.pop(0)
        _remove_dir(oldest.path)
        removed.append(oldest.path)
    if ckpts and sizes[ckpts[-1].path] > limit:
        log.warning("phasetune: checkpoint %s alone uses %.3g GiB, more than max_mem=%.3g GiB; kept it anyway",
                    ckpts[-1].path, sizes[ckpts[-1].path] / GIB, max_mem_gib)
    return removed


def _remove_dir(path: Path) -> None:
    """Hide a directory by renaming it (atomic), then delete it."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{time.time_ns()}")
    os.replace(path, trash)
    remove_path(trash)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(
    save_dir: str | os.PathLike[str],
    tag: str,
    app_state: dict[str, Any],
    rank_state: dict[str, Any],
    shared_state: dict[str, Any],
    meta: dict[str, Any],
    max_num: int,
    max_mem_gib: float,
) -> Path:
    """Write one checkpoint atomically (collective: every rank calls it) and rotate old ones.

    ``app_state`` goes through DCP (sharded tensors), ``rank_state`` to this rank's file, ``shared_state``
    (rank 0's) to ``shared.pt`` and ``meta`` to ``phasetune.json``. Returns the checkpoint directory.
    """
    if "/" in tag or tag.startswith(".") or not tag:
        raise ValueError(f"checkpoint tag {tag!r} must be a plain directory name (no '/', not starting with '.')")
    root = Path(save_dir)
    rank = _dist.rank()
    plan = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(root)  # what saves and removals that died left; never visible to loading
        seq = max((c.seq for c in list_checkpoints(root)), default=-1) + 1
        tmp = partial_path(root / tag)
        tmp.mkdir()
        plan = (str(tmp), seq)
    tmp_name, seq = broadcast_object(plan)  # type: ignore[misc]
    tmp = Path(tmp_name)
    dcp.save(app_state, checkpoint_id=str(tmp))
    atomic_torch_save(rank_state, rank_file(tmp, rank))
    barrier()
    final = root / tag
    if rank == 0:
        atomic_torch_save(shared_state, tmp / SHARED_FILE)
        atomic_write_text(tmp / META_FILE, json.dumps({**meta, "format": FORMAT, "seq": seq, "tag": tag,
                                                       "saved_at": time.time()}, indent=1))
        replace_path(tmp, final)  # the same tag saved again: the new one replaces it, in one step where it can
        _fsync_dir(root)
        rotate(root, max_num, max_mem_gib)
    barrier()
    return final


def resolve(load_dir: str | os.PathLike[str], tag: str | None = None) -> Path | None:
    """The checkpoint to load: ``load_dir`` itself if it is one, ``load_dir/tag``, or the latest complete one.

    Rank 0 decides and every rank gets its answer (ranks never load different checkpoints).
    """
    found: str | None = None
    problem: str | None = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        root = Path(load_dir)
        if tag is not None:
            if is_checkpoint(root / tag):
                found = str(root / tag)
            else:
                have = [c.tag for c in list_checkpoints(root)]
                problem = (f"no complete checkpoint {tag!r} under {root}; complete ones there: "
                           f"{', '.join(have) if have else 'none'}")
        elif is_checkpoint(root):
            found = str(root)
        else:
            ckpts = list_checkpoints(root)
            found = str(ckpts[-1].path) if ckpts else None
    found, problem = broadcast_object((found, problem))  # type: ignore[misc]
    if problem is not None:
        raise FileNotFoundError(problem)
    return Path(found) if found is not None else None


def load_app_state(path: Path, app_state: dict[str, Any]) -> None:
    """Fill ``app_state`` (DCP state dicts) in place from the checkpoint at ``path``."""
    dcp.load(app_state, checkpoint_id=str(path))
