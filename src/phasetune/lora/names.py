"""Phase entries written with a parameter's name from before LoRA injection.

Injection renames a target's ``x.weight`` to ``x.base_layer.weight``. A schedule that names ``x.weight``
(or a regex that matched it and misses the new name) would silently stop training that weight, so each such
entry is a problem naming the phase, the entry and the name to write instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from phasetune.util.text import few


def pre_injection_name_problems(phase_params: Mapping[int, Sequence[str]], renames: Mapping[str, str]) -> list[str]:
    """One problem per phase entry that matches a name from before injection but not its new name.

    ``phase_params``: each phase's raw ``params`` entries; ``renames``: old name -> new name, as
    :class:`~phasetune.lora.injection.InjectionRecord` holds them. Entries are matched as the schedule
    validation matches them: an exact name, or a regex over whole names (or a prefix, as in FTS).
    """
    problems: list[str] = []
    for phase, entries in phase_params.items():
        for entry in entries:
            if not isinstance(entry, str):
                continue
            where = f"phase {phase}, key 'params'"
            if entry in renames:
                problems.append(f"{where}: '{entry}' is the name from before LoRA injection; did you mean "
                                f"'{renames[entry]}'?")
                continue
            try:
                pattern = re.compile(entry)
            except re.error:
                continue  # the schedule validation reports invalid regexes
            lost = [(old, new) for old, new in renames.items() if _matches(pattern, old) and not _matches(pattern, new)]
            if lost:
                olds = [o for o, _ in lost]
                news = [n for _, n in lost]
                problems.append(f"{where}: '{entry}' matched {few(olds)} before LoRA injection, but not the "
                                f"new name{'s' if len(news) > 1 else ''} {few(news)}; did you mean "
                                f"'{_suggest(entry, olds, news)}'?")
    return problems


def _matches(pattern: re.Pattern[str], name: str) -> bool:
    return bool(pattern.fullmatch(name) or pattern.match(name))


def _suggest(entry: str, olds: list[str], news: list[str]) -> str:
    """The entry rewritten for the new names: the escaped new name for an exact one, else the entry with
    an optional ``base_layer.`` before a final ``weight``/``bias`` (so it still matches the names it did)."""
    if len(news) == 1 and entry == re.escape(olds[0]):
        return re.escape(news[0])
    rewritten = re.sub(r"(\\\.|\.)(weight|bias)(\$?)$", r"\1(?:base_layer\\.)?\2\3", entry)
    try:
        if rewritten != entry and all(_matches(re.compile(rewritten), n) for n in news):
            return rewritten
    except re.error:
        pass
    return "|".join(re.escape(n) for n in news[:3])
