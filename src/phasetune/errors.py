"""Exceptions raised by phasetune.

Every error a user can cause carries the list of problems found, each naming where it is
(phase, key, parameter or module) and what to do about it, so that one run reports them all.
"""

from __future__ import annotations

from collections.abc import Iterable


class PhasetuneError(Exception):
    """Base class of phasetune's user-facing errors."""


class ScheduleError(PhasetuneError, ValueError):
    """A fine-tuning schedule (or the configuration around it) is invalid.

    ``problems`` holds one line per problem; ``str(error)`` lists them all.
    """

    def __init__(self, problems: Iterable[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" {source}" if source else ""
        n = len(self.problems)
        head = f"the fine-tuning schedule{where} has {n} problem{'s' if n != 1 else ''}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class ConfigurationError(PhasetuneError, ValueError):
    """The training setup cannot run the schedule (strategy, optimizer, callbacks, checkpoint)."""

    def __init__(self, problems: Iterable[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = "\n".join(
                [f"{len(self.problems)} configuration problems:", *(f"  - {p}" for p in self.problems)]
            )
        super().__init__(message)


class ScheduleGenerated(SystemExit):
    """Raised by ``gen_ft_sched_only=True`` after the schedule was written: training is skipped.

    It is a ``SystemExit`` with code 0, so a script ends cleanly; catch it to carry on in a notebook.
    ``path`` is where the schedule was written.
    """

    def __init__(self, path: str) -> None:
        super().__init__(0)
        self.path = path

    def __str__(self) -> str:
        return f"fine-tuning schedule written to {self.path}; training skipped (gen_ft_sched_only=True)"
