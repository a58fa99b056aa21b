"""The files a run keeps beside its front end's own: the run's state in a checkpoint folder, an implicit schedule.

Front ends whose framework saves checkpoints as folders (the Hugging Face Trainer's ``checkpoint-N``,
Accelerate's ``save_state``) put the run's state in the folder as :data:`STATE_FILE`, written atomically and read
back with ``weights_only=True``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from phasetune.errors import ConfigurationError
from phasetune.util.files import atomic_torch_save

if TYPE_CHECKING:
    from phasetune.run.phase_run import PhaseRun

#: the run's state in a checkpoint folder
STATE_FILE = "phasetune_state.pt"


def save_state_file(state: dict[str, Any], folder: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``folder/STATE_FILE`` atomically (a killed save leaves the previous file or none)."""
    return atomic_torch_save(state, Path(folder) / STATE_FILE)


def read_state_file(folder: str | os.PathLike[str], *, missing: str) -> dict[str, Any]:
    """The run's state saved in ``folder``; without one, a ConfigurationError naming the folder and the file,
    followed by ``missing`` (why it may be absent and what to do)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise ConfigurationError(f"cannot resume from {folder}: it holds no {STATE_FILE} ({missing})")
    return torch.load(path, map_location="cpu", weights_only=True)


def write_implicit_schedule(run: PhaseRun, path: str | os.PathLike[str] | None, info: Callable[[str], None]) -> None:
    """Write the schedule generated for ``run`` (its budget and each default's source in the header) to ``path``
    and say where (``path=None``: only say its phases and budget); a run given a schedule writes nothing. Call it
    on one process."""
    if run.implicit is None:
        return
    if path is not None:
        run.schedule.dump(path, resolved=False, header="\n".join(run.implicit.notes))
    info(f"implicit schedule ({len(run.schedule)} phases; {run.implicit.budget_line})" + (f": {path}" if path else ""))


__all__ = ["STATE_FILE", "read_state_file", "save_state_file", "write_implicit_schedule"]
