"""Small file helpers: YAML with duplicate-key rejection, atomic writes, and putting a complete file or
directory in place under its final name (:func:`replace_path`)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping defines the same key more than once; ``duplicates`` lists each occurrence."""

    def __init__(self, duplicates: list[str]) -> None:
        self.duplicates = duplicates
        super().__init__("; ".join(duplicates))


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that records every duplicated mapping key instead of keeping the last one."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    loader.flatten_mapping(node)
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            continue  # SafeLoader raises its own, clearer error for unhashable keys
        line = key_node.start_mark.line + 1
        if key in first_line:
            loader.duplicates.append(
                f"line {line}: duplicate key {key!r} (first defined at line {first_line[key]})"
            )
        else:
            first_line[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml(text: str) -> Any:
    """Parse YAML safely (no arbitrary objects); raise :class:`DuplicateKeyError` on repeated keys."""
    loader = _UniqueKeyLoader(text)
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    if loader.duplicates:
        raise DuplicateKeyError(loader.duplicates)
    return data


PARTIAL_PREFIX = ".partial-"  # a checkpoint, snapshot or export being written, complete once renamed
TRASH_PREFIX = ".trash-"  # an old one moved aside by the two-step fallback of replace_path, being removed


def partial_path(final: str | os.PathLike[str]) -> Path:
    """A hidden name next to ``final`` to write it under before :func:`replace_path` puts it in place; one a save
    killed halfway leaves is removed by :func:`remove_leftovers`."""
    final = Path(final)
    return final.with_name(f"{PARTIAL_PREFIX}{final.name}-{time.time_ns()}")


def replace_path(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Rename the complete file or directory ``tmp`` to ``final`` (on the same filesystem: write ``tmp`` next to
    ``final``), replacing what is there, so that ``final`` names a complete one at every moment: the old one, then
    the new one.

    A file replaces a file (or a symlink) in one ``os.replace``. A directory cannot be renamed over another, nor a
    file over a directory: on Linux the two names are swapped in one step (``renameat2(RENAME_EXCHANGE)``) and the
    old one, now under ``tmp``'s name, is removed; a kill during that removal leaves part of the old one there,
    never under ``final``.

    Where no swap is possible (another system, a C library before glibc 2.28, a filesystem without it) it takes
    two steps: the old one is moved aside to a hidden ``.trash-<name>-<n>`` name, then the new one renamed in. A
    process killed between the two leaves *no* ``final`` (the old one whole under the hidden name, the new one
    under ``tmp``; a resume looking for ``final`` finds none, and :func:`remove_leftovers` removes both).
    """
    tmp, final = Path(tmp), Path(final)
    old_is_dir = final.is_dir() and not final.is_symlink()
    if not (old_is_dir or (tmp.is_dir() and (final.exists() or final.is_symlink()))):
        os.replace(tmp, final)
    elif _exchange(tmp, final):
        remove_path(tmp)
    else:
        old = final.with_name(f"{TRASH_PREFIX}{final.name}-{time.time_ns()}")
        os.replace(final, old)
        os.replace(tmp, final)
        remove_path(old)


def remove_leftovers(directory: str | os.PathLike[str], name: str | None = None) -> None:
    """Remove the ``.partial-<name>-<n>`` and ``.trash-<name>-<n>`` entries (:func:`partial_path`,
    :func:`replace_path`) in ``directory``, of every name or of ``name``: what saves killed before their result
    was in place left. Only call it when no other save into ``directory`` is under way (its partial entry
    would go)."""
    directory = Path(directory)
    names = re.escape(name) if name is not None else ".+"
    for prefix in (PARTIAL_PREFIX, TRASH_PREFIX):
        for stale in directory.glob(f"{prefix}*"):
            if re.fullmatch(rf"{re.escape(prefix)}{names}-\d+", stale.name):
                remove_path(stale)


def remove_path(path: str | os.PathLike[str]) -> None:
    """Remove a file, a symlink or a directory tree; nothing there is fine."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@functools.cache
def _renameat2() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names of ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system,
    its C library or the filesystem cannot."""
    fn = _renameat2() if sys.platform.startswith("linux") else None
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], None], *, tmp: str | os.PathLike[str] | None = None
) -> Path:
    """Write a file through ``write(fileobj)`` so that ``path`` only ever holds a complete file.

    The data goes to a temporary file in the same directory, is flushed to disk, then put in place
    (:func:`replace_path`); a failure leaves any previous file untouched and removes the temporary one.
    ``tmp`` names the temporary file (e.g. :func:`partial_path`; created anew, with the permissions any new file
    gets); by default it is ``.<name>.<random>.tmp``, readable by this user only.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    else:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        replace_path(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``, with the permissions any new file gets (the umask's: text
    files such as schedules are for reading and editing, unlike the owner-only default of :func:`atomic_write`)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), tmp=tmp)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str], *, tmp: str | os.PathLike[str] | None = None) -> Path:
    """Atomically ``torch.save`` ``obj`` to ``path`` (``tmp``: see :func:`atomic_write`)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f), tmp=tmp)
