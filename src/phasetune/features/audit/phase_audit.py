"""Did each phase take effect? An audit at every transition and after the first optimizer step of a phase.

The commonest failure of gradual unfreezing is silent: a layer the schedule thawed never trains. The audit
proves each phase took effect, or names what did not and why (torch only):

- **at a transition, a start or a resume** (:meth:`PhaseAudit.check_phase`): every parameter of the phases
  so far requires grad, sits in exactly one optimizer group and, under ``DistributedDataParallel``, is one
  the reducer averages;
- **after the first optimizer step of the phase** (optimizer step hooks armed by ``check_phase`` and removed
  after that step, so ordinary steps do no work): the structure again (a callback may freeze a layer after
  the transition), each newly thawed parameter got a finite, non-zero gradient on every rank and its value
  moved, its FSDP1 ``FlatParameter`` requires grad, each group's lr is the one the schedule (and its lr
  scheduler) asked for, and parameters of later phases did not move.

Each audit uses at most one collective (an ``all_gather_object`` of every rank's findings), so every rank
reaches the same verdict. A failure raises :class:`AuditError` (or warns, ``on_failure="warn"``); a pass is
one line per phase. :func:`group_names` gives optimizer groups readable names for logging lrs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.optim import Optimizer

from phasetune.core.param_groups import PHASE_KEY, is_no_decay
from phasetune.features.audit.probes import (
    find_ddp,
    fingerprints,
    fsdp1_flat_params,
    grad_stats,
    reducer_misses,
    state_init_step,
)
from phasetune.features.audit.result import (  # re-exported: the audit's public names live here too
    CAUSES,
    FIRST_STEP,
    RESUME,
    START,
    TRANSITION,
    AuditError,
    AuditOptions,
    AuditResult,
    Finding,
)
from phasetune.sharding import optim_state
from phasetune.util import dist
from phasetune.util.text import covering_modules, few

log = logging.getLogger("phasetune")


@dataclass
class _Armed:
    depth: int
    optimizer: Optimizer
    schedulers: list[Any]
    check: list[str]  # names whose gradient and change are checked
    frozen: list[str]
    stage: str
    handles: list[Any] = field(default_factory=list)
    before: dict[str, tuple[float, float]] | None = None
    skip: bool = False  # the step under way is not a training step (see state_init_step)
    fresh_lora: set[str] = field(default_factory=set)  # LoRA A whose B was zero before the step: no gradient is due


class PhaseAudit:
    """Audits the phases an engine runs (see the module docstring).

    Args:
        engine: the :class:`~phasetune.core.engine.PhaseEngine` (its ``params``, schedule and depth).
        options: failure policy.
        model: the model as trained: a ``DistributedDataParallel`` (its reducer is checked) or a module holding
            FSDP1 units (their FlatParameters are checked); may be set later (``audit.model = ...``).
        info, warn: where the pass line and a warned failure go (default: the ``phasetune`` logger, rank 0).
        recompiles: a :class:`phasetune.features.compile_support.RecompileCounter` whose count since the transition is
            reported with the first step's result.
        on_result: called with every result (a transition's, then its first step's), e.g. to put the summary
            into the phase's history record.
    """

    def __init__(
        self,
        engine: Any,
        *,
        options: AuditOptions | None = None,
        model: nn.Module | None = None,
        info: Callable[[str], None] | None = None,
        warn: Callable[[str], None] | None = None,
        recompiles: Any = None,
        on_result: Callable[[AuditResult], None] | None = None,
    ) -> None:
        self.engine = engine
        self.options = options or AuditOptions()
        self.model = model
        self.info = info or _rank_zero(logging.INFO)
        self.warn = warn or _rank_zero(logging.WARNING)
        self.recompiles = recompiles
        self.on_result = on_result
        self.results: list[AuditResult] = []  # the first-step audits, one per phase
        self._armed: _Armed | None = None
        self._spent: list[Any] = []  # post-step hooks that ran their audit, removed at the next safe moment

    @property
    def pending(self) -> bool:
        """Whether the first-step audit of the current phase is still to come."""
        return self._armed is not None

    def check_stepped(self, steps: int) -> None:
        """Warn when the optimizer the audit watches has not stepped after ``steps`` steps of the phase (call it
        from a per-step hook, e.g. a run's step watch): the optimizer that trains is another one (wrapped or
        rebuilt after the transition), or every step so far was skipped (a GradScaler finding inf gradients)."""
        if self._armed is not None:
            self.warn(f"audit: the optimizer phasetune fitted has not stepped in {steps} optimizer steps of phase "
                      f"{self._armed.depth}: if another optimizer trains (one built or replaced after the transition), "
                      "phase parameters may not train at all; give phasetune the optimizer that steps")

    # ------------------------------------------------------------------ the two audits
    def check_phase(
        self, optimizer: Optimizer, schedulers: Sequence[Any] = (), *, thawed: Sequence[str] | None = None,
        stage: str = TRANSITION,
    ) -> AuditResult:
        """Audit the phase just entered (``stage``: start, transition or resume; a collective) and arm the audit of
        its first optimizer step. ``thawed``: the names the transition thawed (default: the phase's; on a resume
        every trainable parameter is checked)."""
        if (self._armed is not None and self._armed.depth != self.engine.depth and RESUME not in (stage, self._armed.stage)):
            self.warn(f"audit: phase {self._armed.depth} ended before an optimizer step, so it was not audited after "
                      "one")
        self.disarm()
        engine = self.engine
        trainable = list(engine.trainable())
        local = self._structure(optimizer, trainable, first_step=False)
        gathered = dist.all_gather_object({"local": local})  # the audit's one collective
        result = AuditResult(engine.depth, stage, checked=len(trainable), groups=_n_groups(optimizer))
        result.findings = _merge_local([g["local"] for g in gathered])
        self._conclude(result, quiet=True)
        if stage == RESUME or (thawed is None and stage == START):
            check = trainable
        else:
            names = thawed if thawed is not None else engine.schedule[engine.depth].params
            check = [n for n in engine.distinct(names) if n in set(trainable)]
        keep = set(trainable)
        frozen = [n for n in engine.distinct(list(engine.params)) if n not in keep]
        self._arm(_Armed(engine.depth, optimizer, list(schedulers), check, frozen, stage))
        if self.recompiles is not None:
            self.recompiles.mark()
        return result

    def disarm(self) -> None:
        """Remove the first-step hooks (a no-op when none are armed). Not from inside an optimizer step hook."""
        if self._armed is not None:
            for h in self._armed.handles:
                h.remove()
            self._armed = None
        self.drop_spent_hooks()

    def drop_spent_hooks(self) -> None:
        """Remove a post-step hook that already ran its audit but could not remove itself then (another post-step
        hook followed it); until then it returns at once. A run calls this after each phase's first step."""
        for h in self._spent:
            h.remove()
        self._spent = []

    def _spend(self, armed: _Armed) -> None:
        """After the audited step, from inside the post-step hooks: remove both hooks. torch iterates the
        optimizer's post-step hooks while calling them, and removing one that other hooks follow breaks that
        iteration ("OrderedDict mutated during iteration"): such a hook is kept (inert) for drop_spent_hooks."""
        pre, post = armed.handles
        pre.remove()  # the pre-step hooks are not being iterated now
        hooks = post.hooks_dict_ref()
        if hooks is None or next(reversed(hooks), None) == post.id:  # the last one: safe to remove now
            post.remove()
        else:
            self._spent.append(post)

    def _arm(self, armed: _Armed) -> None:
        self._armed = armed
        armed.handles = [armed.optimizer.register_step_pre_hook(self._before_step),
                         armed.optimizer.register_step_post_hook(self._after_step)]

    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if optim_state.in_placeholder_step():  # a checkpoint save/load's placeholder step, not training
            return
        armed = self._armed
        if armed is not None and armed.before is None and state_init_step(optimizer):
            armed.skip = True
            return
        if armed is not None and armed.before is None:  # values as the step finds them (before a closure runs)
            names = armed.check + armed.frozen
            armed.before = dict(zip(names, fingerprints([self.engine.params[n] for n in names])))
            armed.fresh_lora = fresh_lora_a(armed.check, self.engine.params)

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if optim_state.in_placeholder_step():
            return
        armed = self._armed
        if armed is None:
            return
        if armed.skip:  # not a training step: the audit waits for the next one
            armed.skip = False
            return
        self._armed = None
        self._spend(armed)  # ordinary steps run without hooks from here on
        if armed.before is None:
            return
        self.results.append(self._first_step(armed))
        self._conclude(self.results[-1], quiet=False)

    def _first_step(self, armed: _Armed) -> AuditResult:
        engine, optimizer = self.engine, armed.optimizer
        trainable = list(engine.trainable())
        params = engine.params
        names = armed.check + armed.frozen
        after = dict(zip(names, fingerprints([params[n] for n in names])))
        moved = [n for n in names if after[n] != armed.before[n]]  # type: ignore[index]
        grads = dict(zip(armed.check, grad_stats([params[n] for n in armed.check])))
        lrs, lr_findings, notes = self._lrs(optimizer, armed.schedulers)
        payload = {
            "local": self._structure(optimizer, trainable, first_step=True),
            "grads": grads,
            "moved": moved,
            "fresh_lora": sorted(armed.fresh_lora),
        }
        gathered = dist.all_gather_object(payload)  # the audit's one collective
        result = AuditResult(armed.depth, FIRST_STEP if armed.stage != RESUME else "first step after the resume",
                             checked=len(trainable), groups=_n_groups(optimizer), newly_thawed=len(armed.check),
                             frozen_checked=len(armed.frozen), notes=notes)
        findings = _merge_local([g["local"] for g in gathered])
        flagged = {n for f in findings for n in f.params}
        moved_any = {n for g in gathered for n in g["moved"]}
        ddp = find_ddp(self.model)
        by_cause: dict[str, list[str]] = {}
        # a fresh LoRA adapter's A gets a zero gradient while its B is zero (on every rank): due, not a failure
        fresh = set.intersection(*(set(g["fresh_lora"]) for g in gathered)) if gathered else set()
        if fresh:
            result.notes.append(f"{len(fresh)} LoRA A tensors got no gradient at this step because their B is still "
                                f"zero (fresh adapters; e.g. {sorted(fresh)[0]!r}): they train from the next step")
        for n in armed.check:
            if n in flagged or n in fresh:
                continue
            stats = [g["grads"][n] for g in gathered if g["grads"][n][0] != "empty"]  # ranks holding a piece
            lr = lrs.get(n)
            if any(s[0] == "none" for s in stats) or (stats and all(s[1] == 0.0 for s in stats)):
                by_cause.setdefault("no_gradient", []).append(n)
            elif any(not math.isfinite(s[1]) for s in stats):
                by_cause.setdefault("nonfinite", []).append(n)
            elif ddp is not None and len({s[2] for s in stats}) > 1:
                by_cause.setdefault("not_synchronised", []).append(n)
            elif lr is not None and lr > 0 and n not in moved_any and n in lr_findings.get("ok", set()):
                by_cause.setdefault("unchanged", []).append(n)
        # lr 0 fails on the groups of newly thawed parameters (a scheduler may end an old phase's groups at 0);
        # an lr other than the one asked for fails on every group
        # (at the start of training a scheduler's lr 0 is a warmup from 0: reported only)
        new_zero = [] if armed.stage == START else armed.check
        for cause, among in (("lr_zero", new_zero), ("lr_mismatch", trainable)):
            hit = [n for n in among if n in lr_findings[cause] and n not in flagged]
            if hit:
                by_cause.setdefault(cause, []).extend(hit)
        other_zero = [n for n in trainable if n in lr_findings["lr_zero"] and n not in set(new_zero)]
        if other_zero:
            result.notes.append(f"{len(other_zero)} tensors trained this step at lr 0, their lr scheduler's value "
                                f"(e.g. {other_zero[0]!r}); they are not expected to change")
        frozen_moved = [n for n in armed.frozen if n in moved_any]
        if frozen_moved:
            by_cause["frozen_changed"] = frozen_moved
        findings += [Finding(c, by_cause[c]) for c in CAUSES if c in by_cause]
        result.findings = findings
        if self.recompiles is not None:
            result.recompiles = self.recompiles.since_mark()
        return result

    # ------------------------------------------------------------------ checks
    def _structure(self, optimizer: Optimizer, trainable: list[str], first_step: bool) -> dict[str, list[str]]:
        """Structural failures on this rank: cause -> names."""
        params = self.engine.params
        count: dict[int, int] = {}
        for g in optimizer.param_groups:
            for p in g["params"]:
                count[id(p)] = count.get(id(p), 0) + 1
        found: dict[str, list[str]] = {}
        for n in trainable:
            p = params[n]
            cause = (_refrozen_cause(n, params) if not p.requires_grad else "missing" if id(p) not in count
                     else "duplicate" if count[id(p)] > 1 else None)
            if cause:
                found.setdefault(cause, []).append(n)
        flagged = {n for names in found.values() for n in names}
        rest = {n: params[n] for n in trainable if n not in flagged}
        ddp = find_ddp(self.model)
        if ddp is not None:
            misses = reducer_misses(ddp, rest)
            if misses:
                found["not_in_reducer"] = misses
        if first_step and self.model is not None:
            flat_of = fsdp1_flat_params(self.model)
            frozen_flat = [n for n, p in rest.items() if id(p) in flat_of and not flat_of[id(p)].requires_grad]
            if frozen_flat:
                found["flat_frozen"] = frozen_flat
        return found

    def _lrs(self, optimizer: Optimizer, schedulers: Sequence[Any]) -> tuple[dict[str, float], dict[str, set[str]], list[str]]:
        """Each parameter's lr, which names' groups fail the lr checks (and which pass: "ok"), and notes."""
        name_of = self.engine.name_of
        n_groups = len(optimizer.param_groups)
        asked_by: list[list[float]] = []
        unreadable = []  # schedulers of this optimizer whose last lrs do not say one lr per group
        for s in schedulers:
            if getattr(s, "optimizer", None) is optimizer:
                last = list(s.get_last_lr()) if hasattr(s, "get_last_lr") else []
                if len(last) == n_groups:
                    asked_by.append([float(v) for v in last])
                else:
                    unreadable.append(f"{type(s).__name__} ({len(last)} lrs)")
        lrs: dict[str, float] = {}
        verdict: dict[str, set[str]] = {"ok": set(), "lr_zero": set(), "lr_mismatch": set()}
        notes = []
        if unreadable and not asked_by:  # nothing to compare with: the phase lr is not what a scheduler asks for
            notes.append(f"the lrs of {', '.join(unreadable)} do not match the optimizer's {n_groups} groups: group "
                         "lrs were not compared with the schedule")
        for i, g in enumerate(optimizer.param_groups):
            names = [name_of[id(p)] for p in g["params"] if id(p) in name_of]
            if not names:
                continue
            phase = int(g.get(PHASE_KEY, 0))
            lr = float(g["lr"])
            base = float(g.get("initial_lr", self.engine.lr_for(phase) if phase > 0 else lr))
            asked = [a[i] for a in asked_by] or ([self.engine.lr_for(phase)] if phase > 0 and not unreadable else [lr])
            for n in names:
                lrs[n] = lr
            if lr == 0.0 and base == 0.0:
                notes.append(f"group {i} (phase {phase}, {few(names, 2)}) has lr 0 as configured: its parameters are "
                             "not expected to change")
                continue
            if not any(math.isclose(lr, a, rel_tol=1e-6, abs_tol=1e-12) for a in asked):
                verdict["lr_mismatch"].update(names)
                continue
            if lr == 0.0:
                if self.options.zero_lr == "fail":
                    verdict["lr_zero"].update(names)
                else:
                    notes.append(f"group {i} (phase {phase}) trained its first step at lr 0 (its lr scheduler's value)")
                continue
            verdict["ok"].update(names)
        return lrs, verdict, notes

    # ------------------------------------------------------------------ verdict
    def _conclude(self, result: AuditResult, quiet: bool) -> None:
        if self.on_result is not None:
            self.on_result(result)
        if result.passed:
            (log.debug if quiet else self.info)(result.summary())
            return
        if self.options.on_failure == "raise":
            self.disarm()
            raise AuditError(result)
        self.warn(result.message())


# ---------------------------------------------------------------------------------------------- group names


def group_names(optimizer: Optimizer, engine: Any) -> list[str]:
    """A readable name per optimizer group, e.g. ``phase1/encoder.layer.5`` (its phase and the blocks its
    parameters belong to; ``/no_decay`` on the weight-decay-free twin), unique within the optimizer: log lrs
    as ``lr/<name>`` rather than ``pg3``. Names change only at transitions: compute them then."""
    owner = {n: n.rpartition(".")[0] or n for n in engine.params}  # the module holding each parameter
    modules = list(dict.fromkeys(owner.values()))
    names_by_id: dict[int, list[str]] = {}
    for n, p in engine.params.items():
        names_by_id.setdefault(id(p), []).append(n)
    labels, no_decay = [], []
    for g in optimizer.param_groups:
        names = [n for p in g["params"] for n in names_by_id.get(id(p), [])]
        held = list(dict.fromkeys(owner[n] for n in names))
        where = covering_modules(held, modules, limit=2).replace(", ", "+").replace(" +", "+").replace(" more", "_more")
        labels.append(f"phase{int(g.get(PHASE_KEY, 0))}/{where if held else 'empty'}")
        no_decay.append(bool(names) and all(is_no_decay(n, engine.no_decay) for n in names))
    out: list[str] = []
    for label, nd in zip(labels, no_decay):
        if labels.count(label) > 1 and nd:
            label += "/no_decay"
        base, k = label, 2
        while label in out:
            label, k = f"{base}/{k}", k + 1
        out.append(label)
    return out


# ---------------------------------------------------------------------------------------------- helpers


def _rank_zero(level: int) -> Callable[[str], None]:
    def emit(message: str) -> None:
        if dist.rank() == 0:
            log.log(level, "phasetune: %s", message)

    return emit


def _refrozen_cause(name: str, params: Any) -> str:
    """Why a parameter the phase trains is frozen: a LoRA adapter, a LoRA injection (the model has adapters), or
    something else."""
    if ".lora_" in name:
        return "adapter_frozen"
    return "injection_refrozen" if any(".lora_" in n for n in params) else "refrozen"


def fresh_lora_a(names: Sequence[str], params: Any) -> set[str]:
    """The LoRA ``A`` weights among ``names`` whose ``B`` is all zero on this rank (a fresh or restarted adapter):
    their gradient is zero until ``B`` moves."""
    out: set[str] = set()
    for n in names:
        partner = n.replace(".lora_A.", ".lora_B.", 1)
        if partner != n and partner in params:
            b = params[partner]
            local = b.to_local() if hasattr(b, "to_local") else b
            if not bool(local.detach().ne(0).any()):
                out.add(n)
    return out


def _n_groups(optimizer: Optimizer) -> int:
    return sum(1 for g in optimizer.param_groups if g["params"])


def _merge_local(per_rank: list[dict[str, list[str]]]) -> list[Finding]:
    merged: dict[str, list[str]] = {}
    for found in per_rank:
        for cause, names in found.items():
            merged.setdefault(cause, [])
            merged[cause] += [n for n in names if n not in merged[cause]]
    seen: set[str] = set()
    findings = []
    for cause in CAUSES:  # a name is reported under its first (most likely) cause only
        names = [n for n in merged.get(cause, []) if n not in seen]
        seen.update(names)
        if names:
            findings.append(Finding(cause, names))
    return findings


__all__ = ["CAUSES", "AuditError", "AuditOptions", "AuditResult", "Finding", "PhaseAudit", "group_names"]
