"""A run's checkpoint state: what :meth:`~phasetune.run.PhaseRun.state_dict` saves and how
:meth:`~phasetune.run.PhaseRun.resume` continues from it (a mixin of :class:`~phasetune.run.PhaseRun`; torch only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer

from phasetune.core.schedule import diff_fingerprints
from phasetune.errors import ConfigurationError
from phasetune.run.patience import Patience
from phasetune.run.records import PhaseRecord, phase_of
from phasetune.run.state_checks import implicit_resume_hint, state_problem

if TYPE_CHECKING:
    from phasetune.run.phase_run import PhaseRun

#: format of :meth:`PhaseRun.state_dict`; format 1 (phasetune 0.1 callback and loop) is still read
STATE_FORMAT = 2


class RunCheckpoint:
    """Saving and continuing a run; ``self`` is a :class:`PhaseRun`."""

    def state_dict(self: PhaseRun, *, random_state: bool = False, generators: Sequence[torch.Generator] = ()) -> dict[str, Any]:
        """Everything needed to continue the run exactly (with this rank's snapshot or a reference to it).

        ``random_state``: include the random state of this rank (``env.state_saved_per_rank``) or of every
        rank (gathered: a collective every rank calls), restored by :meth:`resume`; front ends whose
        trainer saves it itself (Hugging Face) leave it out. ``generators``: the training loader's own
        (:func:`phasetune.features.random_state.loader_generators`), saved with it.
        """
        self._close_clock()
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "depth": self.depth,
            "fingerprint": self.engine.schedule.fingerprint(),
            "history": [asdict(r) for r in self.history],
            "monitor": self.monitor,
            "mode": self.mode,
            "best": None if self.best is None else list(self.best),
        }
        if self.lora is not None:
            state["lora"] = self.lora.state()  # the merges so far: a resume replays them without touching a weight
        state.update(self.store.state())
        if isinstance(self.patience, Patience):
            state.update(self.patience.state_dict())
        if random_state:
            state["rng"] = self.random.checkpoint_state(gather=not self.env.state_saved_per_rank, generators=generators)
        return state

    def check_state(self: PhaseRun, state: Mapping[str, Any], where: Any = None) -> None:
        """Refuse checkpoint state this run cannot continue, naming what differs and what to do."""
        refused = state_problem(state, where, monitor=self.monitor, mode=self.mode, env=self.env,
                                resume_rng=self.options.resume_rng, state_format=STATE_FORMAT)
        if refused:
            raise ConfigurationError(refused)

    def resume(
        self: PhaseRun, state: Mapping[str, Any], optimizer: Optimizer, schedulers: Sequence[Any], where: Any = None,
        *, defer_random_state: bool = False, mid_epoch: bool = False, generators: Sequence[torch.Generator] = (),
    ) -> tuple[Optimizer, list[Any], dict[str, Any] | None]:
        """Continue a saved run: rebuild the saved phase (thawed set, groups, optimizer, scheduler) before
        the optimizer state is loaded, and restore the history, snapshot and random state.

        ``defer_random_state``: the front end restores the random state around the creation of its first data
        iterator (``self.random.before_data_iterator`` / ``after_data_iterator``): the loader may draw from the
        generators as it is built, and a ``mid_epoch`` checkpoint's run had created its iterator before saving.
        ``generators``: the training loader's own, restored now with the rest (not deferred).

        Returns the optimizer, the lr schedulers and, when a phase replaced the scheduler, its config fields.
        """
        self.check_state(state, where)
        src = f" from {where}" if where is not None else ""
        if self.depth != 0:
            raise ConfigurationError("resume needs a run that has not transitioned yet; build a new one to resume")
        blocking, benign = diff_fingerprints(state["fingerprint"], self.engine.schedule.fingerprint())
        if blocking:
            details = "".join(f"\n  - {b}" for b in blocking)
            raise ConfigurationError(
                f"cannot resume{src}: the checkpoint was trained with a different schedule or model:{details}\n"
                "resume with the schedule and model the checkpoint was saved with, or start a new fit without it"
                + (implicit_resume_hint(state["fingerprint"]) if self.implicit is not None else "")
            )
        for b in benign:
            self.env.warn(f"resuming with a changed schedule value: {b}; later phases use the current value")
        depth = int(state["depth"])
        if depth > self.final_depth:
            raise ConfigurationError(
                f"the checkpoint was saved in phase {depth}, beyond max_depth={self.options.max_depth} (last phase "
                f"{self.final_depth}); raise max_depth to at least {depth} to resume it"
            )
        scheds: list[Any] = list(schedulers)
        cfg = None
        if self.lora is not None:
            self.lora.resume(self, state.get("lora"), depth, src)
        if depth > 0:
            replay = self.engine.replay if self.lora is None else lambda *a: self.lora.replay(self, *a)  # type: ignore[union-attr]
            optimizer, scheds, cfg = replay(depth, optimizer, schedulers)
            self._apply_bn_mode()
        self.history = [PhaseRecord.from_state(r) for r in state.get("history", [])]
        best = state.get("best")
        if best is None:  # format 1 kept per-phase bests only: the run's best is the best of them
            seen = [(r.best_value, r.best_epoch, r.depth) for r in self.history if r.best_value is not None]
            best = min(seen) if self.mode == "min" and seen else max(seen) if seen else None
        self.best = None if best is None else (float(best[0]), int(best[1]), int(best[2]))
        self.store.load(state, depth)
        if state.get("rng") is not None:  # last: nothing after it in a resume may draw from the generators
            self.random.resume(state["rng"], src, defer=defer_random_state, mid_epoch=mid_epoch, generators=generators)
        self.env.info(f"resumed in {phase_of(depth, self.final_depth)} ({len(self.thawed_params)} trainable tensors)")
        return optimizer, scheds, cfg

    def restore_random_state(self: PhaseRun) -> None:
        """Restore the random state :meth:`resume` read (once; a no-op when there is none left)."""
        self.random.restore()


__all__ = ["STATE_FORMAT", "RunCheckpoint"]
