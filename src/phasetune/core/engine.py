"""The phase engine: executes a resolved schedule on a model's parameters and one optimizer.

It freezes and thaws, builds each phase's parameter groups, installs the optimizers and lr schedulers
phases ask for, and replays transitions when a run resumes. It knows nothing about Lightning or about
*when* to transition (see :mod:`phasetune.core.transitions`); the Lightning callback and the plain-loop
:class:`~phasetune.loop.ScheduledFinetuning` both drive it.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from phasetune.core import param_groups as pg
from phasetune.core import specs, thaw
from phasetune.core.schedule import Phase, Schedule

_MISSING = object()
#: group keys that are bookkeeping (phasetune's, or torch's per-optimizer flags), not hyperparameters to carry
_GROUP_BOOKKEEPING = frozenset(
    {"params", "lr", "initial_lr", pg.PHASE_KEY, "foreach", "fused", "capturable", "differentiable", "maximize"}
)


def _differs(value: Any, default: Any) -> bool:
    if default is _MISSING:
        return True
    try:
        return bool(value != default)
    except Exception:  # tensors or other values without a plain truth value: compare identity
        return value is not default


@dataclass
class Transition:
    """What one call of :meth:`PhaseEngine.advance` did."""

    depth: int
    thawed: list[str]
    lr: float
    groups_added: int
    optimizer: Optimizer
    new_optimizer: bool = False
    new_scheduler: Any = None
    scheduler_cfg: dict[str, Any] = field(default_factory=dict)
    already_in_optimizer: list[str] = field(default_factory=list)


class PhaseEngine:
    """Applies a :class:`~phasetune.core.schedule.Schedule` to ``params`` (logical name -> parameter).

    Args:
        schedule: the resolved schedule.
        params: every parameter of the model by the name the schedule uses, in registration order; several
            names may map to one tensor (an FSDP1 FlatParameter), which is then thawed and grouped once.
        base_lr: lr of phases >= 1 that set none; ``None`` means a tenth of the optimizer's first group lr.
        max_depth: last phase to run (-1: all).
        no_decay: parameter-name substrings whose parameters get ``weight_decay=0`` groups.
        apply_lambdas_new_pgs: groups added to a LambdaLR/MultiplicativeLR follow its last lambda
            (default: they keep their lr).
    """

    def __init__(
        self,
        schedule: Schedule,
        params: Mapping[str, torch.Tensor],
        *,
        base_lr: float | None = 1e-5,
        max_depth: int = -1,
        no_decay: Sequence[str] | None = None,
        apply_lambdas_new_pgs: bool = False,
    ) -> None:
        if max_depth < -1:
            raise ValueError(f"max_depth must be -1 (all phases) or >= 0, got {max_depth}")
        self.schedule = schedule
        self.params = dict(params)
        # Several names may share one tensor (FSDP1 flattens a unit's parameters into one FlatParameter): the
        # engine freezes, groups and snapshots each tensor once, under the first name that maps to it.
        first: dict[int, str] = {}
        self._canonical = {n: first.setdefault(id(p), n) for n, p in self.params.items()}
        self.base_lr = base_lr
        self.final_depth = len(schedule) - 1 if max_depth < 0 else min(max_depth, len(schedule) - 1)
        self.no_decay = list(no_decay) if no_decay else None
        self.apply_lambdas_new_pgs = apply_lambdas_new_pgs
        self.layout: pg.GroupLayout | None = None
        #: optional ``groups -> groups`` applied to each phase's new groups (sharded strategies split groups
        #: so each holds one dtype and one device mesh; see :func:`phasetune.sharding.split_groups`)
        self.group_splitter: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None
        self.depth = 0
        #: names frozen for the rest of the run though their phase has begun (LoRA adapters a ``merge_lora``
        #: folded into their base weights): not trainable, not audited as trainable, not snapshotted
        self.retired: set[str] = set()

    # ---------------------------------------------------------------- names and state
    @property
    def name_of(self) -> dict[int, str]:
        return {id(self.params[c]): c for c in dict.fromkeys(self._canonical.values())}

    def distinct(self, names: Sequence[str]) -> list[str]:
        """``names`` with each tensor once (by the first name mapping to it), in order."""
        return list(dict.fromkeys(self._canonical[n] for n in names))

    @property
    def phase(self) -> Phase:
        return self.schedule[self.depth]

    @property
    def depth_remaining(self) -> int:
        return self.final_depth - self.depth

    @property
    def is_final(self) -> bool:
        return self.depth >= self.final_depth

    def trainable(self) -> dict[str, torch.Tensor]:
        """Parameters of phases 0..depth (the ones that can change now), less the :attr:`retired` ones."""
        return {n: self.params[n] for n in self.distinct(self.schedule.params_through(self.depth))
                if n not in self.retired}

    def lr_for(self, depth: int) -> float:
        lr = self.schedule[depth].lr
        if lr is not None:
            return lr
        if self.base_lr is None:
            raise RuntimeError("base_lr=None is resolved from the optimizer; call prepare_optimizer first")
        return self.base_lr

    # ---------------------------------------------------------------- setup
    def start(self) -> None:
        """Freeze everything, then thaw phase 0."""
        thaw.freeze(self.params)
        thaw.thaw(self.params, self.schedule[0].params)
        self.depth = 0

    def prepare_optimizer(
        self, optimizer: Optimizer, schedulers: Sequence[Any] = (), enforce: bool = True
    ) -> pg.Phase0Report:
        """Record how the user grouped parameters, then make the optimizer hold exactly phase 0's.

        With ``enforce=False`` nothing changes; the report says what differs. With ``no_decay``, phase-0
        parameters matching it move to extra groups with ``weight_decay=0``.
        """
        if self.base_lr is None:
            self.base_lr = float(optimizer.param_groups[0]["lr"]) * 0.1
        name_of = self.name_of
        self.layout = pg.GroupLayout.capture(optimizer, name_of)
        report = pg.restrict_to_phase0(optimizer, self.distinct(self.schedule[0].params), self.params, name_of, enforce)
        if enforce and self.no_decay:
            self._split_no_decay(optimizer, schedulers)
        return report

    def _split_no_decay(self, optimizer: Optimizer, schedulers: Sequence[Any]) -> None:
        name_of = self.name_of
        moved: list[dict[str, Any]] = []
        for g in list(optimizer.param_groups):
            nd = [p for p in g["params"] if pg.is_no_decay(name_of.get(id(p), ""), self.no_decay)]
            if nd and len(nd) < len(g["params"]) and g.get("weight_decay", 0.0) != 0.0:
                g["params"] = [p for p in g["params"] if all(p is not q for q in nd)]
                extra = {k: v for k, v in g.items() if k not in ("params", "initial_lr")}
                extra.update({"params": nd, "weight_decay": 0.0})
                moved.append(extra)
        pg.add_groups(optimizer, moved, schedulers, self.apply_lambdas_new_pgs)

    def first_scheduler(self, optimizer: Optimizer) -> tuple[Any, dict[str, Any]] | None:
        """Phase 0's ``new_lr_scheduler`` over ``optimizer`` (fitted to phase 0) and its Lightning config fields;
        None when phase 0 has none. It replaces the scheduler the front end was given from the first step."""
        spec = self.schedule[0].new_lr_scheduler
        if spec is None:
            return None
        return self._new_scheduler(spec, optimizer, len(optimizer.param_groups)), dict(spec.pl_lrs_cfg)

    def check_setup(self, optimizer: Optimizer, schedulers: Sequence[Any]) -> list[str]:
        """Problems that would stop a transition later, found now (before training)."""
        problems = []
        for s in schedulers:
            why = pg.check_scheduler_supported(s)
            if why:
                problems.append(f"lr scheduler {type(s).__name__}: {why}")
        if isinstance(optimizer, torch.optim.LBFGS) and self.final_depth > 0:
            problems.append(
                "torch.optim.LBFGS supports one parameter group, but phases after 0 add groups; "
                "use another optimizer or a one-phase schedule"
            )
        n_groups = len(optimizer.param_groups)
        replaced_scheduler = False
        first = self.schedule[0].new_lr_scheduler
        if first is not None and first.init_pg_lrs is not None and len(first.init_pg_lrs) != n_groups:
            problems.append(f"phase 0, key 'new_lr_scheduler', 'init_pg_lrs': {len(first.init_pg_lrs)} values given, "
                            f"but the optimizer has {n_groups} param groups in phase 0")
        for k in range(1, self.final_depth + 1):
            phase = self.schedule[k]
            if phase.new_lr_scheduler is not None:
                replaced_scheduler = True
                lrs_spec = phase.new_lr_scheduler
                if lrs_spec.init_pg_lrs is not None and len(lrs_spec.init_pg_lrs) != n_groups:
                    problems.append(
                        f"phase {k}, key 'new_lr_scheduler', 'init_pg_lrs': {len(lrs_spec.init_pg_lrs)} values "
                        f"given, but the optimizer will have {n_groups} param groups before phase {k}'s are added"
                    )
            if phase.new_optimizer is not None and schedulers and not replaced_scheduler and phase.new_lr_scheduler is None:
                problems.append(
                    f"phase {k}, key 'new_optimizer': the lr scheduler from configure_optimizers would keep "
                    f"driving the old optimizer; add 'new_lr_scheduler' to phase {k} (or configure no scheduler)"
                )
            n_groups += len(self.groups_for(k, optimizer))
        return problems

    # ---------------------------------------------------------------- transitions
    def groups_for(self, depth: int, optimizer: Optimizer | None = None) -> list[dict[str, Any]]:
        """Param groups that phase ``depth`` adds (skipping parameters ``optimizer`` already holds)."""
        names = self.distinct(self.schedule[depth].params)
        if optimizer is not None:
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            names = [n for n in names if id(self.params[n]) not in held]
        if not names:
            return []
        groups = pg.phase_groups(depth, names, self.params, self.lr_for(depth), self.layout, self.no_decay)
        return self.group_splitter(groups) if self.group_splitter is not None else groups

    def advance(self, optimizer: Optimizer, schedulers: Sequence[Any] = ()) -> Transition:
        """Thaw the next phase and give it parameter groups (and a new optimizer/scheduler if it asks)."""
        if self.is_final:
            raise RuntimeError(f"already at the final phase {self.final_depth}")
        k = self.depth + 1
        phase = self.schedule[k]
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        already = [n for n in phase.params if id(self.params[n]) in held]
        thawed = [n for n in phase.params if not self.params[n].requires_grad]  # names sharing a tensor too
        thaw.thaw(self.params, phase.params)
        lr = self.lr_for(k)
        groups = self.groups_for(k, optimizer)
        existing = len(optimizer.param_groups)
        t = Transition(depth=k, thawed=thawed, lr=lr, groups_added=len(groups), optimizer=optimizer,
                       already_in_optimizer=already)
        if phase.new_optimizer is not None:
            t.optimizer = self._new_optimizer(phase.new_optimizer, optimizer, groups)
            t.new_optimizer = True
        elif phase.new_lr_scheduler is not None:
            pg.add_groups(optimizer, groups, (), self.apply_lambdas_new_pgs)
        else:
            pg.add_groups(optimizer, groups, schedulers, self.apply_lambdas_new_pgs)
        if phase.new_lr_scheduler is not None:
            t.new_scheduler = self._new_scheduler(phase.new_lr_scheduler, t.optimizer, existing)
            t.scheduler_cfg = dict(phase.new_lr_scheduler.pl_lrs_cfg)
        self.depth = k
        return t

    def _new_optimizer(
        self, spec: specs.ClassSpec, old: Optimizer, new_groups: list[dict[str, Any]]
    ) -> Optimizer:
        """The optimizer ``spec`` names, over the old groups plus ``new_groups``.

        Hyperparameters the user set per group (values that differ from the old optimizer's defaults, such
        as ``weight_decay=0`` for norms and biases, or other betas) follow the groups when the new optimizer
        takes them; the ones it does not take are named in a warning rather than dropped silently.
        """
        cls = specs.import_class(spec.class_path, (Optimizer,))
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
        dropped: dict[str, Any] = {}
        name_of = self.name_of

        def carry(g: Mapping[str, Any], depth: int) -> dict[str, Any]:
            ng: dict[str, Any] = {"params": list(g["params"]), "lr": g["lr"], pg.PHASE_KEY: depth}
            if "initial_lr" in g:  # the lr the group was created with: a new lr scheduler restarts from it
                ng["initial_lr"] = g["initial_lr"]
            for k, v in g.items():
                if k in _GROUP_BOOKKEEPING or k in spec.init_args or not _differs(v, old.defaults.get(k, _MISSING)):
                    continue
                if k in accepted:
                    ng[k] = v
                else:
                    dropped.setdefault(k, v)
            names = [name_of.get(id(p), "") for p in g["params"]]
            if self.no_decay and names and all(pg.is_no_decay(n, self.no_decay) for n in names) and "weight_decay" in accepted:
                ng["weight_decay"] = 0.0  # no_decay groups stay without decay whatever the new default
            return ng

        groups = [carry(g, g.get(pg.PHASE_KEY, 0)) for g in old.param_groups]
        groups += [carry(g, g[pg.PHASE_KEY]) for g in new_groups]
        if dropped:
            keys = ", ".join(f"{k}={v!r}" for k, v in sorted(dropped.items()))
            warnings.warn(
                f"phase {self.depth + 1}, key 'new_optimizer': {cls.__name__} takes no {keys}, which the previous "
                f"optimizer's groups set; those groups train without them. Set what {cls.__name__} should use in "
                "the phase's new_optimizer init_args.",
                stacklevel=2,
            )
        return specs.build_optimizer(spec, groups)

    def _new_scheduler(self, spec: specs.LRSchedulerSpec, optimizer: Optimizer, existing: int) -> Any:
        if spec.init_pg_lrs is not None:
            for g, lr in zip(optimizer.param_groups[:existing], spec.init_pg_lrs):
                g["lr"] = lr
                g["initial_lr"] = lr
        elif spec.use_current_optimizer_pg_lrs:
            for g in optimizer.param_groups:
                g["initial_lr"] = g["lr"]
        else:  # default: existing groups start the new schedule from the lr they were created with
            for g in optimizer.param_groups:
                if "initial_lr" in g:
                    g["lr"] = g["initial_lr"]
        return specs.build_lr_scheduler(spec.init, optimizer)

    def replay(self, depth: int, optimizer: Optimizer, schedulers: Sequence[Any]) -> tuple[Optimizer, list[Any], dict[str, Any] | None]:
        """Advance from the current depth to ``depth`` without training (used to resume a run).

        Returns the optimizer, the lr schedulers and, when a phase replaced the scheduler, its
        Lightning config fields.
        """
        scheds = list(schedulers)
        cfg = None
        while self.depth < depth:
            t = self.advance(optimizer, scheds)
            optimizer = t.optimizer
            if t.new_scheduler is not None:
                scheds, cfg = [t.new_scheduler], t.scheduler_cfg
        return optimizer, scheds, cfg
