"""Text for people: tables, short module lists, human-readable numbers (no Lightning, no torch)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A plain-text table with a header rule; ``align`` holds one ``l``/``r`` per column (default: l, then r)."""
    rows = [["" if c is None else str(c) for c in row] for row in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def whole_modules(names: Sequence[str], all_names: Iterable[str]) -> list[str]:
    """``names`` with every run of names that makes up a whole module replaced by the module's name.

    A module (a dotted prefix) stands in when every name under it in ``all_names`` is in ``names``; the
    outermost such module wins. Order follows the first name of each item.
    """
    chosen = set(names)
    under: dict[str, set[str]] = {}
    for n in all_names:
        parts = n.split(".")
        for depth in range(1, len(parts)):
            under.setdefault(".".join(parts[:depth]), set()).add(n)
    items: list[str] = []
    covered: set[str] = set()
    for n in names:
        if n in covered:
            continue
        parts = n.split(".")
        item = n
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            if under.get(prefix, set()) <= chosen:
                item = prefix
                covered |= under[prefix]
                break
        covered.add(n)
        if item not in items:
            items.append(item)
    return items


def covering_modules(names: Sequence[str], all_names: Iterable[str], limit: int = 3) -> str:
    """Describe parameter ``names`` by the fewest whole modules they make up, e.g. ``encoder.layer.4-5``.

    A module is named when every parameter under it is in ``names``; consecutive numbered siblings are
    joined (``layer.0-3``). At most ``limit`` items are listed, then ``+N more``.
    """
    if not names:
        return "nothing"
    items = whole_modules(names, all_names)
    items = _join_ranges(items)
    shown = ", ".join(items[:limit])
    return shown + (f" +{len(items) - limit} more" if len(items) > limit else "")


def _join_ranges(items: list[str]) -> list[str]:
    """``a.layer.0, a.layer.1, a.layer.2`` -> ``a.layer.0-2`` (consecutive integers under one parent)."""
    out: list[str] = []
    run: tuple[str, int, int] | None = None  # parent, first, last
    for item in [*items, ""]:
        parent, _, last = item.rpartition(".")
        if run and parent == run[0] and last.isdigit() and int(last) in (run[2] + 1, run[2] - 1):
            run = (run[0], run[1], int(last))
            continue
        if run:
            lo, hi = sorted((run[1], run[2]))
            out.append(f"{run[0]}.{lo}" if lo == hi else f"{run[0]}.{lo}-{hi}")
            run = None
        if parent and last.isdigit():
            run = (parent, int(last), int(last))
        elif item:
            out.append(item)
    return out


def few(items: Sequence[str], n: int = 3, quote: bool = True) -> str:
    """The first ``n`` items (``repr``-quoted unless ``quote=False``), then ``and N more``."""
    shown = ", ".join(repr(x) if quote else str(x) for x in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def fmt_count(n: int | None) -> str:
    """``22713986`` -> ``22.7M``."""
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def fmt_bytes(n: int | None) -> str:
    """``123456789`` -> ``118 MiB``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit in ("B", "KiB", "MiB") else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"  # pragma: no cover


def fmt_seconds(s: float | None) -> str:
    """``83.2`` -> ``1m23s``; ``4.25`` -> ``4.2s``."""
    if s is None or not math.isfinite(s):
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    minutes, seconds = divmod(round(s), 60)
    return f"{minutes}m{seconds:02d}s"


def fmt_value(v: float | None) -> str:
    """A metric value with 4 significant digits, ``-`` when missing."""
    return "-" if v is None else f"{v:.4g}"
