"""What the sharded-strategy adapters (FSDP1 and FSDP2) share.

- The schedule is resolved at ``on_fit_start``: wrapping or sharding replaces every parameter after setup.
- Restore-best snapshots hold each rank's own shards. A checkpoint's callback state is written by rank 0,
  so each rank keeps its snapshot in a file of its own that the state references (never gathered).
- Both strategies load optimizer state in ``load_checkpoint``, before Lightning restores callbacks; the
  adapters read the callback's saved state from the checkpoint first (:func:`read_callback_state`) to
  rebuild the saved phase.
- Both write sharded checkpoints (directories) in place: a process killed while saving would leave a
  partial directory under the checkpoint's name, or damage the previous one of the same name (``last.ckpt``).
  During a fit the adapters make every checkpoint save atomic (:meth:`ShardedStrategyAdapter.route_checkpoint_saves`).
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.trainer.states import TrainerFn

from phasetune.errors import ConfigurationError
from phasetune.lightning import _compat
from phasetune.lightning.adapters import StrategyAdapter
from phasetune.sharding import optim_state
from phasetune.util.files import partial_path, remove_leftovers, replace_path

if TYPE_CHECKING:
    import lightning.pytorch as pl


class ShardedStrategyAdapter(StrategyAdapter):
    """Base of the FSDP1 and FSDP2 adapters: deferred schedule resolution, resuming before the strategy
    loads optimizer state, and per-rank snapshot state."""

    _fts: Any = None  # the FinetuningScheduler, set by the subclass's check()
    rank_local_snapshots = True

    def defer_init(self, pl_module: pl.LightningModule) -> bool:
        return True  # wrapping/sharding replaces every parameter after setup

    def route_file_saves(self, strategy: Any) -> None:
        """Nothing: :meth:`route_checkpoint_saves` puts every checkpoint, file or directory, in place itself (an FSDP1
        full file reaches its hidden name through Lightning's temporary file; a partial one there is never loaded)."""

    def route_checkpoint_loads(self, strategy: Any) -> None:
        """Make ``strategy.load_checkpoint`` run inside :meth:`checkpoint_load` (until :meth:`release`)."""

        def load_checkpoint(original: Any, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
            weights_only = kwargs.get("weights_only", args[0] if args else None)
            with self.checkpoint_load(checkpoint_path, weights_only), optim_state.placeholder_steps():
                return original(checkpoint_path, *args, **kwargs)

        self.keep_undo(_compat.route_load_checkpoint(strategy, load_checkpoint))

    def route_checkpoint_saves(self, strategy: Any) -> None:
        """Make ``strategy.save_checkpoint`` write under a hidden name and rename into place (until :meth:`release`).

        The strategy writes a sharded checkpoint's shards and then its metadata file straight into the final
        directory; saved under ``.partial-<name>-<time>`` and renamed by rank 0 once every rank is done, a
        checkpoint is complete whenever its name is visible. Remote (fsspec URL) paths are saved as they are.
        """

        def save_checkpoint(original: Any, checkpoint: Any, filepath: Any, *args: Any, **kwargs: Any) -> Any:
            final = Path(filepath) if "://" not in str(filepath) else None
            if final is None:
                return original(checkpoint, filepath, *args, **kwargs)
            tmp = Path(strategy.broadcast(str(partial_path(final))))
            with optim_state.placeholder_steps():
                result = original(checkpoint, tmp, *args, **kwargs)
            strategy.barrier("phasetune_checkpoint_written")
            if strategy.is_global_zero:
                _put_in_place(tmp, final)
            strategy.barrier("phasetune_checkpoint_renamed")
            return result

        # why a patch: Lightning has no option to save checkpoints atomically under these strategies
        self.keep_undo(_compat.patch_method(strategy, "save_checkpoint", save_checkpoint))

    def checkpoint_load(self, checkpoint_path: Any, weights_only: bool | None) -> AbstractContextManager[Any]:
        """Rebuild the checkpoint's phase (thawed set, groups) before the strategy loads optimizer state; the
        returned context is entered around the strategy's load (nothing here; the FSDP2 adapter shapes the
        optimizer's state like the checkpoint's)."""
        self.resume_from(checkpoint_path, weights_only)
        return nullcontext()

    def file_weights_only(self, weights_only: bool | None) -> bool | None:
        """The ``weights_only`` the strategy's own load of a single-file checkpoint uses, given ``weights_only``:
        the state is read as strictly as the strategy will read the file, no more, no less."""
        return weights_only

    def resume_from(self, checkpoint_path: Any, weights_only: bool | None = None) -> bool:
        """Apply the FinetuningScheduler state saved in ``checkpoint_path`` now (False outside a fit).

        ``weights_only`` is what Lightning passed the strategy's ``load_checkpoint``. A checkpoint without that
        state is refused here, before the strategy loads optimizer state that does not fit phase 0's groups.
        """
        trainer, fts = self.trainer, self._fts
        if trainer is None or fts is None or fts.run is None or trainer.state.fn != TrainerFn.FITTING:
            return False
        fs, path = url_to_fs(str(checkpoint_path))
        if not fs.exists(path):
            return False  # the strategy reports a missing checkpoint itself
        if fs.isfile(path):
            weights_only = self.file_weights_only(weights_only)
        state, mid_epoch = read_callback_state(checkpoint_path, fts.state_key, weights_only, with_position=True)
        meta = f"{path.rstrip('/')}/{_compat.sharded_checkpoint_metadata_name()}"
        if state is None and fs.isdir(path) and not fs.isfile(meta):
            raise ConfigurationError(
                f"cannot resume from {checkpoint_path}: it is a directory without {meta.rsplit('/', 1)[-1]}, not a "
                "complete sharded checkpoint (a save that did not finish, e.g. a process killed while writing it); "
                "resume from an earlier checkpoint"
            )
        if not state:
            from phasetune.lightning.resume_checks import checkpoint_without_state

            raise checkpoint_without_state(checkpoint_path)
        fts.resume_early(state, mid_epoch=mid_epoch)
        return True


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename the complete checkpoint ``tmp`` (a file or a directory) to ``final``, replacing what is there, so that
    ``final`` names a complete checkpoint at every moment (:func:`phasetune.util.files.replace_path`, which says where it
    cannot); remove what killed saves left behind."""
    replace_path(tmp, final)
    remove_leftovers(final.parent)


def read_callback_state(
    checkpoint_path: Any, state_key: str, weights_only: bool | None = None, *, with_position: bool = False
) -> Any:
    """The callback state ``state_key`` saved in a checkpoint (a sharded directory or a single file; a local
    path or an fsspec URL, read as Lightning reads them); None when there is none. ``with_position``: a pair
    (that state, whether the checkpoint was saved in the middle of a training epoch).

    A checkpoint that cannot be read raises a :class:`~phasetune.errors.ConfigurationError` naming it and
    what to do.
    """
    fs, path = url_to_fs(str(checkpoint_path))
    try:
        if fs.isdir(path):
            meta = f"{path.rstrip('/')}/{_compat.sharded_checkpoint_metadata_name()}"
            ckpt = _torch_load(fs, meta, weights_only) if fs.isfile(meta) else None
        else:
            ckpt = _torch_load(fs, path, weights_only, mmap=True) if fs.isfile(path) else None
    except Exception as error:
        raise unreadable_checkpoint(checkpoint_path, weights_only, error) from error
    callbacks = ckpt.get("callbacks") if isinstance(ckpt, dict) else None
    state = (callbacks or {}).get(state_key)
    if not with_position:
        return state
    return state, isinstance(ckpt, dict) and _compat.mid_epoch_position(ckpt) is not None


def _torch_load(fs: Any, path: str, weights_only: bool | None, mmap: bool = False) -> Any:
    if isinstance(fs, LocalFileSystem):  # mmap: a full checkpoint's tensors are not read into memory
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=weights_only)
    with fs.open(path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=weights_only)


def unreadable_checkpoint(checkpoint_path: Any, weights_only: bool | None, error: BaseException) -> ConfigurationError:
    """One line saying why the FinetuningScheduler state of ``checkpoint_path`` could not be read, and what to do."""
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if refused:
        return ConfigurationError(
            f"cannot resume from {checkpoint_path}: it holds {refused[1]}, which torch.load refuses with "
            f"weights_only={weights_only}{' (the default: True)' if weights_only is None else ''}. If you trust "
            f"this checkpoint, call torch.serialization.add_safe_globals([{refused[1]}]) before fit (Lightning "
            "2.6 does not pass trainer.fit(..., weights_only=False) on to FSDP and ModelParallel strategies)"
        )
    detail = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return ConfigurationError(
        f"cannot resume from {checkpoint_path}: reading its FinetuningScheduler state failed with "
        f"{type(error).__name__}: {detail}. Check that it is a complete checkpoint written by Lightning and "
        "readable from every process"
    )
