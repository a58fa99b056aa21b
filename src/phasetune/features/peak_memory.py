"""Peak memory of a stretch of training (one phase), measured the best way the platform allows.

* On a CUDA device: ``torch.cuda.max_memory_allocated`` (tensor memory on that GPU), reset per phase.
* On Linux without CUDA: the process's peak resident set size (``VmHWM``), reset per phase through
  ``/proc/self/clear_refs``. It counts everything the process holds (Python, libraries, data), not only
  tensors.
* Elsewhere: ``getrusage`` peak RSS, which cannot be reset: the peak since the process started.

``KIND_LABELS`` says in words what a recorded value means; summaries print it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

CUDA = "cuda_max_allocated"
RSS = "process_peak_rss"
RSS_SINCE_START = "process_peak_rss_since_start"
KIND_LABELS = {
    CUDA: "peak CUDA memory allocated (torch.cuda.max_memory_allocated, per phase)",
    RSS: "peak resident memory of the process (VmHWM, reset per phase)",
    RSS_SINCE_START: "peak resident memory of the process since it started (cannot be reset per phase here)",
}
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class PeakMemory:
    """Reset, then read, the peak memory of ``device`` (see the module docstring for what is measured)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and torch.cuda.is_available():
            self.kind: str | None = CUDA
        elif _vm_hwm() is not None and _can_reset_rss():
            self.kind = RSS
        elif _ru_maxrss() is not None:
            self.kind = RSS_SINCE_START
        else:
            self.kind = None

    def reset(self) -> None:
        """Start a new measurement (no-op where the peak cannot be reset)."""
        if self.kind == CUDA:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == RSS:
            _reset_rss()

    def read(self) -> int | None:
        """Peak bytes since the last :meth:`reset` (or since start, for ``RSS_SINCE_START``)."""
        if self.kind == CUDA:
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == RSS:
            return _vm_hwm()
        if self.kind == RSS_SINCE_START:
            return _ru_maxrss()
        return None


def held_now(device: torch.device) -> int | None:
    """What the process holds now, in the unit its peak is measured in: CUDA bytes allocated on ``device``, else
    the resident set (``VmRSS``); None where neither can be read."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.memory_allocated(device))
    return _status_bytes("VmRSS")


def _vm_hwm() -> int | None:
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int | None:
    """A memory field of ``/proc/self/status`` in bytes, or None where it cannot be read."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_rss() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets only the peak-RSS counter (Linux >= 4.0)
        return True
    except OSError:
        return False


def _can_reset_rss() -> bool:
    return _reset_rss()


def _ru_maxrss() -> int | None:
    with contextlib.suppress(ImportError, OSError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere
    return None
