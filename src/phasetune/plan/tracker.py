"""Peak-memory trackers for the plan: torch's trackers, with the peak's place and two fixes.

Both trackers are torch's own (``torch.distributed._tools``): :class:`FSDPMemTracker` for models sharded with
``fully_shard``, :class:`MemTracker` for everything else. They see every tensor an operator creates, fake or
real, and sort it (parameter, gradient, activation, all-gather buffer, ...). phasetune adds:

- **where the peak is**: the innermost module running (and whether in forward or backward) when the total
  last grew to its maximum, and the categories at that moment;
- **a device-only peak**: categories that a run keeps in host memory (CPU offload of FSDP2 sharded
  parameters and gradients) are left out of the total the peak is taken over;
- **frozen parameters** (torch 2.13): ``MemTracker`` registers a gradient hook on every parameter of a module
  the first time it runs, and ``Tensor.register_hook`` raises "cannot register a hook on a tensor that
  doesn't require gradient" on a frozen one. :class:`PlainTracker` registers the hooks on trainable
  parameters only (frozen ones get no gradient to record). See ``docs/memory_plan.md``.

The optimizer step is never tracked here: under fake tensors the tracker also counts DTensor's sharding
propagation, which runs the step's operators on global-shape tensors (see :mod:`phasetune.plan.step`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker, _UpdateType

from phasetune.sharding.names import logical_name

_TOTAL = "Total"
#: FSDPMemTracker / MemTracker category names -> the plan's (several torch names fold into one)
CATEGORIES = {
    "Sharded Param": "params",
    "Parameter": "params",
    "Unsharded Param": "params_unsharded",
    "Buffer": "buffers",
    "Sharded Grad": "grads",
    "Unsharded Grad": "grads_unsharded",
    "Gradient": "grads",
    "Activation": "activations",
    "Temp": "temporaries",
    "All Gather": "params_unsharded",
    "Reduce Scatter": "collectives",
    "Inputs": "inputs",
    "Other": "inputs",
    "OptState": "optimizer",
    "Optstate": "optimizer",
}
#: the categories an FSDP2 run with CPU offload keeps in host memory
OFFLOADED = ("Sharded Param", "Sharded Grad")
#: torch's warnings that say nothing about the plan: ModTracker's about modules called from inside themselves
#: (Hugging Face models do), MemTracker's about reading .grad of FSDP1's non-leaf parameter views, FSDP2's about
#: a unit returning a view (a hazard for in-place ops in the user's code; the run warns about it itself), FSDP1's
#: reading data pointers of fake tensors (to compare storages)
_QUIET = ("The module hierarchy tracking maybe be messed up", "The .grad attribute of a Tensor that is not a leaf",
          r"FSDP2-wrapped module \(.*\) returned a view tensor", "Accessing the data pointer of FakeTensor")


@dataclass
class Peak:
    """The largest device total seen, the categories then (plan names, bytes), and where it happened."""

    total: int = 0
    categories: dict[str, int] = field(default_factory=dict)
    module: str = ""
    backward: bool = False

    @property
    def where(self) -> str:
        return f"{self.module or '<root>'} ({'backward' if self.backward else 'forward'})"


class _PeakMixin:
    """Keeps a :class:`Peak` of the device total (everything but ``host`` categories) and where it happened."""

    _curr_mem_snap: dict[torch.device, dict[Any, int]]
    _mod_tracker: Any

    def _init_peak(self, root: nn.Module, host: tuple[str, ...], label: str | None) -> None:
        self.peak = Peak()
        #: the device total each time an operator changed it, in order (passes at two sizes line up)
        self.timeline: list[int] = []
        self._host = host
        self._root_prefix = type(root).__name__ + "."
        self._root = label or type(root).__name__

    def _device_total(self, snap: dict[Any, int]) -> int:
        return snap.get(_TOTAL, 0) - sum(v for k, v in snap.items() if _name(k) in self._host)

    def _update_peak_stats(self, peak_state: Any) -> None:
        # Replaces torch's per-module peak bookkeeping (unused here, and a deepcopy per module per op).
        total = 0
        for snap in self._curr_mem_snap.values():
            total = self._device_total(snap)
            if total > self.peak.total:
                cats: dict[str, int] = {}
                for k, v in snap.items():
                    name = _name(k)
                    if name != _TOTAL and name not in self._host:
                        cats[CATEGORIES.get(name, name)] = cats.get(CATEGORIES.get(name, name), 0) + v
                self.peak = Peak(total, cats, self._innermost(), bool(self._mod_tracker.is_bw))
        if not self.timeline or self.timeline[-1] != total:  # metadata-only operators change nothing
            self.timeline.append(total)

    def _innermost(self) -> str:
        active = [p for p in self._mod_tracker.parents if p != "Global"]
        if not active:
            return self._root
        deepest = max(active, key=lambda p: (p.count("."), p))
        name = deepest[len(self._root_prefix):] if deepest.startswith(self._root_prefix) else ""
        return (logical_name(name) if name else "") or self._root

    def mark_kept_as_grads(self) -> int:
        """Count what a micro-step left behind as gradients; returns the bytes of gradients kept (unsharded ones
        under FSDP2).

        Between the micro-steps of an accumulation cycle nothing of a step survives but the gradients it
        accumulates (FSDP2 without gradient sync keeps them unsharded), which the trackers first file as
        temporaries because backward creates them.
        """
        grad_type = getattr(self._ref_class, "UNSHARDED_GRAD", None) or self._ref_class.GRAD  # type: ignore[attr-defined]
        for winfo, ref in list(self._WINFO.values()):  # type: ignore[attr-defined]
            if ref() is not None and _name(winfo.reftype) in ("Activation", "Temp"):
                old = winfo.reftype
                winfo.reftype = grad_type
                self._update_snap(_UpdateType.REF, winfo, old_reftype=old)  # type: ignore[attr-defined]
        return sum(v for snap in self._curr_mem_snap.values() for k, v in snap.items() if _name(k) == _name(grad_type))

    def current(self) -> int:
        """The device total tracked right now."""
        return sum(self._device_total(s) for s in self._curr_mem_snap.values())


def _name(key: Any) -> str:
    return str(getattr(key, "value", key))


class ShardedTracker(_PeakMixin, FSDPMemTracker):
    """``FSDPMemTracker`` keeping a :class:`Peak`; ``offload`` leaves sharded parameters and gradients out."""

    def __init__(self, root: nn.Module, *, offload: bool = False, label: str | None = None) -> None:
        from torch.distributed.fsdp import FSDPModule

        # torch's tracker wants the outermost FSDP unit; the peak's place is named from the module that is called
        # (a LightningModule-like holder may not be a unit itself)
        super().__init__(next(m for m in root.modules() if isinstance(m, FSDPModule)))
        self._init_peak(root, OFFLOADED if offload else (), label)

    def __enter__(self) -> ShardedTracker:
        super().__enter__()
        self._quiet = warnings.catch_warnings()
        self._quiet.__enter__()
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=message)
        return self

    def __exit__(self, *args: Any) -> None:
        self._quiet.__exit__(*args)
        super().__exit__(*args)


class PlainTracker(_PeakMixin, MemTracker):
    """``MemTracker`` keeping a :class:`Peak`, working with frozen parameters (see the module docstring).

    ``track_model`` registers every parameter and buffer up front (a module that never runs still holds them).
    """

    def __init__(self, root: nn.Module, *, label: str | None = None) -> None:
        super().__init__()
        self._init_peak(root, (), label)

    def track_model(self, model: nn.Module, *inputs: torch.Tensor) -> None:
        self.track_external(model, *inputs)

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for p in module.parameters():
                if p.requires_grad and p.is_leaf and self._param_to_grad_hook_handles.get(p, None) is None:
                    self._param_to_grad_hook_handles[p] = (
                        p.register_hook(self._record_grad),
                        p.register_post_accumulate_grad_hook(lambda q: self._record_grad(q.grad)),
                    )
        return memory

    def _record_grad(self, grad: torch.Tensor | None) -> None:
        if grad is not None:
            self._update_and_maybe_create_winfos(grad, self._ref_class.GRAD)  # type: ignore[attr-defined]

    def __enter__(self) -> PlainTracker:
        super().__enter__()
        self._quiet = warnings.catch_warnings()
        self._quiet.__enter__()
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=message)
        return self

    def __exit__(self, *args: Any) -> None:
        self._quiet.__exit__(*args)
        super().__exit__(*args)


__all__ = ["CATEGORIES", "OFFLOADED", "Peak", "PlainTracker", "ShardedTracker"]
