"""Where the run's current restore-best snapshot lives, and how checkpoints find it (torch only).

- ``snapshot_storage="memory"``: in CPU memory; a checkpoint holds it inline, except when each rank holds
  shards of its own (sharded strategies) and only rank 0's state is saved (Lightning): then each rank writes
  its snapshot to a file of its own, once per snapshot, and the checkpoint references the files (never
  gathered to rank 0).
- ``snapshot_storage="disk"``: written to a file per rank and phase when taken; checkpoints reference it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from phasetune import snapshots
from phasetune.run_types import RunEnv


class SnapshotStore:
    """The current snapshot of a run (``snapshot``) and its storage."""

    def __init__(self, env: RunEnv, storage: str) -> None:
        self.env = env
        self.storage = storage
        self.snapshot: snapshots.Snapshot | None = None
        self._file: dict[str, Any] | None = None  # the reference of the file holding ``snapshot``, if written

    def put(self, snap: snapshots.Snapshot) -> None:
        """Make ``snap`` the current snapshot (written to its file now with disk storage)."""
        self.snapshot, self._file = snap, None
        if self.storage == "disk":
            self._file = self._write(snap, f"phase{snap.depth}")

    def clear(self) -> None:
        self.snapshot, self._file = None, None

    def _write(self, snap: snapshots.Snapshot, tag: str) -> dict[str, Any]:
        root = Path(self.env.snapshot_dir or ".") / "phasetune_snapshots"
        return snapshots.save_snapshot_file(snap, root, tag, self.env.rank, self.env.world_size)

    def state(self) -> dict[str, Any]:
        """What checkpoint state holds of the current snapshot: it inline, or a per-rank file reference."""
        snap = self.snapshot
        if snap is None:
            return {}
        if self._file is None and self.env.rank_local_snapshots and not self.env.state_saved_per_rank:
            self._file = self._write(snap, f"phase{snap.depth}_step{snap.step}")
        if self._file is not None:
            return {"snapshot_ref": dict(self._file)}
        return {"snapshot": snap.to_state(), "snapshot_world": [self.env.rank, self.env.world_size]}

    def load(self, state: Mapping[str, Any], depth: int) -> None:
        """Take the snapshot of checkpoint ``state`` back (none when it is unusable, with a warning)."""
        self.clear()
        snap = None
        if state.get("snapshot") is not None:
            saved_rank, saved_world = state.get("snapshot_world") or [0, 1]
            if self.env.rank_local_snapshots and (saved_world, saved_rank) != (self.env.world_size, self.env.rank):
                self.env.warn(f"the restore-best snapshot was saved by rank {saved_rank} of {saved_world} processes and "
                              f"cannot be used with {self.env.world_size}; the phase restores the best state seen "
                              "after resuming")
                return
            snap = snapshots.Snapshot.from_state(state["snapshot"])
        elif state.get("snapshot_ref"):
            ref = state["snapshot_ref"]
            snap, problem = snapshots.load_snapshot_file(ref, self.env.rank, self.env.world_size,
                                                         same_world_needed=self.env.rank_local_snapshots)
            if problem:
                self.env.warn(f"{problem}; the phase restores the best state seen after resuming")
            self._file = dict(ref) if snap is not None else None
        if snap is not None and snap.depth == depth:
            self.snapshot = snap
        else:
            self._file = None
