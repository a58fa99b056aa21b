"""Run each phase's forward and backward as rank 0 of N, under fake tensors, and track the peak.

One process builds the model inside ``FakeTensorMode`` (or with real tensors, for checks at small sizes),
freezes everything, shards it with :func:`phasetune.plan.shard.apply_strategy`, and then walks the schedule
the way a run does: phase k thaws its parameters on top of the earlier ones, and one training micro-step
(with gradient accumulation, the cycle's distinct micro-steps: :func:`micro_steps`) runs under the tracker. Gradients are set to None between micro-batches as ``zero_grad()`` does. The optimizer
step is not run here (see :mod:`phasetune.plan.step`).

:func:`largest_from_timelines` finds the largest micro-batch that fits from two passes: every moment's bytes
are affine in the micro-batch size (activations grow with it, parameters do not), and the same operators
run in the same order at any size, so two passes give each moment's line. When the passes do not line up,
:func:`largest_fitting` searches instead: the peak is then still a convex piecewise-linear function of the
size (a maximum of affine ones), so a chord between two sizes bounds it from above and a secant extended
beyond them from below, and the search stops when the bounds meet.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from phasetune.plan.model_source import ModelSource
from phasetune.plan.setup import PlanSetup
from phasetune.plan.shard import Sharding, apply_strategy
from phasetune.plan.tracker import Peak, PlainTracker, ShardedTracker
from phasetune.sharding.names import logical_name, module_path


def fake_tensor_limit(error: BaseException) -> bool:
    """Whether ``error`` comes from fake tensors having no values (a ``.item()``, a data-dependent shape or branch, an
    operator without a fake kernel): what a real run would not hit. Anything else a run would hit too."""
    from torch._subclasses import fake_tensor

    kinds = tuple(getattr(fake_tensor, n) for n in ("DataDependentOutputException", "DynamicOutputShapeException",
                                                     "UnsupportedOperatorException", "UnsupportedFakeTensorException")
                  if hasattr(fake_tensor, n))
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kinds) or type(seen).__name__ == "GuardOnDataDependentSymNode":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class PassFailed(RuntimeError):
    """The model's forward or backward did not run in the simulation (``module`` is where it stopped)."""

    def __init__(self, module: str, error: BaseException) -> None:
        self.module, self.error = module, error
        super().__init__(f"{module or '<root>'}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


@dataclass
class PassResult:
    """The micro-steps of one pass at ``micro_batch``: the device peak, the prefix's output bytes, the device total
    after every operator, and the gradient bytes kept between micro-steps (accumulation)."""

    micro_batch: int
    peak: Peak
    prefix_output: int = 0
    timeline: list[int] = field(default_factory=list)
    kept_grads: int = 0


@dataclass
class Model:
    """The simulated model after sharding: parameters by logical name, what sharding did, buffers' bytes."""

    runner: nn.Module
    params: dict[str, torch.Tensor]
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
    sharding: Sharding
    buffers: int
    blocks: list[str] = field(default_factory=list)
    label: str = ""  # the model's class, named where a peak falls outside every submodule


def tensor_mode(setup: PlanSetup) -> contextlib.AbstractContextManager[Any]:
    """Fake tensors for a plan, nothing for a real-tensor check."""
    return FakeTensorMode() if setup.tensors == "fake" else contextlib.nullcontext()


def build(source: ModelSource, setup: PlanSetup, mesh: Any,
          prepare: Callable[[nn.Module], set[str]] | None = None) -> Model:
    """Build the model (in the active tensor mode), freeze it, and shard it for ``setup``.

    ``prepare`` sees the model before sharding (logical names, original classes: where a schedule is resolved)
    and returns the parameter names to leave trainable.
    """
    from phasetune.core.generate import find_blocks

    model = source.build()
    if setup.dtype != torch.float32:
        to_dtype(model, setup.dtype)
    shapes = {logical_name(n): (tuple(p.shape), p.dtype) for n, p in model.named_parameters()}
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    blocks = find_blocks(model)
    label = type(getattr(model, "held", model)).__name__
    thawed = prepare(model) if prepare is not None else set()
    for n, p in model.named_parameters():
        p.requires_grad_(logical_name(n) in thawed)
    with warnings.catch_warnings():  # FSDP1 reads data pointers to find shared storage; fake tensors warn
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        runner, sharding = apply_strategy(model, setup, mesh)
    params = {logical_name(n): p for n, p in runner.named_parameters()}
    return Model(runner, params, shapes, sharding, buffers, blocks, label)


def to_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """``model.to(dtype)`` for its floating parameters and buffers, by putting converted tensors in their place:
    ``Module.to`` swaps a fake tensor in place, which the fake tensor mode refuses. Tied parameters stay tied."""
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in list(table.items()):
                if t is None or not t.is_floating_point() or t.dtype == dtype:
                    continue
                if id(t) not in done:
                    with torch.no_grad():
                        new = t.to(dtype)
                    done[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if is_param else new
                table[name] = done[id(t)]


def thaw(model: Model, names: set[str]) -> None:
    """Make exactly ``names`` trainable (FSDP2 units then re-derive their gradient dtypes, as a run must)."""
    from phasetune.sharding.plan import refresh_unit_dtypes

    for n, p in model.params.items():
        p.requires_grad_(n in names)
    refresh_unit_dtypes(model.runner)


def micro_steps(setup: PlanSetup) -> list[bool]:
    """The micro-steps a pass runs, each ``True`` when it synchronises gradients.

    Without accumulation one step. With it, a step that starts from no gradients and one that ends the cycle
    by reducing them; a sharded run whose cycle has steps in between also runs one of those (it starts from the
    gradients kept unsharded and ends with them: the heaviest step of the cycle when nothing is reduced). With
    ``sync_every_micro_step`` every step reduces: two steps, the second starting from the first's gradients.
    """
    if setup.accumulation == 1:
        return [True]
    if setup.sync_every_micro_step:
        return [True, True]  # the second starts with the first's reduced gradients
    if setup.accumulation == 2 or not setup.sharded:
        return [False, True]
    return [False, False, True]


def run_pass(model: Model, source: ModelSource, setup: PlanSetup, micro_batch: int, prefix_end: str | None = None) -> PassResult:
    """Track the micro-steps of :func:`micro_steps` at ``micro_batch``; gradients are dropped afterwards."""
    runner = model.runner
    args, kwargs = source.inputs_for(runner, micro_batch, setup.seq_len)
    tracker: ShardedTracker | PlainTracker
    if setup.strategy == "fsdp2":
        tracker = ShardedTracker(runner, offload=setup.cpu_offload, label=model.label)
        tracker.track_inputs((args, kwargs))
    else:
        tracker = PlainTracker(runner, label=model.label)
        tracker.track_model(runner, *_tensors((args, kwargs)))
    prefix_bytes: list[int] = []
    hook = _prefix_hook(runner, prefix_end, prefix_bytes)
    last_module = _LastModule(runner)
    kept = 0
    gc.collect()  # garbage of earlier passes freed now, not at a moment of this pass's timeline
    collecting = gc.isenabled()
    gc.disable()  # a cycle collection mid-pass frees tensors at moments two passes do not share
    try:
        with tracker, last_module:
            steps = micro_steps(setup)
            for i, sync in enumerate(steps):
                with _sync(runner, setup, sync), _autocast(setup):
                    loss = source.loss(runner(*args, **kwargs))
                    loss.backward()
                del loss
                if i < len(steps) - 1:
                    kept = tracker.mark_kept_as_grads()
                    tracker.reset_mod_stats()  # torch's trackers refuse a second call of the root otherwise
    except Exception as e:  # a model that does not run under fake tensors: the caller falls back
        raise PassFailed(last_module.name, e) from e
    finally:
        if collecting:
            gc.enable()
        if hook is not None:
            hook.remove()
        for p in runner.parameters():
            p.grad = None
    return PassResult(micro_batch, tracker.peak, prefix_bytes[0] if prefix_bytes else 0, tracker.timeline, kept)


def _sync(runner: nn.Module, setup: PlanSetup, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """Gradient synchronisation on or off for one micro-step, the way each strategy's run does it."""
    if setup.strategy == "fsdp2":
        for unit in _outer_units(runner):  # the model itself, or the outermost units inside a holder
            unit.set_requires_gradient_sync(sync)  # type: ignore[operator]
    elif setup.strategy == "fsdp1" and not sync:
        return runner.no_sync()  # type: ignore[operator,no-any-return]
    return contextlib.nullcontext()


def _outer_units(root: nn.Module) -> list[nn.Module]:
    from phasetune.sharding.names import is_sharded

    units = [(n, m) for n, m in root.named_modules() if is_sharded(m)]

    def inside(name: str, outer: str) -> bool:
        return name != outer and (outer == "" or name.startswith(outer + "."))

    return [m for n, m in units if not any(inside(n, o) for o, _ in units)]


def _autocast(setup: PlanSetup) -> contextlib.AbstractContextManager[Any]:
    if setup.compute_dtype is None or setup.strategy in ("fsdp2", "fsdp1"):
        return contextlib.nullcontext()  # sharded strategies cast through their mixed-precision policy
    return torch.autocast("cpu", dtype=setup.compute_dtype)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _prefix_hook(runner: nn.Module, prefix_end: str | None, out: list[int]) -> Any:
    if not prefix_end:
        return None

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if not out:
            out.append(sum(t.numel() * t.element_size() for t in _tensors(output)))

    return runner.get_submodule(module_path(runner, prefix_end)).register_forward_hook(hook)


class _LastModule:
    """Remembers the logical name of the last module whose forward started (where a failing pass stopped)."""

    def __init__(self, root: nn.Module) -> None:
        self.names = {m: logical_name(n) for n, m in root.named_modules()}
        self.name = ""
        self._handle: Any = None

    def __enter__(self) -> _LastModule:
        def pre(module: nn.Module, args: Any) -> None:
            self.name = self.names.get(module, self.name)

        self._handle = nn.modules.module.register_module_forward_pre_hook(pre)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


# ------------------------------------------------------------------------------------------ micro-batch search


def largest_from_timelines(a: PassResult, b: PassResult, budget: int, cap: int) -> int | None:
    """The largest micro-batch in ``[a.micro_batch, cap]`` whose every moment fits ``budget``, from two passes whose
    operators line up one to one (``a.micro_batch - 1`` when even ``a``'s size does not fit; None when the passes do
    not line up: the caller searches instead).

    Each moment's bytes are affine in the micro-batch size, so two passes give every moment's line.
    """
    if len(a.timeline) != len(b.timeline) or not a.timeline or b.micro_batch <= a.micro_batch:
        return None
    best = cap
    span = b.micro_batch - a.micro_batch
    for ya, yb in zip(a.timeline, b.timeline):
        if ya > budget:
            return a.micro_batch - 1
        slope = (yb - ya) / span
        if slope > 0:
            best = min(best, a.micro_batch + int((budget - ya) // slope))
    return best


def largest_fitting(peak_at: Callable[[int], int], budget: int, known: dict[int, int], cap: int,
                    passes: int = 3) -> tuple[int, dict[int, int]]:
    """The largest micro-batch in ``[1, cap]`` whose peak (``peak_at(b)``) is at most ``budget``, with at most
    ``passes`` more calls; ``known`` maps sizes already run to their peaks. Returns ``(size, known)``, 0 when
    even 1 does not fit. The size returned is proven to fit (run, or under a chord of two runs); see the module
    docstring for the bounds."""
    known = dict(known)
    for left in range(passes, -1, -1):
        fits = [b for b, v in known.items() if v <= budget]
        lo = max(fits, default=0)
        hi = min((b for b, v in known.items() if v > budget and b > lo), default=cap + 1)
        if lo and hi <= cap:
            lo = max(lo, _floor_chord(known, lo, hi, budget))  # under the chord: fits
        if lo:
            hi = min(hi, _ceiling(known, lo, budget, cap) + 1)  # above the secant: cannot fit
        if (lo == 0 and 1 in known) or (lo and lo + 1 >= hi) or left == 0:
            return lo, known
        if lo == 0:
            nxt = 1
        elif sum(1 for b in known if b <= lo) < 2:
            nxt = min(2 * lo, hi - 1)  # a second point for the secant
        else:
            nxt = hi - 1
        known[nxt] = peak_at(nxt)
    return max((b for b, v in known.items() if v <= budget), default=0), known


def _ceiling(known: dict[int, int], lo: int, budget: int, cap: int) -> int:
    """Largest size the secant through the two largest sizes <= ``lo`` allows (a lower bound on the peak)."""
    below = sorted(b for b in known if b <= lo)
    if len(below) < 2:
        return cap
    a, b = below[-2], below[-1]
    slope = (known[b] - known[a]) / (b - a)
    if slope <= 0:
        return cap
    return int(min(cap, b + (budget - known[b]) // slope))


def _floor_chord(known: dict[int, int], lo: int, hi: int, budget: int) -> int:
    """Largest size between ``lo`` and ``hi`` whose chord value is within ``budget`` (the peak is below the chord)."""
    slope = (known[hi] - known[lo]) / (hi - lo)
    if slope <= 0:
        return lo
    return int(lo + (budget - known[lo]) // slope)


__all__ = ["Model", "PassFailed", "PassResult", "build", "fake_tensor_limit", "largest_fitting", "largest_from_timelines", "micro_steps",
           "run_pass", "tensor_mode", "thaw"]
