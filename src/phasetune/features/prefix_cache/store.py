"""Storage of cached prefix outputs for :mod:`phasetune.features.prefix_cache.cache` (torch and numpy only).

- :class:`Store`: the per-sample entries, in RAM up to a byte limit, beyond it gathered into chunk files
  (written whole, then renamed) under a spill directory and read back through copy-on-write memory maps;
  the files are deleted by :meth:`Store.clear`;
- the output trees: :func:`build_tree` rebuilds a module's output (tensors, tuples, lists, dicts, named tuples,
  dataclasses) from the spec ``cache._flatten`` makes, :class:`StandIn` builds a no-memory stand-in for
  a skipped prefix module's output for another batch (:func:`batch_dims` records its shape), :func:`mask_widths`
  reads a right-padded padding mask, :func:`tensors_in` walks an output's tensors; :func:`size_text` formats bytes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phasetune.util import dist


# ---------------------------------------------------------------------------------------- storage
class Store:
    """Per-sample tensors: in RAM up to ``limit_bytes``; beyond it gathered into chunks of ``chunk_bytes``, each
    written whole to a file under ``spill_dir`` (temp + rename) and read back through a copy-on-write memory map."""

    def __init__(self, limit_bytes: int, spill_dir: str | os.PathLike[str] | None, chunk_bytes: int) -> None:
        self.limit_bytes, self.chunk_bytes = limit_bytes, chunk_bytes
        self.parent = Path(spill_dir) if spill_dir is not None else None
        self.dir: Path | None = None
        self.ram: dict[int, tuple[torch.Tensor, ...]] = {}
        self.pending: dict[int, tuple[torch.Tensor, ...]] = {}  # spilled, waiting for their chunk to be written
        self.disk: dict[int, list[tuple[int, int, int, torch.Size, torch.dtype]]] = {}
        self.maps: list[np.memmap] = []
        self.ram_bytes = self.pending_bytes = self.disk_bytes = 0

    def __contains__(self, i: int) -> bool:
        return i in self.ram or i in self.pending or i in self.disk

    def __len__(self) -> int:
        return len(self.ram) + len(self.pending) + len(self.disk)

    def put(self, i: int, tensors: tuple[torch.Tensor, ...]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors)
        copy = tuple(t.detach().to("cpu", copy=True).contiguous() for t in tensors)  # not a view of the batch
        if self.ram_bytes + size <= self.limit_bytes:
            self.ram[i] = copy
            self.ram_bytes += size
            return
        self.pending[i] = copy
        self.pending_bytes += size
        if self.pending_bytes >= self.chunk_bytes:
            self.flush()

    def get(self, i: int) -> tuple[torch.Tensor, ...]:
        if i in self.ram:
            return self.ram[i]
        if i in self.pending:
            return self.pending[i]
        return tuple(torch.from_numpy(self.maps[c][off: off + n]).view(dtype).reshape(shape)
                     for c, off, n, shape, dtype in self.disk[i])

    def flush(self) -> None:
        """Write the pending entries as one chunk file (complete before it gets its name) and map it."""
        if not self.pending:
            return
        if self.dir is None:
            base = self.parent or Path(tempfile.gettempdir())
            base.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=f"prefix-cache-rank{dist.rank()}-", dir=base))
        path = self.dir / f"chunk-{len(self.maps):05d}.bin"
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
        refs: dict[int, list[tuple[int, int, int, torch.Size, torch.dtype]]] = {}
        offset = 0
        with open(tmp, "wb") as f:
            for i, tensors in self.pending.items():
                refs[i] = []
                for t in tensors:
                    pad = -offset % 16  # every tensor starts 16-byte aligned, so the dtype view is valid
                    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
                    f.write(b"\0" * pad + raw)
                    refs[i].append((len(self.maps), offset + pad, len(raw), t.shape, t.dtype))
                    offset += pad + len(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.maps.append(np.memmap(path, dtype=np.uint8, mode="c"))
        self.disk.update(refs)
        self.disk_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def files(self) -> list[Path]:
        return sorted(self.dir.iterdir()) if self.dir is not None and self.dir.exists() else []

    def clear(self) -> None:
        self.ram, self.pending, self.disk, self.maps = {}, {}, {}, []
        self.ram_bytes = self.pending_bytes = self.disk_bytes = 0
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def size_text(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


# ---------------------------------------------------------------------------------------- output trees
def build_tree(spec: Any, leaves: list[torch.Tensor]) -> Any:
    kind, body = spec
    if kind == "T":
        return leaves[body]
    if kind == "C":
        return body
    if isinstance(body, list):
        items = [build_tree(s, leaves) for s in body]
        return kind(*items) if hasattr(kind, "_fields") else kind(items)
    items = {k: build_tree(s, leaves) for k, s in body.items()}
    return kind(**items) if dataclasses.is_dataclass(kind) else kind(items)


def batch_dims(t: torch.Tensor, batch: int, width: int | None) -> list[Any]:
    """Shape of ``t`` with the batch size as ``"B"`` and (dim 1) the mask width as ``"W"``."""
    out: list[Any] = list(t.shape)
    if out and out[0] == batch:
        out[0] = "B"
    if width is not None and len(out) >= 3 and out[1] == width:
        out[1] = "W"
    return out


@dataclasses.dataclass
class StandIn:
    """How to build a stand-in for a skipped prefix module's output for another batch."""

    spec: Any
    leaves: list[tuple[list[Any], torch.dtype, torch.device]]

    def build(self, batch: int, width: int | None) -> Any:
        made = []
        for dims, dtype, device in self.leaves:
            shape = [batch if d == "B" else width if d == "W" else d for d in dims]
            fill = math.nan if dtype.is_floating_point else 0  # NaN: a suffix reading a stand-in fails loudly
            made.append(torch.full((), fill, dtype=dtype, device=device).expand(shape))  # no memory, no time
        return build_tree(self.spec, made)


def mask_widths(mask: Any, batch: int) -> tuple[int | None, list[int] | None]:
    """Width of a ``[batch, width]`` padding mask and each row's length (``None`` unless every row is right-padded)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != batch:
        return None, None
    keep = mask != 0
    width = mask.shape[1]
    last = torch.where(keep.any(1), width - keep.flip(1).int().argmax(1), torch.zeros(batch, dtype=torch.long))
    lengths = last.tolist()
    right = all(bool(keep[r, :n].all()) for r, n in enumerate(lengths))
    return width, lengths if right else None


def tensors_in(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from tensors_in(o)
    elif isinstance(obj, Mapping):
        for o in obj.values():
            yield from tensors_in(o)
