"""Read-only views of a front end's :class:`~phasetune.run.PhaseRun`, with one name and meaning in every front end."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from phasetune.core.schedule import Schedule
    from phasetune.features.prefix_cache.phases import PrefixCachePhases
    from phasetune.features.snapshots import Snapshot
    from phasetune.run import PhaseRecord, PhaseRun


class RunView:
    """Properties over ``self.run`` (None before a fit starts: then None, or empty lists)."""

    run: PhaseRun | None

    @property
    def engine(self) -> Any:
        """The phase engine (thaws, groups, optimizer and scheduler changes of each transition)."""
        return self.run.engine if self.run else None

    @property
    def schedule(self) -> Schedule | None:
        """The resolved schedule (exact parameter names per phase)."""
        return self.run.schedule if self.run else None

    @property
    def depth(self) -> int | None:
        """Index of the phase being trained."""
        return self.run.depth if self.run else None

    @property
    def final_depth(self) -> int | None:
        """Index of the last phase that will run (within ``max_depth``)."""
        return self.run.final_depth if self.run else None

    @property
    def history(self) -> list[PhaseRecord]:
        """One record per phase started in the current (or last) fit."""
        return self.run.history if self.run else []

    @property
    def thawed_params(self) -> list[str]:
        """Names of the parameters trained in the current phase (phases 0..depth)."""
        return self.run.thawed_params if self.run else []

    @property
    def caches(self) -> PrefixCachePhases | None:
        """The frozen-prefix cache of the phases that ask for one (None: no phase caches, or no run)."""
        return self.run.caches if self.run else None

    @property
    def snapshot(self) -> Snapshot | None:
        """The best-state snapshot of the current phase (restore-best), if any."""
        return self.run.snapshot if self.run else None


__all__ = ["RunView"]
