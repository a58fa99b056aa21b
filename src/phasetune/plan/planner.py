"""``plan_memory``: the per-phase memory of a scheduled run, before launch.

For each phase of the schedule (resolved by phasetune's own schedule code, regexes included), rank 0 of the
planned world: model states from the local shards (:mod:`phasetune.plan.states`), the optimizer step from
torch's optimizer run on fake shards (:mod:`phasetune.plan.step`), and the forward/backward peak from a
simulated micro-step of the sharded model (:mod:`phasetune.plan.simulate`). With ``device_gib`` it also says
how much room is left and the largest micro-batch that fits; :mod:`phasetune.plan.advice` turns the table
into advice.
"""

from __future__ import annotations

import difflib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from typing import Any

import torch
from torch import nn

from phasetune.errors import ConfigurationError, PhasetuneError
from phasetune.plan.advice import advise
from phasetune.plan.model_source import ModelSource, model_source, with_adapters
from phasetune.plan.result import ANALYTIC, HostMemory, MemoryPlan, PhaseMemory
from phasetune.plan.setup import PlanSetup
from phasetune.plan.shard import Sharding, fake_world
from phasetune.plan.simulate import (
    Model,
    PassFailed,
    build,
    fake_tensor_limit,
    largest_fitting,
    largest_from_timelines,
    run_pass,
    tensor_mode,
    thaw,
    to_dtype,
)
from phasetune.plan.states import StatePlanner


def plan_memory(
    schedule: Any,
    model: Any,
    *,
    inputs: Callable[[int, int], Any] | str | None = None,
    loss: Callable[[Any], torch.Tensor] | str | None = None,
    setup: PlanSetup | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    **settings: Any,
) -> MemoryPlan:
    """Plan the memory of each phase of ``schedule`` for ``model`` (see :class:`PlanSetup` for ``settings``).

    ``schedule``: a YAML path or dict as a run takes it (None: phasetune's generated default). ``model``: a
    Hugging Face config directory or ``config.json``, a ``PretrainedConfig``, ``"module:factory"`` or a
    callable, called with ``model_kwargs`` (for a config: fields that replace the config's; see
    :func:`phasetune.plan.model_source.model_source`). Raises
    :class:`~phasetune.errors.ConfigurationError` (settings, model) or :class:`~phasetune.errors.ScheduleError`
    listing every problem before any simulation. ``progress`` is called with one line per finished stage (the
    model built and sharded, each phase, each phase planned again with checkpointing): an 8B model takes minutes.
    """
    problems: list[str] = []
    try:
        setup = _setup(setup, settings)
    except ConfigurationError as e:  # the model's problems too, then all at once
        problems, setup = e.problems, PlanSetup()
    try:
        source = model_source(model, inputs=inputs, loss=loss, name_prefix=str(settings.get("name_prefix", setup.name_prefix)),
                              model_kwargs=model_kwargs)
        if schedule is not None:
            source = with_adapters(source, schedule)  # LoRA adapters a peft section asks for, as a run injects them
    except ConfigurationError as e:
        problems += e.problems
    if problems:
        raise ConfigurationError(problems)
    start = time.perf_counter()
    with fake_world(setup.world_size) as mesh, tensor_mode(setup):
        plan = _Planner(source, setup, mesh, schedule, progress).run()
    plan.seconds = time.perf_counter() - start
    plan.schedule = ("the generated default" if schedule is None else
                     str(schedule) if isinstance(schedule, (str, os.PathLike)) else f"a {type(schedule).__name__}")
    return plan


def plan_memory_isolated(schedule: Any, model: Any, **kwargs: Any) -> MemoryPlan:
    """:func:`plan_memory` in a fresh Python process, for a process that already has a process group (the fake
    group of a plan cannot sit beside it) or that must not hold the simulation's memory afterwards.

    Arguments travel by pickling: name the model by path or ``"module:factory"`` (or a module-level function),
    not a lambda. Errors come back as they were raised. The child is a plain interpreter given this process's
    ``sys.path``: unlike ``multiprocessing``'s spawn it does not import the caller's ``__main__``, so a training
    script without an ``if __name__ == "__main__":`` guard is not started again.
    """
    import pickle
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="phasetune-plan-") as folder:
        given, result = os.path.join(folder, "given.pkl"), os.path.join(folder, "result.pkl")
        with open(given, "wb") as f:
            pickle.dump(list(sys.path), f)
            pickle.dump((schedule, model, kwargs), f)
        code = "from phasetune.plan.planner import _isolated_child; _isolated_child()"
        done = subprocess.run([sys.executable, "-c", code, given, result], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if not os.path.exists(result):
            raise RuntimeError(f"the memory plan's process ended without a result (exit status {done.returncode}):\n"
                               f"{done.stderr[-4000:]}")
        with open(result, "rb") as f:
            ok, value = pickle.load(f)
    if not ok:
        raise value
    return value


def _isolated_child() -> None:
    """The child of :func:`plan_memory_isolated`: ``argv[1]`` holds the caller's ``sys.path`` and the call,
    ``argv[2]`` gets ``(True, plan)`` or ``(False, the exception)``."""
    import pickle
    import sys

    given, result = sys.argv[1], sys.argv[2]
    with open(given, "rb") as f:
        sys.path[:] = pickle.load(f)
        try:
            schedule, model, kwargs = pickle.load(f)
            out: tuple[bool, Any] = (True, plan_memory(schedule, model, **kwargs))
        except Exception as e:
            out = (False, e)
    try:
        data = pickle.dumps(out)
    except Exception:  # an exception that does not pickle: its type and message
        data = pickle.dumps((False, RuntimeError(f"{type(out[1]).__name__}: {out[1]}")))
    with open(result, "wb") as f:
        f.write(data)


def _setup(setup: PlanSetup | None, settings: Mapping[str, Any]) -> PlanSetup:
    known = [f.name for f in fields(PlanSetup)]
    unknown = [k for k in settings if k not in known]
    if unknown:
        raise ConfigurationError([
            f"plan_memory has no setting {k!r}" + (f"; did you mean {', '.join(map(repr, close))}?"
                                                   if (close := difflib.get_close_matches(k, known, n=2)) else "")
            for k in unknown
        ])
    settings = dict(settings)
    if isinstance(settings.get("block_classes"), list):
        settings["block_classes"] = tuple(settings["block_classes"])
    setup = replace(setup, **settings) if setup is not None else PlanSetup(**settings)
    problems = setup.problems()
    if problems:
        raise ConfigurationError(problems)
    return setup


class _Planner:
    def __init__(self, source: ModelSource, setup: PlanSetup, mesh: Any, schedule: Any,
                 progress: Callable[[str], None] | None = None) -> None:
        self.source, self.setup, self.mesh, self.raw_schedule = source, setup, mesh, schedule
        self.progress = progress or (lambda line: None)
        self.notes: list[str] = []
        self.failure: PassFailed | None = None
        self.prefix_ends: dict[int, str | None] = {}
        self.numels: dict[str, int] = {}

    # -------------------------------------------------------------------------------------------- schedule
    def _prepare(self, model: nn.Module) -> set[str]:
        """Resolve the schedule on the unsharded model; note each phase's prefix-cache boundary."""
        from phasetune.core.generate import generate_schedule
        from phasetune.core.schedule import resolve_schedule
        from phasetune.sharding.names import logical_name

        named = [(logical_name(n), p) for n, p in model.named_parameters()]
        self.numels = {n: p.numel() for n, p in named}
        raw = self.raw_schedule if self.raw_schedule is not None else generate_schedule(model)
        if self.raw_schedule is None:
            self.notes.append(f"no schedule given: planned phasetune's generated default ({len(raw)} phases)")
        self.schedule = resolve_schedule(raw, {n: tuple(p.shape) for n, p in named})
        for k, phase in enumerate(self.schedule):
            self.prefix_ends[k] = self._prefix_end(model, k, phase.prefix_cache)
        return set(self.schedule[0].params)

    def _prefix_end(self, model: nn.Module, k: int, setting: Mapping[str, Any] | None) -> str | None:
        if setting is None:
            return None
        if setting.get("prefix_end"):
            return str(setting["prefix_end"])
        from phasetune.features.prefix_cache.cache import PrefixCacheError, find_prefix_end

        try:
            return find_prefix_end(model, self.schedule.params_through(k))
        except PrefixCacheError as e:
            self.notes.append(f"phase {k}: no prefix cache planned ({e})")
            return None

    # -------------------------------------------------------------------------------------------- phases
    def run(self) -> MemoryPlan:
        setup = self.setup
        try:
            sim = build(self.source, setup, self.mesh, self._prepare)
        except Exception as e:
            if isinstance(e, PhasetuneError) or setup.tensors == "real" or not fake_tensor_limit(e):
                raise
            self.failure = PassFailed("(building and sharding the model)", e)  # shapes only, from the meta device
            sim = self._shapes_only()
        units = f", {len(sim.sharding.units)} units" if sim.sharding.units else ""
        self.progress(f"built {sim.label} as rank 0 of {setup.world_size} ({setup.strategy}{units}); "
                      f"{len(self.schedule)} phases to plan")
        strategy = setup.strategy if sim.sharding.units or setup.strategy != "fsdp1" else "fsdp2"
        states = StatePlanner(sim.shapes, strategy, setup.world_size,
                              fsdp1_root=sim.runner if strategy == "fsdp1" else None)
        total = sum(self.numels.values())
        phases = [self._phase(sim, states, k, total) for k in range(len(self.schedule))]
        budget = setup.budget
        if budget is not None and not setup.act_ckpt and self.failure is None and sim.blocks:
            self._with_act_ckpt([p for p in phases if p.fits is False], states)
        if self.failure is not None:
            self.notes.append(
                f"{sim.label} did not run under fake tensors (stopped in {self.failure.module or '<root>'}: "
                f"{type(self.failure.error).__name__}: {str(self.failure.error).splitlines()[0][:200]}); the phases "
                "marked 'analytic' count model states only (parameters, gradients, optimizer and its step), without "
                "activations or gathered parameters, so their peaks are lower bounds"
            )
        if setup.strategy == "ddp":
            self.notes.append("DDP: forward/backward simulated on the unwrapped model; the reducer's gradient buckets "
                              "(one copy of the trainable gradients, gradient_as_bucket_view=False) are added")
        if setup.strategy == "fsdp1":
            self.notes.append("FSDP1: each transformer block one unit (use_orig_params=True); model states read from "
                              "FSDP1's flat parameters of rank 0")
        plan = MemoryPlan(setup, f"{sim.label} from {self.source.description}", total, phases, budget, notes=self.notes,
                          units=list(sim.sharding.units))
        plan.advice = advise(plan, sim.blocks, self.schedule)
        return plan

    def _shapes_only(self) -> Model:
        """The model on the meta device, unsharded: enough for the schedule and the model states from shapes."""
        from phasetune.core.generate import find_blocks
        from phasetune.sharding.names import logical_name

        try:
            with torch.device("meta"):
                model = self.source.build()
        except Exception as e:
            raise ConfigurationError(f"cannot build {self.source.description} even on the meta device: "
                                     f"{type(e).__name__}: {e}") from e
        to_dtype(model, self.setup.dtype)
        self._prepare(model)
        if self.setup.strategy == "fsdp1":
            self.notes.append("FSDP1 model states approximated by FSDP2's per-parameter sharding (the model could not "
                              "be wrapped to read its flat parameters)")
        shapes = {logical_name(n): (tuple(p.shape), p.dtype) for n, p in model.named_parameters()}
        params = {logical_name(n): p for n, p in model.named_parameters()}
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        return Model(model, params, shapes, Sharding(), buffers, find_blocks(model), type(getattr(model, "held", model)).__name__)

    def _optimizer(self, k: int) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        """The optimizer phase ``k`` steps with: the setup's, or the last ``new_optimizer`` up to ``k``."""
        from phasetune.core.specs import import_class

        cls, kwargs = self.setup.optimizer_class, self.setup.optimizer_args()
        for j in range(k + 1):
            spec = self.schedule[j].new_optimizer
            if spec is not None:
                cls = import_class(spec.class_path, (torch.optim.Optimizer,))
                kwargs = {"lr": 1e-4, **dict(spec.init_args)}
        return cls, kwargs

    def _phase(self, sim: Model, states: StatePlanner, k: int, total: int) -> PhaseMemory:
        setup = self.setup
        names = self.schedule.params_through(k)
        per_phase = [list(self.schedule[j].params) for j in range(k + 1)]
        thaw(sim, set(names))
        cls, kwargs = self._optimizer(k)
        ranks = [states.states(per_phase, cls, kwargs, r) for r in states.ranks()]
        r0 = ranks[0]
        off = setup.cpu_offload
        params, grads, optim = (0, 0, 0) if off else (r0.params, r0.grads, r0.optimizer)
        step_peak = sim.buffers if off else r0.params + sim.buffers + r0.grads + r0.optimizer + r0.step_temporaries + r0.buckets
        fixed = optim + r0.buckets  # held through forward and backward, not seen by the tracker
        trainable = sum(self.numels[n] for n in names)
        lowest = next((b for b in sim.blocks if any(n.startswith(b + ".") for n in names)), None)
        snapshot_params = sum(states.shard(n, 0).nbytes for n in names)
        phase = PhaseMemory(
            phase=k, trainable=trainable, trainable_fraction=trainable / max(total, 1), lowest_trainable_block=lowest,
            params=params, grads=grads, optimizer=optim, step_temporaries=0 if off else r0.step_temporaries,
            step_peak=step_peak, ranks=[r.to_dict() for r in ranks],
        )
        phase.host = HostMemory(
            offload=r0.params + r0.grads + r0.optimizer if off else 0,
            # restore-best keeps none in the final phase: no transition follows that would restore it
            snapshot=snapshot_params + r0.optimizer + sim.buffers
            if setup.snapshot_storage == "memory" and k < len(self.schedule) - 1 else 0,
        )
        if self.failure is None:
            try:
                self._simulate(sim, phase, fixed)
            except PassFailed as e:
                if setup.tensors == "real" or not fake_tensor_limit(e.error):
                    raise ConfigurationError(
                        f"phase {k}: the simulated training step failed in {e.module or 'the model'}: "
                        f"{type(e.error).__name__}: {str(e.error).splitlines()[0] if str(e.error) else ''}; a run with "
                        "these settings fails the same way"
                    ) from e.error
                self.failure = e
        if self.failure is not None:
            phase.source = ANALYTIC
            phase.forward_backward_peak = params + sim.buffers + grads + fixed
            phase.peak_at = "model states only"
        if phase.step_peak > phase.forward_backward_peak:
            phase.peak, phase.peak_at = phase.step_peak, "optimizer step"
        else:
            phase.peak = phase.forward_backward_peak
        if setup.budget is not None:
            phase.headroom = setup.budget - phase.peak
        self.progress(f"phase {k} planned ({k + 1} of {len(self.schedule)}, {phase.source})")
        return phase

    def _simulate(self, sim: Model, phase: PhaseMemory, fixed: int) -> None:
        setup, k = self.setup, phase.phase
        prefix_end = self.prefix_ends.get(k)
        first = run_pass(sim, self.source, setup, setup.micro_batch, prefix_end)
        cats = first.peak.categories
        phase.params_unsharded = cats.get("params_unsharded", 0)
        phase.activations = sum(cats.get(c, 0) for c in ("activations", "temporaries", "inputs"))
        phase.collectives = cats.get("collectives", 0) + (fixed - phase.optimizer)
        phase.breakdown = {**cats, "optimizer": phase.optimizer, "ddp_buckets": fixed - phase.optimizer}
        phase.forward_backward_peak = first.peak.total + fixed
        phase.peak_at = first.peak.where
        if prefix_end and first.prefix_output:
            per = first.prefix_output // setup.micro_batch
            limit = int((self.schedule[k].prefix_cache or {}).get("limit_mb", _default_limit_mb())) << 20
            phase.host.prefix_cache_per_sample = per
            phase.host.prefix_cache = min(limit, per * setup.dataset_size) if setup.dataset_size else limit
        phase.accumulated_grads = first.kept_grads
        budget = setup.budget
        if budget is None or not setup.search_micro_batch:
            return
        if phase.step_peak > budget:
            phase.max_micro_batch = 0
            return
        # two passes at sizes >= 2, after the phase's first one (the first pass after a thaw runs a few more
        # operators, so it does not line up with later ones; at size 1 some copies are views, off the line)
        cap = setup.max_micro_batch
        b0 = setup.micro_batch
        sizes = (b0, 2 * b0) if b0 >= 2 else (2, 4)
        if sizes[1] > cap:
            return
        lo, hi = (run_pass(sim, self.source, setup, b) for b in sizes)
        known = {b: r.peak.total + fixed for b, r in ((b0, first), (sizes[0], lo), (sizes[1], hi))}
        phase.per_sample = max(0, (hi.peak.total - lo.peak.total) // (sizes[1] - sizes[0]))
        best = largest_from_timelines(lo, hi, budget - fixed, cap)
        if best is not None and best < sizes[0]:  # the line starts at 2: below it, run the sizes
            for b in range(sizes[0] - 1, 0, -1):
                if b not in known:
                    known[b] = run_pass(sim, self.source, setup, b).peak.total + fixed
            best = max((b for b, v in known.items() if b < sizes[0] and v <= budget), default=0)
        if best is None:  # the passes ran different operators: search with bounds instead

            def peak_at(b: int) -> int:
                return run_pass(sim, self.source, setup, b).peak.total + fixed

            best, _ = largest_fitting(peak_at, budget, known, cap)
            self.notes.append(f"phase {k}: passes at micro-batch {sizes[0]} and {sizes[1]} ran different operators; the "
                              "largest micro-batch was searched with bounded passes")
        if known[b0] > budget:  # the phase's first pass after its thaw decides for the planned size
            best = min(best, b0 - 1)
        phase.max_micro_batch = best

    def _with_act_ckpt(self, failing: list[PhaseMemory], states: StatePlanner) -> None:
        """Peaks of the failing phases with every block checkpointed (a second model, same fake world)."""
        if not failing:
            return
        setup = replace(self.setup, act_ckpt=True)
        try:
            sim = build(self.source, setup, self.mesh, lambda m: set(self.schedule[0].params))
        except ConfigurationError:
            return
        for phase in failing:
            self.progress(f"phase {phase.phase} does not fit: planning it again with every block checkpointed")
            thaw(sim, set(self.schedule.params_through(phase.phase)))
            fixed = phase.optimizer + phase.breakdown.get("ddp_buckets", 0)
            try:
                peak = run_pass(sim, self.source, setup, setup.micro_batch).peak.total + fixed
            except PassFailed:
                return
            phase.act_ckpt_peak = max(peak, phase.step_peak)


def _default_limit_mb() -> int:
    from phasetune.features.prefix_cache.phases import DEFAULT_LIMIT_MB

    return DEFAULT_LIMIT_MB


__all__ = ["plan_memory", "plan_memory_isolated"]
