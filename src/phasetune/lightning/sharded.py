"""What the sharded-strategy adapters (FSDP1 and FSDP2) share.

- The schedule is resolved at ``on_fit_start``: wrapping or sharding replaces every parameter after setup.
- Restore-best snapshots hold each rank's own shards. A checkpoint's callback state is written by rank 0,
  so the snapshots of all ranks are gathered to rank 0 when the state is saved, and each rank takes its own
  part back on resume.
- Both strategies load optimizer state in ``load_checkpoint``, before Lightning restores callbacks; the
  adapters read the callback's saved state from the checkpoint first (:func:`read_callback_state`) to
  rebuild the saved phase.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from phasetune import _dist
from phasetune.lightning._compat import checkpoint_metadata_file
from phasetune.lightning.adapters import StrategyAdapter

if TYPE_CHECKING:
    import lightning.pytorch as pl


class ShardedStrategyAdapter(StrategyAdapter):
    """Base of the FSDP1 and FSDP2 adapters: deferred schedule resolution, resuming before the strategy
    loads optimizer state, and per-rank snapshot state."""

    _fts: Any = None  # the FinetuningScheduler, set by the subclass's check()

    def defer_init(self, pl_module: pl.LightningModule) -> bool:
        return True  # wrapping/sharding replaces every parameter after setup

    def route_checkpoint_loads(self, strategy: Any) -> None:
        """Make ``strategy.load_checkpoint`` call :meth:`before_checkpoint_load` first.

        Bound from the class so repeated fits do not stack; parameters :meth:`before_checkpoint_load`
        returns are thawed again once the strategy's load is done.
        """
        class_load = functools.partial(type(strategy).load_checkpoint, strategy)

        def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
            restore = self.before_checkpoint_load(checkpoint_path)
            try:
                return class_load(checkpoint_path, *args, **kwargs)
            finally:
                for p in restore:
                    p.requires_grad_(True)

        strategy.load_checkpoint = load_checkpoint

    def before_checkpoint_load(self, checkpoint_path: Any) -> list[torch.Tensor]:
        """Rebuild the checkpoint's phase (thawed set, groups) before the strategy loads optimizer state.

        Returns parameters frozen for the duration of the load (none here; see the FSDP2 adapter).
        """
        self.resume_from(checkpoint_path)
        return []

    def resume_from(self, checkpoint_path: Any) -> bool:
        """Apply the FinetuningScheduler state saved in ``checkpoint_path`` now (False outside a fit).

        A checkpoint without that state is refused here, before the strategy loads optimizer state that
        does not fit phase 0's groups.
        """
        trainer, fts = self.trainer, self._fts
        if trainer is None or fts is None or fts.engine is None or trainer.state.fn != TrainerFn.FITTING:
            return False
        path = Path(checkpoint_path)
        if not path.exists():
            return False  # the strategy reports a missing checkpoint itself
        state = read_callback_state(path, fts.state_key)
        if not state:
            from phasetune.lightning.callback import checkpoint_without_state

            raise checkpoint_without_state(path)
        fts.resume_early(state)
        return True

    def rank_local_state(self, value: Any) -> Any:
        """Every rank's ``value`` (its shards) gathered on rank 0, which writes the checkpoint.

        All ranks call this together (Lightning builds the checkpoint dict on every rank); ranks other
        than 0 return None, which nobody writes.
        """
        rank, world = _dist.rank(), _dist.world_size()
        if value is None or world == 1:
            return value
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(value, gathered, dst=0)
        return {"per_rank": gathered} if rank == 0 else None

    def own_rank_state(self, stored: Any) -> Any:
        """This rank's part of what :meth:`rank_local_state` stored (None when the world size changed)."""
        if not (isinstance(stored, Mapping) and "per_rank" in stored):
            return stored
        per_rank = stored["per_rank"]
        world = _dist.world_size()
        if len(per_rank) != world:
            rank_zero_warn(
                f"the checkpoint's restore-best snapshot was taken on {len(per_rank)} ranks, this run has {world}; "
                "the phase restores the best state seen after resuming"
            )
            return None
        return per_rank[_dist.rank()]


def read_callback_state(checkpoint_path: Path, state_key: str) -> dict[str, Any] | None:
    """The callback state ``state_key`` saved in a checkpoint: a sharded directory or a single file."""
    if checkpoint_path.is_dir():
        meta = checkpoint_metadata_file(checkpoint_path)
        if not meta.is_file():
            return None
        ckpt = torch.load(meta, map_location="cpu", weights_only=True)
    elif checkpoint_path.is_file():
        ckpt = torch.load(checkpoint_path, map_location="cpu", mmap=True, weights_only=True)
    else:
        return None
    return (ckpt.get("callbacks") or {}).get(state_key)
