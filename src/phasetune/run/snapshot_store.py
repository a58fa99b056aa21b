"""Restore-best: where the run's current snapshot lives, how checkpoints find it, and how a phase's best state is
taken and restored (:func:`take_snapshot`, :func:`restore_best`; torch only).

- ``snapshot_storage="memory"``: in CPU memory; a checkpoint holds it inline, except when each rank holds
  shards of its own (sharded strategies) and only rank 0's state is saved (Lightning): then each rank writes
  its snapshot to a file of its own, once per snapshot, and the checkpoint references the files (never
  gathered to rank 0).
- ``snapshot_storage="disk"``: written to a file per rank and phase when taken; checkpoints reference it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.optim import Optimizer

from phasetune.features import snapshots
from phasetune.run.host import RunEnv
from phasetune.run.records import PhaseRecord

if TYPE_CHECKING:
    from phasetune.run.phase_run import PhaseRun


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


def take_snapshot(
    run: PhaseRun, epoch: int, step: int | None, value: float, optimizer: Optimizer | None, schedulers: Sequence[Any]
) -> None:
    run.store.put(snapshots.take_snapshot(
        depth=run.depth,
        epoch=epoch,
        step=epoch if step is None else step,
        value=value,
        params=run.engine.trainable(),
        buffers=run.env.named_buffers(),
        optimizer=optimizer,
        schedulers=schedulers,
    ))


def restore_best(run: PhaseRun, rec: PhaseRecord, optimizer: Optimizer, schedulers: Sequence[Any]) -> str:
    """Restore the ending phase's best state if asked; return how the transition line describes it."""
    if not run.options.restore_best:
        return "kept the last state (restore_best=False)"
    snap = run.snapshot
    # a phase without a single check of the metric (a short step-capped phase) is not rolled back
    if (snap is None or snap.depth != run.depth or rec.best_value is None) and run._checks == 0:
        return (f"kept the last state (no validation ran in phase {run.depth} before it ended, so there was "
                "nothing to judge it by)")
    if snap is None or snap.depth != run.depth or rec.best_value is None:
        run.env.warn(
            f"restore_best: no best state was recorded in phase {run.depth} (is {run.monitor or 'the metric'!r} "
            "reported after validation, and does the phase last until one?); continuing from the current state"
        )
        return "kept the last state (no best state was recorded)"
    problems = snapshots.restore_snapshot(
        snap,
        params=run.engine.trainable(),
        buffers=run.env.named_buffers(),
        optimizer=optimizer,
        schedulers=schedulers,
        copy_into=run.env.copy_into,
        keep_lr_schedule=True,
    )
    if problems:
        run.env.warn(
            f"restore_best in phase {run.depth} could not restore the best state of epoch {snap.epoch} exactly: "
            + "; ".join(problems) + ". The phase continues from a partly restored state; check that the model, "
            "optimizer and lr schedulers were not replaced or regrouped during the phase."
        )
        return f"restoring the best state failed ({len(problems)} problem(s), see the warning)"
    rec.restored_best = True
    where = f"{run.monitor or 'metric'}={snap.value:.4g} at epoch {snap.epoch}"
    if snap.epoch < rec.start_epoch:  # the phase's baseline: it never beat the run's best
        return f"phase {run.depth} did not beat the best {where}: rolled back to the state it started from"
    return f"restored the best state ({where})"
