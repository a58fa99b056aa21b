"""LoRA adapters in a run: the schedule's ``peft`` section and ``merge_lora`` keys, wired into every front end.

A front end calls :func:`inject_adapters` on the model before it shards it, wraps it or collects its parameters
(one call); the :class:`~phasetune.run.PhaseRun` built afterwards finds the adapters and holds a
:class:`LoraRun`, which

- checks every LoRA key against the injected model before compute (a ``merge_lora`` naming no adapter, a run
  built before the adapters were injected, mixed trainable dtypes in an FSDP2 unit), raised with the schedule's
  own problems in one :class:`~phasetune.errors.ScheduleError`;
- merges at a transition (restore best -> ``merge_lora`` -> out of the optimizer -> recorded -> the next phase
  thaws; a restarted adapter joins as a new group with the phase's lr and lr scheduler);
- saves the merge record with the run's state and, on resume, checks it and replays each merge's bookkeeping
  without touching a weight (the checkpoint already holds the merged ones; peft's merged flag is never used).

The Hugging Face Trainer saves only the adapter of a ``PeftModel``: :func:`base_weights_state` /
:func:`load_base_weights` carry the base weights a run changed (trained or merged into) in phasetune's state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer

from phasetune.core import param_groups as pg
from phasetune.core.schedule import resolve_schedule
from phasetune.core.schedule_validation import load_schedule_source
from phasetune.errors import ConfigurationError, ScheduleError
from phasetune.lora import (
    MergeRecord,
    MergeResult,
    MergeSpec,
    adapter_params,
    adapter_targets,
    check_merge_record,
    fsdp2_units,
    lora_layers,
    merge_lora,
    parse_merge_lora,
    parse_peft_section,
    plan_units,
    remove_from_optimizer,
    replay_merge,
    trainable_by_phase,
    unit_dtype_problems,
)
from phasetune.lora.from_schedule import (  # re-exported: the run's LoRA names stay where front ends found them
    HOW_TO_INJECT,
    INJECTION_SEED,
    asks_for_lora,
    inject_adapters,
    merge_plan,
    phase_entries,
)
from phasetune.util.text import few

if TYPE_CHECKING:
    from phasetune.core.engine import Transition
    from phasetune.run.phase_run import PhaseRun

def check_injected(model: nn.Module | None, source: Any) -> None:
    """Before a run resolves its schedule: raise when the schedule trains adapters ``model`` does not have yet (the
    front end collected the parameters before :func:`inject_adapters`), rather than "matches no parameter"."""
    if model is None or source is None:
        return
    raw, desc, problems = load_schedule_source(source)
    if problems or not asks_for_lora(raw):
        return
    spec, problems = parse_peft_section(raw.get("peft"))
    modules, _ = adapter_targets(_unwrapped(model), spec, phase_entries(raw)[0])
    if modules and not problems:
        raise ScheduleError([f"the schedule trains LoRA adapters of {few(modules)}, which the model does not have: the "
                             f"run was built before they were injected; {HOW_TO_INJECT}"], desc)


def sharding_problems(model: nn.Module, schedule: Any, units: Sequence[str]) -> list[str] | None:
    """Before ``fully_shard``: inject the adapters ``schedule`` asks for (:func:`inject_adapters`), then the FSDP2
    units (``units``: module names, the root takes the rest) that would train two dtypes at once in some phase, one
    problem per unit. None when the schedule has no LoRA keys (the strategy's own dtype check applies)."""
    if schedule is None:
        return None
    raw, _, problems = load_schedule_source(schedule)
    if problems or not asks_for_lora(raw):
        return None
    inject_adapters(model, schedule)
    resolved = resolve_schedule(raw, [n for n, _ in model.named_parameters()])
    spec, _ = parse_peft_section(resolved.peft)
    merges = {p.index: parse_merge_lora(p.merge_lora, p.index, []) for p in resolved if p.merge_lora not in (None, False)}
    lora = LoraRun(model, spec.adapter_name if spec is not None else "default", merge_plan(model, spec, merges)[0])
    trainable = trainable_by_phase([list(p.params) for p in resolved], lora.frozen_by_merge())
    return unit_dtype_problems(model, plan_units(model, [u for u in units if u]), trainable)


@dataclass
class LoraRun:
    """The LoRA side of one :class:`~phasetune.run.PhaseRun` (its ``lora`` attribute)."""

    model: nn.Module
    adapter: str
    merges: dict[int, tuple[MergeSpec, list[str]]]
    record: MergeRecord = field(default_factory=MergeRecord)

    @classmethod
    def build(cls, run: PhaseRun, model: nn.Module | None) -> LoraRun | None:
        """The run's LoRA side (None when the schedule has no LoRA keys), its problems raised once."""
        schedule = run.schedule
        raw: dict[Any, Any] = {p.index: {"params": list(p.patterns), "merge_lora": p.merge_lora} for p in schedule}
        if schedule.peft is not None:
            raw["peft"] = schedule.peft
        if not asks_for_lora(raw):
            return None
        if model is None:
            raise ConfigurationError("the schedule has LoRA keys (peft or merge_lora) but the run was given no model")
        model = _unwrapped(model)
        spec, problems = parse_peft_section(schedule.peft)
        entries = {p.index: list(p.patterns) for p in schedule}
        merges = {p.index: parse_merge_lora(p.merge_lora, p.index, problems) for p in schedule
                  if p.merge_lora not in (None, False)}
        problems += adapter_targets(model, spec, entries)[1]  # check_injected found missing adapters already
        plan, found = merge_plan(model, spec, merges)
        problems += found
        lora = cls(model, spec.adapter_name if spec is not None else "default", plan)
        if not problems and fsdp2_units(model):
            problems += lora.unit_problems(run)
        if problems:
            raise ScheduleError(problems, schedule.source)
        return lora

    # ------------------------------------------------------------------ checks
    def frozen_by_merge(self) -> dict[int, list[str]]:
        """The adapter parameters each merging phase freezes for good (a restart trains them again)."""
        return {k: [] if m.reinit else [n for mod in mods for n in adapter_params(self.model, mod, self.adapter).adapter_names()]
                for k, (m, mods) in self.merges.items()}

    def unit_problems(self, run: PhaseRun, units: Mapping[str, Sequence[str]] | None = None) -> list[str]:
        """FSDP2 units (``units``, default: the model's) that would train two dtypes at once in some phase."""
        phases = [list(p.params) for p in run.schedule.phases[: run.final_depth + 1]]
        trainable = trainable_by_phase(phases, self.frozen_by_merge())
        return unit_dtype_problems(self.model, units if units is not None else fsdp2_units(self.model), trainable)

    # ------------------------------------------------------------------ transitions
    def before_advance(self, run: PhaseRun, k: int, optimizer: Optimizer) -> MergeResult | None:
        """At the transition into phase ``k``, after restore-best: fold the adapters the phase merges into their
        base weights, take them out of the optimizer (their moments too) and record the merge."""
        if k not in self.merges:
            return None
        spec, modules = self.merges[k]
        seed = k if spec.seed is None else spec.seed
        generator = torch.Generator().manual_seed(seed) if spec.reinit else None
        result = merge_lora(self.model, modules, self.adapter, reinit=generator)
        self._retire(run, result, optimizer)
        self.record.add(k, result, seed)
        run.env.info(f"phase {k}: merged LoRA adapter {self.adapter!r} of {len(modules)} modules into their base "
                     f"weights{' and restarted it' if spec.reinit else ''}")
        return result

    def _retire(self, run: PhaseRun, result: MergeResult, optimizer: Optimizer) -> None:
        remove_from_optimizer(optimizer, result.parameters)
        if not result.reinit:
            run.engine.retired.update(n for n in result.frozen if n in run.engine.params)

    def after_advance(self, run: PhaseRun, result: MergeResult | None, t: Transition, schedulers: Sequence[Any]) -> None:
        """A restarted adapter trains again from the phase just entered: thawed, in new groups at the phase's lr
        (extended into its lr scheduler like the phase's own groups); named among the thawed for the audit."""
        if result is None or not result.reinit:
            return
        engine = run.engine
        names = [n for n in result.frozen if n in engine.params]
        for n in names:
            engine.params[n].requires_grad_(True)
        groups = pg.phase_groups(t.depth, names, engine.params, engine.lr_for(t.depth), engine.layout, engine.no_decay)
        if engine.group_splitter is not None:
            groups = engine.group_splitter(groups)
        scheds = [t.new_scheduler] if t.new_scheduler is not None else [] if t.new_optimizer else list(schedulers)
        pg.add_groups(t.optimizer, groups, scheds, engine.apply_lambdas_new_pgs)
        t.thawed = [*t.thawed, *names]
        t.groups_added += len(groups)

    # ------------------------------------------------------------------ checkpoint state
    def state(self) -> list[dict[str, Any]]:
        return self.record.to_state()

    def resume(self, run: PhaseRun, saved: Sequence[Mapping[str, Any]] | None, depth: int, where: str) -> None:
        """Check a checkpoint's merge record against the schedule and the loaded weights (nothing is re-applied)."""
        record = MergeRecord.from_state(saved)
        planned = {k: modules for k, (_, modules) in self.merges.items() if k <= run.final_depth}
        problems = check_merge_record(self.model, record, planned, depth)
        if problems:
            raise ConfigurationError([f"cannot resume{where}: {p}" for p in problems])
        self.record = record

    def replay(self, run: PhaseRun, depth: int, optimizer: Optimizer, schedulers: Sequence[Any]
               ) -> tuple[Optimizer, list[Any], dict[str, Any] | None]:
        """:meth:`PhaseEngine.replay` with each recorded merge's bookkeeping at its transition (adapters frozen and
        out of the optimizer, a restart's new group), so the optimizer's groups are those the run saved."""
        scheds, cfg = list(schedulers), None
        entries = {e.phase: e for e in self.record.entries}
        while run.engine.depth < depth:
            k = run.engine.depth + 1
            result = replay_merge(self.model, entries[k]) if k in entries else None
            if result is not None:
                self._retire(run, result, optimizer)
            t = run.engine.advance(optimizer, scheds)
            self.after_advance(run, result, t, scheds)
            optimizer = t.optimizer
            if t.new_scheduler is not None:
                scheds, cfg = [t.new_scheduler], t.scheduler_cfg
        return optimizer, scheds, cfg


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module a DDP wrapper holds (its names are the schedule's), else ``model``."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------- base weights


def changed_base_weights(run: PhaseRun) -> list[str]:
    """Names of the non-adapter parameters the run has changed so far: those it trained (phases 0..depth) and the
    base weights (and biases) merges folded deltas into."""
    lora: LoraRun | None = getattr(run, "lora", None)
    names = [n for n in run.schedule.params_through(run.depth) if ".lora_" not in n]
    if lora is not None:
        for entry in lora.record.entries:
            for module in entry.modules:
                if module in lora_layers(lora.model, entry.adapter):
                    ap = adapter_params(lora.model, module, entry.adapter)
                    names += [ap.base_weight] + ([ap.base_bias] if ap.base_bias else [])
    return list(dict.fromkeys(names))


def base_weights_state(run: PhaseRun) -> dict[str, torch.Tensor]:
    """The base weights :func:`changed_base_weights` names, as CPU copies (this rank's part of a sharded one): put
    them in phasetune's state where the front end's checkpoint keeps only the adapters (the Hugging Face Trainer
    saving a ``PeftModel``)."""
    params = run.engine.params
    return {n: _local(params[n]).detach().to("cpu", copy=True) for n in changed_base_weights(run) if n in params}


def load_base_weights(run: PhaseRun, state: Mapping[str, torch.Tensor]) -> None:
    """Copy :func:`base_weights_state`'s tensors back into the run's parameters (before the run resumes)."""
    params = run.engine.params
    unknown = [n for n in state if n not in params]
    if unknown:
        raise ConfigurationError(f"the saved base weights name {unknown[0]!r}, which the model does not have; resume "
                                 "with the model and schedule the checkpoint was written with")
    with torch.no_grad():
        for n, t in state.items():
            _local(params[n]).copy_(t)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


__all__ = ["HOW_TO_INJECT", "INJECTION_SEED", "LoraRun", "asks_for_lora", "base_weights_state", "changed_base_weights",
           "check_injected", "inject_adapters", "load_base_weights", "sharding_problems"]
