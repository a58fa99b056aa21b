"""FTSCheckpoint: a ModelCheckpoint that records the phase each kept checkpoint was saved in."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import ModelCheckpoint

from phasetune.lightning import _compat

if TYPE_CHECKING:
    import lightning.pytorch as pl


class FTSCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that knows the phase (depth) of its checkpoints.

    ``depth_of`` maps each kept top-k path to the phase it was saved in, ``best_ckpt_depth`` is the
    phase of ``best_model_path`` and ``current_ckpt_depth`` (as in finetuning-scheduler) the phase of the
    most recently written checkpoint. Depths are keyed by path and recorded when the file is written, so equal
    monitored values in different phases, or a file name reused by a later save, cannot mix them up.
    (Any checkpoint also records its own phase in the FinetuningScheduler state it holds.)
    Takes every argument of ``ModelCheckpoint``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_depth_state()

    def _init_depth_state(self) -> None:
        self.depth_of: dict[str, int] = {}
        self.best_ckpt_depth: int | None = None
        self.current_ckpt_depth = 0
        self.scheduler_callback: Any = None  # the FinetuningScheduler, linked at setup
        self._seen_score: Any = None

    @classmethod
    def upgrade(cls, plain: ModelCheckpoint, **overrides: Any) -> FTSCheckpoint:
        """A depth-aware copy of a plain ``ModelCheckpoint`` with the same settings and state."""
        new = _compat.copy_callback(plain, cls)
        for name, value in overrides.items():
            setattr(new, name, value)
        new._init_depth_state()
        return new

    @property
    def _depth(self) -> int:
        fts = self.scheduler_callback
        return fts.curr_depth if fts is not None and fts.curr_depth is not None else 0

    def _sync_depths(self) -> None:
        # Runs while a checkpoint is written (state_dict) and after every hook that can save. Transitions
        # happen at epoch start, so any file saved since the previous sync was saved at the current depth.
        depth = self._depth
        score = self.current_score
        if score is not None and score is not self._seen_score:
            self._seen_score = score
            for path, value in self.best_k_models.items():
                if value is score:  # this save, even when it reused an older file name
                    self.depth_of[path] = depth
        self.depth_of = {p: self.depth_of.get(p, depth) for p in self.best_k_models}
        if self.best_model_path in self.depth_of:
            self.best_ckpt_depth = self.depth_of[self.best_model_path]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._sync_depths()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._sync_depths()

    def state_dict(self) -> dict[str, Any]:
        # Called while a checkpoint is being written: the path being saved is already in best_k_models.
        self._sync_depths()
        self.current_ckpt_depth = self._depth
        state = super().state_dict()
        state.update(depth_of=dict(self.depth_of), best_ckpt_depth=self.best_ckpt_depth,
                     current_ckpt_depth=self.current_ckpt_depth)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        depth_of = state.pop("depth_of", {})
        best_depth = state.pop("best_ckpt_depth", None)
        self.current_ckpt_depth = state.pop("current_ckpt_depth", 0)
        same_dir = state.get("dirpath", self.dirpath) == self.dirpath
        super().load_state_dict(state)
        self.best_ckpt_depth = best_depth
        if same_dir:
            self.depth_of = dict(depth_of)
        else:
            # Lightning keeps only best_model_path when the directory changed; keep its depth alone.
            self.depth_of = {self.best_model_path: best_depth} if best_depth is not None else {}
        self._seen_score = self.current_score
