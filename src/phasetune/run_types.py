"""What a run is configured with and what it reports: options, environment, phase records, decisions.

Torch only; :class:`phasetune.run.PhaseRun` uses them, and every front end builds them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from phasetune import _dist, generate, recipes, rng

log = logging.getLogger("phasetune")

SNAPSHOT_STORAGES = ("memory", "disk")
AUDIT_MODES = ("raise", "warn", "off")
AUDIT_ZERO_LR = ("fail", "report")


@dataclass
class PhaseRecord:
    """What happened in one phase (a run's ``history`` holds one per phase started)."""

    depth: int
    start_epoch: int
    start_step: int | None
    lr: float | None
    trainable_params: int
    total_params: int
    end_epoch: int | None = None
    end_step: int | None = None
    end_reason: str | None = None
    best_value: float | None = None
    best_epoch: int | None = None
    restored_best: bool = False
    wall_time: float = 0.0
    peak_memory: int | None = None  # bytes; what was measured: peak_memory_kind (see phasetune.memory)
    peak_memory_kind: str | None = None
    #: the thaw audit's last line for this phase (its transition's, then its first step's); None: not audited
    audit: str | None = None
    #: the frozen-prefix cache's end-of-phase line (what it held and served, see docs/prefix_cache.md); None: no cache
    prefix_cache: str | None = None

    @property
    def epochs(self) -> int | None:
        return None if self.end_epoch is None else self.end_epoch - self.start_epoch

    @property
    def steps(self) -> int | None:
        return None if self.end_step is None or self.start_step is None else self.end_step - self.start_step

    @classmethod
    def starting(cls, schedule: Any, depth: int, epoch: int, step: int | None, lr: float | None) -> PhaseRecord:
        """The record of phase ``depth`` of ``schedule`` starting now, with its share of the parameters."""
        shapes = schedule.shapes  # logical shapes: tensors may be shards or shared FlatParameters
        trainable = sum(math.prod(shapes[n]) for n in schedule.params_through(depth))
        return cls(depth, epoch, step, lr, trainable, sum(math.prod(s) for s in shapes.values()))

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PhaseRecord:
        """A record from :func:`dataclasses.asdict` output (fields a format-1 loop record lacked default)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in state.items() if k in known}
        values.setdefault("start_step", None)
        values.setdefault("trainable_params", 0)
        values.setdefault("total_params", 0)
        return cls(**values)


@dataclass
class RunOptions:
    """The knobs every front end shares, with one name and one default each."""

    #: last phase to run; -1 runs every phase
    max_depth: int = -1
    #: lr of phases >= 1 that set no ``lr``; ``None``: a tenth of the optimizer's first group lr
    base_max_lr: float | None = 1e-5
    #: before each transition, restore the best state of the run so far (weights, optimizer state, buffers;
    #: the lr schedule stays where it is)
    restore_best: bool = True
    #: phases end only at their ``max_transition_epoch`` / ``max_transition_step`` (one of them required in every
    #: phase); no early stopping
    epoch_transitions_only: bool = False
    #: how an implicit schedule (none given) is generated: one of :data:`phasetune.generate.STYLES` (recipes)
    schedule_style: str = generate.DEFAULT_STYLE
    #: the recipe's options for an implicit schedule (:data:`phasetune.recipes.OPTIONS`: ``lr``, ``lr_decay``,
    #: ``phase_steps``, ``total_steps``, ``head_fraction``, ``warmup_fraction``, ``steps_per_epoch``, ``include_stem``,
    #: ``blocks_per_phase``, ``phase0_lr_shape``, ``head_lr``, ``ft_head_lr``, ``head_groups``); under the default
    #: style they override the default settings (:data:`phasetune.recipes.DEFAULT_RULE`), and ``total_steps``
    #: replaces the run's own step budget
    schedule_options: Mapping[str, Any] | None = None
    #: for implicit schedules: a ``new_optimizer`` / ``new_lr_scheduler`` mapping applied at every transition
    reinit_optim_cfg: Mapping[str, Any] | None = None
    reinit_lr_cfg: Mapping[str, Any] | None = None
    #: rebuild the optimizer's groups over exactly phase 0's parameters (True), or only warn (False)
    enforce_phase0_params: bool = True
    #: groups added to a LambdaLR/MultiplicativeLR follow its last lambda instead of keeping their lr
    apply_lambdas_new_pgs: bool = False
    #: frozen BatchNorm layers keep updating running statistics (True) or are put in eval mode (False)
    frozen_bn_track_running_stats: bool = True
    #: where restore-best keeps its snapshot: "memory" (CPU memory) or "disk" (a file per rank and phase)
    snapshot_storage: str = "memory"
    #: a resume onto another number of processes, whose per-process random state cannot be restored:
    #: refuse it ("exact") or re-seed every generator from the saved state with a warning ("reseed")
    resume_rng: str = "exact"
    #: the thaw audit (:mod:`phasetune.audit`) at every start, transition and resume and after each phase's first
    #: optimizer step: raise on a failure ("raise"), warn ("warn"), or do not audit ("off")
    audit: str = "raise"
    #: a scheduler's lr of 0 on a newly thawed group at its first step: a failure ("fail") or only reported
    #: ("report": a phase whose new lr scheduler warms up from 0)
    audit_zero_lr: str = "fail"

    def problems(self, explicit_schedule: bool) -> list[str]:
        """What is wrong with these options (empty when nothing is), each naming the option."""
        found = []
        md = self.max_depth
        if isinstance(md, bool) or not isinstance(md, int) or md < -1:
            found.append(f"max_depth must be -1 (all phases) or an integer >= 0, got {md!r}")
        lr = self.base_max_lr
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
            found.append(f"base_max_lr must be a positive number or None, got {lr!r}")
        if self.schedule_style not in generate.STYLES:
            found.append(f"schedule_style must be one of {generate.STYLES}, got {self.schedule_style!r}")
        if self.schedule_options is not None and not isinstance(self.schedule_options, Mapping):
            found.append(f"schedule_options must map recipe options to values (e.g. {{'total_steps': 120}}), got "
                         f"{type(self.schedule_options).__name__}")
        else:
            for key in sorted(set(self.schedule_options or {}) - set(recipes.OPTIONS), key=str):
                found.append(recipes.unknown_option(key, recipes.OPTIONS, "schedule_options key"))
        if self.schedule_options and explicit_schedule:
            found.append("schedule_options apply to implicit schedules only; with an explicit schedule, write the "
                         "phases' lr and new_lr_scheduler in it (phasetune schedule generate --recipe writes one)")
        if self.snapshot_storage not in SNAPSHOT_STORAGES:
            found.append(f"snapshot_storage must be 'memory' or 'disk', got {self.snapshot_storage!r}")
        if self.resume_rng not in rng.RESUME_RNG:
            found.append(f"resume_rng must be one of {rng.RESUME_RNG}, got {self.resume_rng!r}")
        if self.audit not in AUDIT_MODES:
            found.append(f"audit must be one of {AUDIT_MODES} (raise on a phase that did not take effect, warn, or "
                         f"do not audit), got {self.audit!r}")
        if self.audit_zero_lr not in AUDIT_ZERO_LR:
            found.append(f"audit_zero_lr must be one of {AUDIT_ZERO_LR}, got {self.audit_zero_lr!r}")
        if (self.reinit_optim_cfg or self.reinit_lr_cfg) and explicit_schedule:
            found.append(
                "reinit_optim_cfg/reinit_lr_cfg apply to implicit schedules only; with an explicit schedule "
                "put 'new_optimizer'/'new_lr_scheduler' in the phases that need them"
            )
        return found


def _rank_zero_log(level: int) -> Callable[[str], None]:
    def emit(message: str) -> None:
        if _dist.rank() == 0:  # a message that names phasetune first already says whose it is
            log.log(level, "%s", message if message.startswith("phasetune") else f"phasetune: {message}")

    return emit


@dataclass
class RunEnv:
    """Where a run happens, as its front end knows it."""

    #: rank 0's value on every rank; a collective that every rank calls (identity on one process)
    broadcast: Callable[[Any], Any] = _dist.broadcast_object
    #: a warning / an informational line, shown once (on rank 0)
    warn: Callable[[str], None] = field(default_factory=lambda: _rank_zero_log(logging.WARNING))
    info: Callable[[str], None] = field(default_factory=lambda: _rank_zero_log(logging.INFO))
    #: the model's buffers by name (restore-best restores them: BatchNorm statistics move when frozen)
    named_buffers: Callable[[], Mapping[str, torch.Tensor]] = dict
    #: how a snapshot tensor is written back into a live one (FSDP1 FlatParameter views need their own)
    copy_into: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    #: snapshots hold this rank's own shards (sharded strategies), so each rank keeps its own
    rank_local_snapshots: bool = False
    #: every rank's :meth:`PhaseRun.state_dict` is saved (plain strategy), not only rank 0's (Lightning)
    state_saved_per_rank: bool = False
    #: where snapshot files go ("disk" storage, and rank-local snapshots of checkpoints saved by rank 0)
    snapshot_dir: str | None = None
    #: the device whose peak memory each phase records
    device: torch.device | str | None = None
    #: what the optimizer the run is given is called in messages
    optimizer_source: str = "the optimizer"

    @property
    def rank(self) -> int:
        return _dist.rank()

    @property
    def world_size(self) -> int:
        return _dist.world_size()


@dataclass(frozen=True)
class Decision:
    """What :meth:`PhaseRun.decide` says: move to the next phase, or end the run; and why."""

    transition: bool
    reason: str

    @property
    def stop(self) -> bool:
        return not self.transition


def state_problem(state: Mapping[str, Any], where: Any, *, monitor: str | None, mode: str, env: RunEnv,
                  resume_rng: str, state_format: int) -> str | None:
    """Why a run cannot continue from checkpoint ``state`` (at ``where``), naming what differs and what to do;
    None when it can (see :meth:`phasetune.run.PhaseRun.check_state`)."""
    src = f" {where}" if where is not None else ""
    if state.get("format") not in (1, state_format):
        return (f"the fine-tuning state of checkpoint{src} has format {state.get('format')!r}; this phasetune reads "
                f"formats 1 and {state_format}: resume it with the phasetune version that wrote it")
    saved = state.get("monitor")
    has_best = any(r.get("best_value") is not None for r in state.get("history", []))
    if saved is not None and monitor is not None and saved != monitor and has_best:
        return (f"checkpoint{src} was saved monitoring {saved!r}, this run monitors {monitor!r}: its best values "
                f"and restore-best snapshot are of {saved!r}. Resume with monitor={saved!r} (FTSEarlyStopping/"
                "FTSCheckpoint monitor, or the metric you pass), or start a new fit from its weights")
    saved_mode = state.get("mode")
    if saved_mode is not None and saved_mode != mode and has_best:
        return (f"checkpoint{src} was saved with mode={saved_mode!r} for {saved!r}, this run uses mode={mode!r}; "
                f"resume with mode={saved_mode!r}")
    if state.get("rng") is not None:
        return rng.problem(state["rng"], rank=env.rank, world_size=env.world_size, mode=resume_rng,
                           where=f" from checkpoint{src}") or None
    return None


def phase_of(depth: int, final_depth: int) -> str:
    """``phase 1 (of phases 0-2)``: a phase and the phases of the run, in messages."""
    return f"phase {depth} (of phases 0-{final_depth})"


def implicit_resume_hint(saved: Mapping[str, Any]) -> str:
    """What to do when a generated schedule differs from the checkpoint's: it was generated from the run."""
    phases = saved.get("phases") or [{}]
    budget = phases[-1].get("max_transition_step", -1)
    said = f" (its budget: {budget} optimizer steps)" if budget and budget > 0 else ""
    return ("\nno schedule was given, so it was generated from this run's step budget and optimizer lr: resume with "
            f"the run length and lr the checkpoint was trained with{said}, or pass that budget as "
            "schedule_options={'total_steps': N}")
