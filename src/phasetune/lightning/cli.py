"""The ``phasetune`` command: ``fit``/``validate``/``test`` (a LightningCLI) plus ``schedule generate|check|show``.

:func:`main` is the console script's entry point. It sends ``phasetune schedule ...`` to
:mod:`phasetune.lightning.schedule_command` and everything else to :class:`PhasetuneCLI`
(:mod:`phasetune.lightning.fit_command`).

Class paths are imported relative to the current directory too (like ``python -m``), so a project's own
modules (``examples.rotten_tomatoes.model.SentimentClassifier``) work without installing them.
User errors (bad config, missing file, invalid schedule) end in a short message and exit code 1 or 2,
not a traceback; set ``PHASETUNE_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

from phasetune.errors import PhasetuneError, ScheduleGenerated
from phasetune.lightning.fit_command import PhasetuneCLI
from phasetune.lightning.messages import PhasetuneWarning
from phasetune.lightning.schedule_command import UsageError, schedule_main

__all__ = ["PhasetuneCLI", "main"]

USER_ERRORS = (PhasetuneError, ArgumentError, MisconfigurationException, FileNotFoundError, ImportError)
#: the exit status of a fit stopped by SIGTERM (128 + 15, as a shell reports a process SIGTERM killed), so that a
#: job scheduler sees it was stopped, not finished
SIGTERM_EXIT = 143


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``phasetune`` console script; returns the exit code. phasetune's warnings print as
    ``phasetune: ...`` lines while it runs (no source line of the console script to point at)."""
    shown = warnings.showwarning
    warnings.showwarning = _phasetune_lines(shown)
    try:
        return _main(argv)
    finally:
        warnings.showwarning = shown


def _phasetune_lines(show: Any) -> Any:
    def showwarning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                    line: str | None = None) -> None:
        if issubclass(category, PhasetuneWarning):
            print(f"phasetune: {message}", file=sys.stderr if file is None else file)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def _main(argv: Sequence[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # Lightning 2.6 with torch >= 2.8 warns about its own pytree use on every run; nothing a user can change
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: class paths may name modules of this directory
    try:
        if args and args[0] == "schedule":
            return schedule_main(args[1:])
        PhasetuneCLI(args=None if argv is None else args, save_config_kwargs={"overwrite": True},
                     parser_kwargs={"prog": "phasetune", "exit_on_error": False})
        return 0
    except ScheduleGenerated as e:
        print(f"phasetune: {e}")
        return 0
    except SIGTERMException:  # Lightning ends a fit on SIGTERM with a SystemExit of status 0: say it was stopped
        print("phasetune: stopped by SIGTERM (Lightning ended the fit after the current step, saving nothing); resume "
              "from your last checkpoint with --ckpt_path", file=sys.stderr)
        return SIGTERM_EXIT
    except Exception as e:
        cause = _user_error(e)
        if cause is None or os.environ.get("PHASETUNE_DEBUG"):
            raise
        print(f"phasetune: error: {_one_line(cause)}", file=sys.stderr)
        return 2 if isinstance(cause, (ArgumentError, UsageError)) else 1


def _user_error(e: BaseException) -> BaseException | None:
    """The innermost user error (bad config, missing file or package, invalid schedule) that caused ``e``.

    jsonargparse wraps errors raised while building classes from the config in ValueErrors; anything that
    is not caused by a user error is a bug and keeps its traceback.
    """
    found, seen = None, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, USER_ERRORS):
            found = e
        e = e.__cause__ or e.__context__
    return found


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line. A PhasetuneError keeps its list of problems (all of them, on
    purpose); jsonargparse's nested explanations are reduced to the innermost reason."""
    text = str(e).strip() or type(e).__name__
    if isinstance(e, PhasetuneError):
        return text
    lines = [line for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "Problem with given class_path" in line:
            indent = len(line) - len(line.lstrip())
            detail = [line.strip().lstrip("- ")]
            for deeper in lines[i + 1:]:
                if len(deeper) - len(deeper.lstrip()) <= indent:
                    break
                detail.append(deeper.strip())
            return " ".join([lines[0].strip(), *detail])
    return " ".join(line.strip() for line in lines[:2])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
