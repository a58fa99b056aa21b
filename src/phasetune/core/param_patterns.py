"""A schedule's ``params`` entries resolved against the model's parameter names, as finetuning-scheduler
reads them: an exact name, a regex matching whole names, or (with a note) a regex matching name prefixes; and
the hints the schedule's messages give when an entry matches more than its writer likely meant."""

from __future__ import annotations

import difflib
import re

from phasetune.util.text import few


def match_entry(entry: str, names: list[str], name_set: set[str]) -> tuple[list[str], str | None, str | None]:
    """Resolve one ``params`` entry: ``(names, problem, note)``.

    An exact parameter name is itself. Otherwise the entry is a regex matched against whole names; one that
    matches no whole name but starts some is taken as finetuning-scheduler (FTS) takes it, as a prefix
    (``re.match``), with a note naming the whole-name form. One whose whole-name and prefix matches differ
    is refused: FTS would train the prefix set, and which one was meant cannot be told.
    """
    if entry in name_set:
        return [entry], None, None
    try:
        pattern = re.compile(entry)
    except re.error as e:
        return [], f"{quote(entry)} is neither a parameter name nor a valid regex ({e})", None
    hits = [n for n in names if pattern.fullmatch(n)]
    prefixed = [n for n in names if pattern.match(n)]
    if hits and len(prefixed) == len(hits):
        return hits, None, None
    if hits:
        extra = [n for n in prefixed if n not in set(hits)]
        return [], (
            f"{quote(entry)} matches {len(hits)} parameter names as a whole but {len(prefixed)} as a prefix, as "
            f"finetuning-scheduler reads it (also {few(extra)}); write {quote(_prefix_form(entry, prefixed, names))} "
            f"for those {len(prefixed)} or {quote(_whole_form(entry))} for the {len(hits)} whole-name matches"
        ), None
    if prefixed:
        form = _prefix_form(entry, prefixed, names)
        note = (
            f"{quote(entry)} matches no parameter name as a whole; taken as a prefix, as finetuning-scheduler does "
            f"({len(prefixed)} parameters, e.g. {prefixed[0]!r}); write {quote(form)} to match them as a whole"
        )
        literal = entry.rstrip(".")
        stray = [n for n in prefixed if not n.startswith(literal + ".")] if re.fullmatch(r"[\w.]+", literal) else []
        if stray:
            module_only = re.escape(literal) + r"\..*"
            note += f" (it takes {few(stray, 1)} too; {quote(module_only)} takes module {literal!r} alone)"
        return prefixed, None, note
    close = difflib.get_close_matches(entry, names, n=1, cutoff=0.75)
    tip = f"; did you mean {close[0]!r}?" if close else "; check the names with `phasetune schedule show` or model.named_parameters()"
    return [], f"{quote(entry)} matches no parameter{tip}", None


def _prefix_form(entry: str, prefixed: list[str], names: list[str]) -> str:
    """A regex whose whole-name matches are exactly the names ``entry`` matches as a prefix."""
    simple = entry + ("*" if entry.endswith(".") else ".*")
    if "|" not in entry and [n for n in names if re.fullmatch(simple, n)] == prefixed:
        return simple
    return f"(?:{entry}).*"


def _whole_form(entry: str) -> str:
    """A regex that matches the same names as a prefix as ``entry`` does as a whole."""
    return f"(?:{entry})$" if "|" in entry else f"{entry}$"


def quote(text: str) -> str:
    """Quote a schedule entry as the user wrote it (``repr`` would double regex backslashes)."""
    return f"'{text}'"


def dot_hint(entry: str, name: str) -> str:
    """Explain the common trap where an unescaped '.' lets 'layer.1.*' match 'layer.10.weight'."""
    literal = re.sub(r"\.\*$", "", entry)
    if name == literal:  # an exact name: no other name is involved
        return ""
    if re.fullmatch(r"[\w.]+", literal) and "." in literal and not name.startswith(literal + "."):
        escaped = re.escape(literal) + r"\..*"
        return f" (note: '.' in a regex matches any character, so {quote(entry)} also matches {name!r}; write {quote(escaped)})"
    return ""
