"""Every random generator a training process draws from, saved and restored per global rank (torch only).

Python ``random`` (its whole state, the gauss cache included), NumPy's global generator when NumPy is
imported, torch's CPU generator and every CUDA device's generator. Dropout masks, shuffled ``DataLoader``
orders (a sampler without a generator of its own draws its seed from torch's) and augmentations come from
these, so a run resumes bit-equal only when they are back where the uninterrupted run had them.

Samplers that keep a ``torch.Generator`` of their own (torchdata's ``RandomSampler``, a ``DataLoader(generator=...)``,
also when Lightning wraps them in its ``DistributedSamplerWrapper``) draw each epoch's order from it: a front end
that can reach the training loader passes those generators (:func:`loader_generators`), and their states travel
with the process's (``"data"``). A checkpoint taken in the middle of an epoch also keeps the state as that epoch
started (``"epoch_start"``), so that a resumed run re-creating the epoch's iterator draws the same order.

A checkpoint holds one state per rank (:func:`checkpoint_state`). Resuming onto another number of ranks
cannot give each rank its own stream back: :func:`problem` refuses it unless ``resume_rng="reseed"``, which
seeds every generator from the saved state and the new rank (:func:`restore_checkpoint_state`).
"""

from __future__ import annotations

import hashlib
import random
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from phasetune.errors import ConfigurationError
from phasetune.util import dist

#: what a resume does with the saved random state: restore each rank's exactly, or (when the number of
#: ranks changed) re-seed every generator deterministically from it
RESUME_RNG = ("exact", "reseed")


def loader_generators(loaders: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that the samplers of ``loaders`` (a data loader, or a list / dict of them)
    keep and draw their order from, in a fixed order: the loader's own ``generator``, then those found
    through ``batch_sampler`` / ``sampler`` links and samplers wrapped as datasets (``_sampler``)."""
    found: dict[int, torch.Generator] = {}
    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> None:
        if obj is None or id(obj) in seen or depth > 6:
            return
        seen.add(id(obj))
        gen = getattr(obj, "generator", None)
        if isinstance(gen, torch.Generator):
            found.setdefault(id(gen), gen)
        for name in ("batch_sampler", "sampler", "_sampler", "dataset"):
            child = getattr(obj, name, None)
            if name == "dataset" and (depth == 0 or not hasattr(child, "_sampler")):
                continue  # only a sampler wrapped as a dataset, never the user's data
            walk(child, depth + 1)

    items: Iterable[Any] = (loaders.values() if isinstance(loaders, Mapping)
                            else loaders if isinstance(loaders, (list, tuple)) else [loaders])
    for loader in items:
        walk(loader, 0)
    return list(found.values())


def capture(generators: Sequence[torch.Generator] = ()) -> dict[str, Any]:
    """This process's random state (plain types and tensors: loadable with ``torch.load(weights_only=True)``),
    with the states of ``generators`` (a loader's, see :func:`loader_generators`) under ``"data"``."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if "numpy" in sys.modules:  # only a NumPy the program uses; importing it here would be a side effect
        np = sys.modules["numpy"]
        ns = np.random.get_state(legacy=False)
        state["numpy"] = {"key": ns["state"]["key"].tolist(), "pos": int(ns["state"]["pos"]),
                          "has_gauss": int(ns["has_gauss"]), "gauss": float(ns["gauss"])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generators:
        state["data"] = [g.get_state() for g in generators]
    return state


def restore_generators(
    state: Mapping[str, Any], generators: Sequence[torch.Generator], warn: Callable[[str], None] | None = None,
    where: str = "", *, apply: bool = True,
) -> None:
    """Put ``generators`` back to the ``"data"`` states in ``state`` (``apply=False``: restored already, only
    checked); when their number differs from the saved one (another loader), set as many as match and say
    (``warn``) that the data order differs."""
    saved = list(state.get("data") or [])
    if apply:
        for gen, gen_state in zip(generators, saved):
            gen.set_state(gen_state)
    if len(saved) != len(generators) and warn is not None:
        warn(f"the training data loader's samplers keep {len(generators)} random generator(s) of their own and the "
             f"checkpoint{where} saved {len(saved)}: the data order after this resume differs from an uninterrupted "
             "run's; resume with the same data loader setup")


def restore(state: Mapping[str, Any]) -> None:
    """Put this process's generators back to ``state`` (from :func:`capture`)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    if isinstance(py, Mapping):
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    else:  # checkpoints of phasetune <= 0.2's plain strategy kept the Mersenne state only, not the gauss cache
        version, _, gauss = random.getstate()
        random.setstate((version, tuple(py), gauss))
    if "numpy" in state:
        import numpy as np

        ns = state["numpy"]
        np.random.set_state(("MT19937", np.asarray(ns["key"], dtype=np.uint32), ns["pos"], ns["has_gauss"],
                             ns["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def reseed(saved: Mapping[str, Any], rank: int) -> int:
    """Seed every generator from the saved state of the lowest saved rank and ``rank``; returns the seed."""
    first = saved["states"][min(saved["states"])]["torch"]
    digest = hashlib.sha256(first.numpy().tobytes() + rank.to_bytes(4, "little")).digest()
    seed = int.from_bytes(digest[:4], "little")
    random.seed(seed)
    torch.manual_seed(seed)  # CUDA devices' generators too
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed)
    return seed


def checkpoint_state(
    *, rank: int, world_size: int, gather: bool, epoch_start: Mapping[str, Any] | None = None,
    generators: Sequence[torch.Generator] = (),
) -> dict[str, Any]:
    """The random state a checkpoint holds: this rank's (each rank saves its own), or every rank's
    (``gather``: a collective every rank calls, for front ends where rank 0 alone writes the state).

    ``epoch_start``: this rank's state as the current training epoch started (a :func:`capture`), saved under
    ``"epoch_start"`` so that a resume in the middle of the epoch can re-create a data order drawn then.
    ``generators``: the training loader's (:func:`loader_generators`), saved with the process's.
    """
    own = (capture(generators), epoch_start)
    pairs = dict(enumerate(dist.all_gather_object(own))) if gather else {rank: own}
    state: dict[str, Any] = {"world_size": world_size, "states": {r: p[0] for r, p in pairs.items()}}
    if epoch_start is not None:
        state["epoch_start"] = {r: p[1] for r, p in pairs.items() if p[1] is not None}
    return state


def rank_state(saved: Mapping[str, Any], which: str, *, rank: int, world_size: int) -> Mapping[str, Any] | None:
    """This rank's ``which`` state (``"states"``: at the save, ``"epoch_start"``) from a :func:`checkpoint_state`;
    None when there is none or it was saved by another number of ranks."""
    states = saved.get(which) or {}
    return states.get(rank) if saved["world_size"] == world_size else None


def problem(saved: Mapping[str, Any], *, rank: int, world_size: int, mode: str, where: str = "") -> str | None:
    """Why ``saved`` cannot be restored exactly on this rank (None when it can, or when ``mode`` re-seeds)."""
    if mode == "reseed" or (saved["world_size"] == world_size and rank in saved["states"]):
        return None
    return (f"cannot resume{where} exactly: its random state was saved by {saved['world_size']} processes and this "
            f"run has {world_size}, so each process's generators cannot be restored; pass resume_rng='reseed' "
            "(FinetuningScheduler or ScheduledFinetuning) to continue with generators re-seeded from the saved state")


def restore_checkpoint_state(
    saved: Mapping[str, Any], *, rank: int, world_size: int, mode: str, warn: Callable[[str], None], where: str = ""
) -> None:
    """Restore this rank's saved random state, or re-seed (``mode="reseed"`` and another number of ranks)."""
    if saved["world_size"] == world_size and rank in saved["states"]:
        restore(saved["states"][rank])
        return
    if mode != "reseed":
        raise ConfigurationError(problem(saved, rank=rank, world_size=world_size, mode=mode, where=where))
    seed = reseed(saved, rank)
    warn(f"resume_rng='reseed': the random state{where} was saved by {saved['world_size']} processes and this run has "
         f"{world_size}; every generator was re-seeded from it (rank {rank}: seed {seed}), so data order, dropout "
         "and augmentations differ from an uninterrupted run")


class RandomState:
    """One rank's random state over a fit: kept as each training epoch starts, saved with checkpoints, and given
    back on resume at the moments the front end names. ``env`` gives ``rank``, ``world_size`` and ``warn``;
    ``mode`` is ``resume_rng``."""

    def __init__(self, env: Any, mode: str) -> None:
        self.env, self.mode = env, mode
        self._epoch_start: dict[str, Any] | None = None
        self._pending: tuple[Mapping[str, Any], str] | None = None  # not restored yet
        self._pending_data: tuple[Mapping[str, Any], str, bool] | None = None  # deferred: around the data iterator

    @property
    def awaiting_data_iterator(self) -> bool:
        """A deferred :meth:`resume` waits for :meth:`before_data_iterator` / :meth:`after_data_iterator`."""
        return self._pending_data is not None

    def note_epoch_start(self, generators: Sequence[torch.Generator] = ()) -> None:
        """Keep the state (and the training loader's ``generators``) as a training epoch starts, for checkpoints
        saved during the epoch: the epoch's data iterator draws its order from them when it starts, and
        :meth:`before_data_iterator` gives them back to a run resumed in the middle of the epoch."""
        self._epoch_start = capture(generators)

    def checkpoint_state(self, *, gather: bool, generators: Sequence[torch.Generator] = ()) -> dict[str, Any]:
        """:func:`checkpoint_state` of this rank (with the epoch's starting state)."""
        return checkpoint_state(rank=self.env.rank, world_size=self.env.world_size, gather=gather,
                                epoch_start=self._epoch_start, generators=generators)

    def resume(self, saved: Mapping[str, Any], where: str, *, defer: bool, mid_epoch: bool,
               generators: Sequence[torch.Generator] = ()) -> None:
        """Take a checkpoint's random state: restored now (with the loader's ``generators``), or (``defer``) by
        :meth:`before_data_iterator` and :meth:`after_data_iterator` (``mid_epoch``: the checkpoint was saved
        inside a training epoch)."""
        self._pending = (saved, where)
        if defer:
            self._pending_data = (saved, where, mid_epoch)
            return
        self.restore()
        state = rank_state(saved, "states", rank=self.env.rank, world_size=self.env.world_size)
        if state is not None and (generators or state.get("data")):
            restore_generators(state, generators, self.env.warn, where)

    def before_data_iterator(self, generators: Sequence[torch.Generator], *, generators_only: bool = False) -> None:
        """After a deferred :meth:`resume`, right before the run creates its first training data iterator (the
        loader exists: it may have drawn from the generators as it was built), with the loader's own
        generators: the state comes back as the saved run had it when it created its iterator (at the save; for a
        ``mid_epoch`` checkpoint, as its epoch started). Idempotent until :meth:`after_data_iterator`, so it may
        be called again with more generators (several loaders), or with ``generators_only`` before each redraw
        of a sampler's order."""
        if self._pending_data is None:
            return
        saved, _, mid_epoch = self._pending_data
        if not mid_epoch and not generators_only:
            self.restore()
        state = rank_state(saved, "epoch_start" if mid_epoch else "states", rank=self.env.rank,
                           world_size=self.env.world_size)
        if state is not None:
            if mid_epoch and not generators_only:
                restore(state)
            restore_generators(state, generators)

    def after_data_iterator(self, generators: Sequence[torch.Generator]) -> None:
        """Once the training data iterator exists, with the loader's own generators: a ``mid_epoch`` resume gets
        the state of the save back (the interrupted run created its iterator before that); an epoch-end one only
        checks its generators against the saved ones (restored by :meth:`before_data_iterator`, or now when that
        never ran)."""
        data, self._pending_data = self._pending_data, None
        if data is None:
            self.restore()
            return
        saved, where, mid_epoch = data
        restore_now = mid_epoch or self._pending is not None  # before_data_iterator did not run
        self.restore()
        state = rank_state(saved, "states", rank=self.env.rank, world_size=self.env.world_size)
        if state is not None:
            restore_generators(state, generators, self.env.warn, where, apply=restore_now)

    def restore(self) -> None:
        """Restore the process's generators from the resumed state (once; a no-op when there is none left)."""
        if self._pending is None:
            return
        (saved, where), self._pending = self._pending, None
        restore_checkpoint_state(saved, rank=self.env.rank, world_size=self.env.world_size, mode=self.mode,
                                 warn=self.env.warn, where=where)


__all__ = ["RESUME_RNG", "RandomState", "capture", "checkpoint_state", "loader_generators", "problem", "rank_state", "reseed",
           "restore", "restore_checkpoint_state", "restore_generators"]
