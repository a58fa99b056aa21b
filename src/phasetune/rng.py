"""Every random generator a training process draws from, saved and restored per global rank (torch only).

Python ``random`` (its whole state, the gauss cache included), NumPy's global generator when NumPy is
imported, torch's CPU generator and every CUDA device's generator. Dropout masks, shuffled ``DataLoader``
orders (a sampler without a generator of its own draws its seed from torch's) and augmentations come from
these, so a run resumes bit-equal only when they are back where the uninterrupted run had them.

A checkpoint holds one state per rank (:func:`checkpoint_state`). Resuming onto another number of ranks
cannot give each rank its own stream back: :func:`problem` refuses it unless ``resume_rng="reseed"``, which
seeds every generator from the saved state and the new rank (:func:`restore_checkpoint_state`).
"""

from __future__ import annotations

import hashlib
import random
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from phasetune.errors import ConfigurationError

#: what a resume does with the saved random state: restore each rank's exactly, or (when the number of
#: ranks changed) re-seed every generator deterministically from it
RESUME_RNG = ("exact", "reseed")


def capture() -> dict[str, Any]:
    """This process's random state (plain types and tensors: loadable with ``torch.load(weights_only=True)``)."""
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
    return state


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


def _all_gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    box: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


def checkpoint_state(*, rank: int, world_size: int, gather: bool) -> dict[str, Any]:
    """The random state a checkpoint holds: this rank's (each rank saves its own), or every rank's
    (``gather``: a collective every rank calls, for front ends where rank 0 alone writes the state)."""
    own = capture()
    states = dict(enumerate(_all_gather(own))) if gather else {rank: own}
    return {"world_size": world_size, "states": states}


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


__all__ = ["RESUME_RNG", "capture", "checkpoint_state", "problem", "reseed", "restore", "restore_checkpoint_state"]
