"""What a Lightning checkpoint must hold for a fit to resume from it, checked before any state is loaded.

A checkpoint without FinetuningScheduler state (a plain run's, ``save_weights_only=True``) or with
finetuning-scheduler's state is refused in one line saying how to start from its weights; a checkpoint saved
in the middle of an epoch is noted, with a warning when its train DataLoader kept no position.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from phasetune.errors import ConfigurationError
from phasetune.lightning import _compat, fts_compat, messages


def check_resumable(checkpoint: Mapping[str, Any], state_key: str, path: Any) -> bool:
    """Refuse ``checkpoint`` (at ``path``) when the scheduler ``state_key`` cannot continue from it; return whether
    it was saved in the middle of a training epoch."""
    state = (checkpoint.get("callbacks") or {}).get(state_key)
    if state is None:
        # without it, the optimizer state of a plain run would be loaded into phase 0's groups and fail with an
        # opaque size mismatch
        raise checkpoint_without_state(path)
    fts_error = fts_compat.fts_checkpoint_error(state, path)  # written by finetuning-scheduler
    if fts_error is not None:
        raise fts_error
    position = _compat.mid_epoch_position(checkpoint)
    if position is None:
        return False
    batches, loader_saved = position
    if not loader_saved:
        messages.warn(
            f"{path} was saved in the middle of an epoch (after {batches} batches) and the train DataLoader saved no "
            "position: the rest of that epoch takes its batches from a new pass over the data, not the ones the "
            "interrupted run had left, so the resumed run is not exact. Use "
            "torchdata.stateful_dataloader.StatefulDataLoader (Lightning saves and restores its position) for an "
            "exact mid-epoch resume, or resume from an end-of-epoch checkpoint."
        )
    return True


def checkpoint_without_state(path: Any) -> ConfigurationError:
    """The error for resuming a fit from a checkpoint that holds no FinetuningScheduler state."""
    return ConfigurationError(
        f"cannot resume from {path}: it holds no FinetuningScheduler state (it was saved by a run without "
        "phasetune, or with save_weights_only=True). To start a scheduled fine-tune from its weights, load them "
        "into the model (YourModule.load_from_checkpoint(path), or load_state_dict of its 'state_dict') and call "
        "fit without ckpt_path."
    )
