"""The Lightning callback's checkpoint state and resume (a mixin of
:class:`~phasetune.lightning.FinetuningScheduler`): Lightning's hook order around a checkpoint, the strategies that
restore callbacks late, and the random state a resumed fit's data iterator draws from."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.trainer.states import TrainerFn

from phasetune.features import random_state as rng
from phasetune.lightning import _compat, resume_checks

if TYPE_CHECKING:
    import lightning.pytorch as pl


class LightningResume:
    """``state_dict`` / ``load_state_dict`` and the resume hooks; ``self`` is a ``FinetuningScheduler``."""

    run: Any
    adapter: Any

    def state_dict(self) -> dict[str, Any]:
        # every rank's random state is gathered here (Lightning calls this on every rank, writes rank 0's)
        if self.run is None:
            return {}
        assert self.adapter is not None and self.adapter.trainer is not None  # set in setup, before the run
        return self.run.state_dict(random_state=True, generators=self._data_generators(self.adapter.trainer))

    @staticmethod
    def _data_generators(trainer: pl.Trainer) -> list[torch.Generator]:
        """The generators the training loader's samplers keep of their own (none before the loader exists)."""
        return rng.loader_generators(trainer.train_dataloader)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # refuse what cannot resume before any state is loaded
            self._resumed_mid_epoch = resume_checks.check_resumable(checkpoint, self.state_key, trainer.ckpt_path)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._resumed_early:  # resume_early already applied this checkpoint's state
            self._resumed_early = False
            return
        trainer = self.adapter.trainer if self.adapter is not None else None
        if trainer is not None and trainer.state.fn != TrainerFn.FITTING:
            return  # validate/test with ckpt_path after a fit: they load weights; the phase state is fit's alone
        if self.run is not None:
            self.run.check_state(state_dict, trainer.ckpt_path if trainer is not None else None)
        self._restored_state = dict(state_dict)
        if self._fit_started and trainer is not None:
            # Strategies with restore_checkpoint_after_setup (FSDP, ModelParallel) restore callbacks after
            # on_fit_start. Rebuild the saved phase's thawed set and groups now, before Lightning loads the
            # optimizer state; plain Lightning would silently drop them.
            self._resume(trainer)

    def resume_early(self, state_dict: dict[str, Any], mid_epoch: bool = False) -> None:
        """Apply a checkpoint's state now, after ``on_fit_start``: strategy adapters call this when the strategy
        loads optimizer state before restoring callbacks (ModelParallel). Lightning's later
        ``load_state_dict`` with the same state is then skipped. ``mid_epoch``: the checkpoint was saved inside
        a training epoch (its random state then comes back after Lightning re-creates the data iterator)."""
        self._resumed_mid_epoch = mid_epoch
        self.load_state_dict(state_dict)
        self._resumed_early = True

    def _resume(self, trainer: pl.Trainer) -> None:
        assert self.run is not None and self._restored_state is not None
        state, self._restored_state = self._restored_state, None
        # mid-epoch, Lightning creates the data iterator (drawing from the generators) after this, the interrupted
        # run before its save: the random state then comes back in on_train_start, after it. Restored after
        # on_fit_start (FSDP, ModelParallel): the rebuilt phase is audited now.
        self.run.restore(self, state, where=trainer.ckpt_path, audit=self._fit_started, defer_random_state=True,
                         mid_epoch=self._resumed_mid_epoch)

    def _before_data_iterator(self, dataloader: Any) -> None:
        if self.run is None or not self.run.random.awaiting_data_iterator:  # not a resume, or done with it
            return
        self._train_loaders.append(dataloader)
        generators = rng.loader_generators(self._train_loaders)
        random = self.run.random
        random.before_data_iterator(generators)
        if self._resumed_mid_epoch and generators:  # each redraw of a wrapped sampler's order starts where it did
            undo = _compat.before_each_sampler_redraw(
                dataloader, lambda: random.before_data_iterator(generators, generators_only=True))
            self._redraw_undos.append(undo)
            self.adapter.keep_undo(undo)

    def _watch_data_iterator(self, trainer: pl.Trainer) -> None:
        """A resume: the random state (and a mid-epoch one's sampler epoch) set as the interrupted run had them when
        it created its data iterator, before Lightning creates (and fast-forwards) the resumed run's."""
        self._train_loaders: list[Any] = []
        self._redraw_undos: list[_compat.Undo] = []
        self.adapter.keep_undo(_compat.before_train_iterator(trainer, self._before_data_iterator))

    def _after_data_iterator(self, trainer: pl.Trainer) -> None:
        """A resume's random state (a mid-epoch one's as it was saved, after Lightning created the data iterator)."""
        self.run.random.after_data_iterator(self._data_generators(trainer))
        for undo in self._redraw_undos:
            undo()
        self._train_loaders, self._redraw_undos = [], []


__all__ = ["LightningResume"]
