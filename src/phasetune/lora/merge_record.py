"""The merges a run has made, kept in phasetune's checkpoint state as plain data.

A resume never merges again: the checkpoint's weights already hold the folded deltas (and ``B = 0``). The
record says which adapters must stay frozen, :func:`replay_merge` redoes a merge's bookkeeping (frozen
adapters out of the optimizer) without touching a weight, and :func:`check_merge_record` checks that the
checkpoint, the schedule and the record agree before training goes on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from phasetune.lora.layers import adapter_params, lora_layers
from phasetune.lora.merge import MergeResult, whole
from phasetune.util.text import few


@dataclass(frozen=True)
class MergeEntry:
    """One ``merge_lora`` transition: into ``phase``, ``adapter`` of ``modules``, restarted when ``reinit``."""

    phase: int
    adapter: str
    modules: tuple[str, ...]
    reinit: bool = False
    seed: int | None = None


@dataclass
class MergeRecord:
    """Every merge so far, in order; ``to_state()`` is JSON-able, ``from_state`` reads it back."""

    entries: list[MergeEntry] = field(default_factory=list)

    def add(self, phase: int, result: MergeResult, seed: int | None = None) -> MergeEntry:
        entry = MergeEntry(phase, result.adapter, result.modules, result.reinit, seed if result.reinit else None)
        self.entries.append(entry)
        return entry

    def to_state(self) -> list[dict[str, Any]]:
        return [{"phase": e.phase, "adapter": e.adapter, "modules": list(e.modules), "reinit": e.reinit,
                 "seed": e.seed} for e in self.entries]

    @classmethod
    def from_state(cls, state: Sequence[Mapping[str, Any]] | None) -> MergeRecord:
        return cls([MergeEntry(int(s["phase"]), str(s["adapter"]), tuple(s["modules"]), bool(s.get("reinit", False)),
                               s.get("seed")) for s in state or ()])

    def last_merges(self) -> dict[tuple[str, str], MergeEntry]:
        """The latest entry for each (module, adapter)."""
        out: dict[tuple[str, str], MergeEntry] = {}
        for e in self.entries:
            for m in e.modules:
                out[(m, e.adapter)] = e
        return out

    def frozen_names(self, model: nn.Module) -> set[str]:
        """Adapter parameter names that stay frozen for the rest of the run: those whose latest merge did not
        restart them. A resume must not thaw them again, though an earlier phase names them."""
        return {n for (m, adapter), e in self.last_merges().items() if not e.reinit
                for n in adapter_params(model, m, adapter).adapter_names()}


def replay_merge(model: nn.Module, entry: MergeEntry) -> MergeResult:
    """A recorded merge replayed on resume without touching a weight (the checkpoint holds the merged ones): its
    adapters are frozen and returned, so the caller takes them out of the optimizer the replay rebuilt (and,
    for a restart, gives them the new phase's group again), as at the original transition."""
    layers = lora_layers(model, entry.adapter)
    frozen: list[str] = []
    params: list[nn.Parameter] = []
    for module in entry.modules:
        if module not in layers:
            continue  # check_merge_record names it
        for name in adapter_params(model, module, entry.adapter).adapter_names():
            p = model.get_parameter(name)
            p.requires_grad_(False)
            p.grad = None
            frozen.append(name)
            params.append(p)
    return MergeResult(entry.adapter, entry.modules, tuple(frozen), tuple(params), entry.reinit)


def check_merge_record(model: nn.Module, record: MergeRecord, planned: Mapping[int, Sequence[str]],
                       phase: int) -> list[str]:
    """Problems that make a resume in ``phase`` from this checkpoint inexact (nothing is re-applied).

    ``planned``: the modules the schedule merges at the transition into each phase (resolved with
    :func:`~phasetune.lora.merge.merge_targets`). Checks that the record holds exactly the planned merges
    up to ``phase``, that each merged module still has its adapter, and that every adapter merged without a
    restart has ``B == 0`` in the loaded weights (else the checkpoint predates the merge, or peft's
    ``merge()`` made it, and the delta would count twice). Reading a sharded ``B`` is a collective: call it
    on every rank.
    """
    problems: list[str] = []
    done = {e.phase: e for e in record.entries}
    for e in record.entries:
        if e.phase > phase:
            problems.append(f"merge record: a merge at the transition into phase {e.phase}, but the checkpoint "
                            f"resumes in phase {phase}; the record and the checkpoint come from different runs")
    for k in sorted(p for p in planned if 0 < p <= phase):
        if k not in done:
            problems.append(f"phase {k}, key 'merge_lora': the checkpoint is past this merge (phase {phase}) but "
                            "phasetune's state records none; it was written under another schedule: resume "
                            "with that schedule or start over")
        elif tuple(planned[k]) != done[k].modules:
            problems.append(f"phase {k}, key 'merge_lora': the schedule merges {few(list(planned[k]))} but the "
                            f"checkpoint merged {few(list(done[k].modules))}; resume with the schedule it was "
                            "written under")
    for k in sorted(done):
        if k not in planned and k <= phase:
            problems.append(f"phase {k}: the checkpoint merged LoRA adapters at this transition "
                            f"({few(list(done[k].modules))}) but the schedule has no merge_lora there")
    layers = {a: lora_layers(model, a) for a in {e.adapter for e in record.entries}}
    for (module, name), e in record.last_merges().items():
        if module not in layers[name]:
            problems.append(f"module '{module}': merged at phase {e.phase} but the model has no LoRA adapter "
                            f"{name!r} there; inject the same adapters as the run that wrote the checkpoint")
            continue
        if e.reinit:
            continue
        b = layers[name][module].lora_B[name].weight
        if bool(whole(b).detach().ne(0).any()):
            problems.append(f"parameter '{adapter_params(model, module, name).B}' is not zero though the adapter "
                            f"was merged into its base weight at phase {e.phase}: the checkpoint's weights are from "
                            "before that merge (or from peft's merge()), and its delta would count twice")
    return problems
