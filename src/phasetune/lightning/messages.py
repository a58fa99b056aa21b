"""phasetune's warnings under Lightning, said where the user can act on them.

A warning raised from inside a callback hook would point at phasetune's (or Lightning's) own source line, which
says nothing to the user (``run.py:91: UserWarning ... env.warn(``). :func:`warn` raises a
:class:`PhasetuneWarning` (a ``UserWarning``, so warning filters and ``pytest.warns`` see it as before) attributed
to the first frame outside phasetune, Lightning, torch and the standard library: the user's ``trainer.fit(...)``
line. Informational lines go to the ``phasetune`` logger, as under every front end.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
import warnings
from pathlib import Path

from lightning.pytorch.utilities.rank_zero import rank_zero_only

log = logging.getLogger("phasetune")


class PhasetuneWarning(UserWarning):
    """A warning of phasetune's: something in the run, the schedule or the Trainer's settings to look at."""


def _library_dirs() -> tuple[str, ...]:
    import jsonargparse
    import lightning
    import torch

    dirs = {str(Path(m.__file__).resolve().parent) for m in (lightning, torch, jsonargparse)}
    dirs.add(str(Path(__file__).resolve().parents[1]))  # phasetune's own folder (this file is in lightning/)
    dirs.add(str(Path(sysconfig.get_paths()["stdlib"]).resolve()))
    return tuple(d + os.sep for d in sorted(dirs))


_LIBRARIES: tuple[str, ...] | None = None


def user_stacklevel() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in the caller) of the first frame outside the libraries that call
    phasetune's hooks: the user's code (the ``phasetune`` console script when nothing else is found)."""
    global _LIBRARIES
    if _LIBRARIES is None:
        _LIBRARIES = _library_dirs()
    frame, level = sys._getframe(2), 2  # level 1 is the caller's own frame, which is phasetune's
    while frame.f_back is not None and os.path.realpath(frame.f_code.co_filename).startswith(_LIBRARIES):
        frame, level = frame.f_back, level + 1
    return level


def warn(message: str) -> None:
    """Warn once (on rank 0), attributed to the user's code (see the module docstring)."""
    if getattr(rank_zero_only, "rank", 0) == 0:
        warnings.warn(message, PhasetuneWarning, stacklevel=user_stacklevel())


def info(message: str) -> None:
    """Log ``message`` as information, once (on rank 0)."""
    if getattr(rank_zero_only, "rank", 0) == 0:
        log.info(message if message.startswith("phasetune") else f"phasetune: {message}")
