"""Fine-tuning schedules: the resolved model (:class:`Schedule`, :class:`Phase`), fingerprints, dump.

A schedule is a mapping of phase index to phase settings, written in YAML or given as a dict::

    0:
      params: [model.classifier.*]        # exact names or regular expressions (whole-name match)
      max_transition_epoch: 1              # optional; -1 (default): early stopping decides
      max_transition_step: 500             # optional: ends after 500 optimizer steps of the fit, if sooner
    1:
      params: [model.encoder.layer.11.*]
      lr: 1.0e-5                           # optional; default: the callback's base_max_lr
      prefix_cache: true                   # optional: cache the frozen prefix's outputs (phasetune.features.prefix_cache.phases)

Phase k trains the parameters of phases 0..k. :func:`resolve_schedule` reads and checks a schedule (the
checks live in :mod:`phasetune.core.schedule_validation`) and raises one :class:`~phasetune.errors.ScheduleError`
that names the phase and key of every problem.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from phasetune.core import specs
from phasetune.core.schedule_validation import check_phases, load_schedule_source
from phasetune.errors import ScheduleError
from phasetune.util.files import atomic_write_text
from phasetune.util.text import few


@dataclass(frozen=True)
class Phase:
    """One resolved phase: the parameters it thaws (exact names) and how it trains and ends."""

    index: int
    params: tuple[str, ...]
    lr: float | None = None
    max_transition_epoch: int = -1
    max_transition_step: int = -1
    new_optimizer: specs.ClassSpec | None = None
    new_lr_scheduler: specs.LRSchedulerSpec | None = None
    patterns: tuple[str, ...] = ()
    #: the frozen-prefix cache for this phase: None (off) or the ``prefix_cache`` sub-keys given ({}: defaults);
    #: not in the resume fingerprint, since it does not change what trains
    prefix_cache: dict[str, Any] | None = field(default=None, hash=False)
    #: ``merge_lora`` as written (None: no merge at the transition into this phase); checked and applied by the
    #: run (:mod:`phasetune.run.lora_glue`), in the resume fingerprint
    merge_lora: Any = field(default=None, hash=False)

    def to_dict(self, resolved: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"params": list(self.params if resolved else self.patterns)}
        if self.lr is not None:
            out["lr"] = self.lr
        if self.max_transition_epoch >= 0:
            out["max_transition_epoch"] = self.max_transition_epoch
        if self.max_transition_step >= 0:
            out["max_transition_step"] = self.max_transition_step
        if self.new_optimizer is not None:
            out["new_optimizer"] = {"optimizer_init": self.new_optimizer.to_dict()}
        if self.new_lr_scheduler is not None:
            out["new_lr_scheduler"] = self.new_lr_scheduler.to_dict()
        if self.prefix_cache is not None:
            out["prefix_cache"] = dict(self.prefix_cache) if self.prefix_cache else True
        if self.merge_lora is not None:
            out["merge_lora"] = self.merge_lora
        return out


@dataclass(frozen=True)
class Schedule:
    """A validated schedule whose ``params`` are exact parameter names of one model."""

    phases: tuple[Phase, ...]
    unscheduled: tuple[str, ...] = ()
    source: str = "<dict>"
    warnings: tuple[str, ...] = ()
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict, compare=False)
    #: the ``peft`` section as written (None: none); checked and applied by the run (:mod:`phasetune.run.lora_glue`)
    peft: Mapping[str, Any] | None = field(default=None, hash=False)

    def __len__(self) -> int:
        return len(self.phases)

    def __getitem__(self, index: int) -> Phase:
        return self.phases[index]

    def __iter__(self):
        return iter(self.phases)

    @property
    def scheduled_params(self) -> tuple[str, ...]:
        return tuple(n for p in self.phases for n in p.params)

    def params_through(self, depth: int) -> list[str]:
        """Names trainable at ``depth`` (phases 0..depth)."""
        return [n for p in self.phases[: depth + 1] for n in p.params]

    def to_dict(self, resolved: bool = True) -> dict[Any, Any]:
        """The schedule as a file writes it: the ``peft`` section (if any), then phase index -> settings."""
        out: dict[Any, Any] = {"peft": self.peft} if self.peft is not None else {}
        out.update({p.index: p.to_dict(resolved) for p in self.phases})
        return out

    def to_yaml(self, resolved: bool = True) -> str:
        return yaml.safe_dump(self.to_dict(resolved), sort_keys=False, default_flow_style=False, width=120)

    def dump(self, path: str | os.PathLike[str], resolved: bool = True, header: str | None = None) -> Path:
        """Write the schedule as YAML (atomically); ``resolved`` expands patterns to exact names."""
        text = self.to_yaml(resolved)
        if header:
            text = "".join(f"# {line}\n" for line in header.splitlines()) + text
        return atomic_write_text(path, text)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint records to recognise this schedule and model later (see :func:`diff_fingerprints`)."""
        return {
            "phases": [
                {
                    "params": list(p.params),
                    "lr": p.lr,
                    "max_transition_epoch": p.max_transition_epoch,
                    "max_transition_step": p.max_transition_step,
                    "new_optimizer": p.new_optimizer.to_dict() if p.new_optimizer else None,
                    "new_lr_scheduler": p.new_lr_scheduler.to_dict() if p.new_lr_scheduler else None,
                    "merge_lora": p.merge_lora,
                }
                for p in self.phases
            ],
            "peft": self.peft,
            "shapes": {n: list(s) for n, s in self.shapes.items() if n in set(self.scheduled_params)},
            "model_digest": _model_digest(self.shapes),
        }


def _model_digest(shapes: Mapping[str, Sequence[int]]) -> str:
    h = hashlib.sha1()
    for name in sorted(shapes):
        h.update(f"{name}:{tuple(shapes[name])};".encode())
    return h.hexdigest()


def diff_fingerprints(saved: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Compare a checkpoint's schedule fingerprint with the current one.

    Returns ``(blocking, benign)``: differences in which parameters train in which phase, the phase count,
    the optimizer/scheduler a phase installs, the ``peft`` section, a phase's ``merge_lora`` or the model's
    parameters block a resume (fingerprints written before the LoRA keys existed read as None); different ``lr`` or
    ``max_transition_epoch`` / ``max_transition_step`` values are reported but allowed (later phases use the
    current values; fingerprints written before ``max_transition_step`` existed read as -1).
    """
    blocking: list[str] = []
    benign: list[str] = []
    sp, cp = saved["phases"], current["phases"]
    if len(sp) != len(cp):
        blocking.append(f"the checkpoint's schedule has {len(sp)} phases, the current one has {len(cp)}")
    if saved.get("peft") != current.get("peft"):
        blocking.append(f"the peft section differs: checkpoint {saved.get('peft')!r}, now {current.get('peft')!r}")
    for i, (a, b) in enumerate(zip(sp, cp)):
        if a["params"] != b["params"]:
            added = sorted(set(b["params"]) - set(a["params"]))
            removed = sorted(set(a["params"]) - set(b["params"]))
            parts = []
            if added:
                parts.append(f"now also {few(added)}")
            if removed:
                parts.append(f"no longer {few(removed)}")
            if not parts:
                parts.append("same names in a different order")
            blocking.append(f"phase {i} trains different parameters: {'; '.join(parts)}")
        for key in ("new_optimizer", "new_lr_scheduler", "merge_lora"):
            if a.get(key) != b.get(key):
                blocking.append(f"phase {i} key {key!r} differs: checkpoint {a.get(key)!r}, now {b.get(key)!r}")
        for key, unset in (("lr", None), ("max_transition_epoch", -1), ("max_transition_step", -1)):
            if a.get(key, unset) != b.get(key, unset):
                benign.append(f"phase {i} {key}: checkpoint {a.get(key, unset)!r}, now {b.get(key, unset)!r}")
    s_shapes, c_shapes = saved.get("shapes", {}), current.get("shapes", {})
    for name, shape in s_shapes.items():
        if name in c_shapes and list(c_shapes[name]) != list(shape):
            blocking.append(f"parameter {name!r} has shape {list(shape)} in the checkpoint, {c_shapes[name]} now")
    if saved.get("model_digest") != current.get("model_digest") and not blocking:
        blocking.append("the model's parameter names or shapes differ from those the checkpoint was trained with")
    return blocking, benign


def resolve_schedule(
    source: str | os.PathLike[str] | Mapping[Any, Any],
    param_names: Sequence[str] | Mapping[str, Sequence[int]],
    *,
    epoch_transitions_only: bool = False,
) -> Schedule:
    """Load, validate and resolve a schedule against a model's parameter names.

    ``param_names`` lists the model's parameter names in registration order, or maps them to shapes.
    Raises :class:`ScheduleError` listing every problem found.
    """
    raw, desc, problems = load_schedule_source(source)
    if problems:
        raise ScheduleError(problems, desc)
    if isinstance(param_names, Mapping):
        shapes = {n: tuple(s) for n, s in param_names.items()}
        names = list(param_names)
    else:
        names = list(param_names)
        shapes = {}
    checked, problems, notes = check_phases(raw, names, epoch_transitions_only)
    if problems:
        raise ScheduleError(problems, desc)
    phases = [Phase(**fields) for fields in checked]
    scheduled = {n for p in phases for n in p.params}
    unscheduled = tuple(n for n in names if n not in scheduled)
    peft = raw.get("peft") if isinstance(raw, Mapping) else None
    return Schedule(tuple(phases), unscheduled, desc, tuple(notes), shapes,
                    None if peft is None else specs.plain_data(peft))


def param_shapes(named_parameters: Iterable[tuple[str, Any]]) -> dict[str, tuple[int, ...]]:
    """Map parameter names to shapes, in registration order (helper for :func:`resolve_schedule`)."""
    return {n: tuple(p.shape) for n, p in named_parameters}
