"""Optimizer parameter groups per phase, and keeping lr schedulers consistent when groups are added.

Phase groups copy the hyperparameters of the group that ``configure_optimizers`` put each parameter in
(the :class:`GroupLayout`), with the phase's lr; a model attribute ``no_decay`` (name substrings) splits
each into a decayed group and one with ``weight_decay=0``. Every group phasetune touches carries the key
``ft_phase`` so its phase can be read back from any optimizer state dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs

PHASE_KEY = "ft_phase"


def constant_lambda(_: int) -> float:
    """The lr lambda given to groups added to a LambdaLR/MultiplicativeLR: keep the group's lr as set."""
    return 1.0


@dataclass
class GroupLayout:
    """How ``configure_optimizers`` grouped parameters: each group's hyperparameters and members."""

    hparams: list[dict[str, Any]] = field(default_factory=list)
    membership: dict[str, int] = field(default_factory=dict)

    @classmethod
    def capture(cls, optimizer: Optimizer, name_of: Mapping[int, str]) -> GroupLayout:
        keys = set(optimizer.defaults) - {"lr"}
        hparams = [{k: g[k] for k in keys if k in g} for g in optimizer.param_groups]
        membership = {}
        for i, g in enumerate(optimizer.param_groups):
            for p in g["params"]:
                name = name_of.get(id(p))
                if name is not None:
                    membership.setdefault(name, i)
        return cls(hparams, membership)


def is_no_decay(name: str, no_decay: Sequence[str] | None) -> bool:
    return bool(no_decay) and any(s in name for s in no_decay)  # type: ignore[union-attr]


def phase_groups(
    phase: int,
    names: Sequence[str],
    params: Mapping[str, torch.Tensor],
    lr: float,
    layout: GroupLayout | None = None,
    no_decay: Sequence[str] | None = None,
    keep_hparams: bool = True,
) -> list[dict[str, Any]]:
    """Param groups for the parameters ``names`` of ``phase``.

    Parameters are split by the user's original group (so its hyperparameters carry over when
    ``keep_hparams``) and by ``no_decay``; order follows ``names``. Empty splits produce no group.
    """
    buckets: dict[tuple[int, bool], list[torch.Tensor]] = {}
    for n in names:
        src = layout.membership.get(n, 0) if layout else 0
        buckets.setdefault((src, is_no_decay(n, no_decay)), []).append(params[n])
    groups = []
    for (src, nd), plist in sorted(buckets.items(), key=lambda kv: kv[0]):  # user group order, decayed first
        g: dict[str, Any] = {}
        if keep_hparams and layout and layout.hparams:
            g.update(layout.hparams[min(src, len(layout.hparams) - 1)])
        g.update({"params": plist, "lr": lr, PHASE_KEY: phase})
        if nd:
            g["weight_decay"] = 0.0
        groups.append(g)
    return groups


# --------------------------------------------------------------------------------------------------
# lr schedulers


def iter_schedulers(scheduler: Any) -> list[Any]:
    """A scheduler and, for SequentialLR/ChainedScheduler, the schedulers inside it (depth first)."""
    inner = getattr(scheduler, "_schedulers", None)  # torch's attribute for composite schedulers
    if isinstance(scheduler, (lrs.SequentialLR, lrs.ChainedScheduler)) and inner is not None:
        return [scheduler, *(s for child in inner for s in iter_schedulers(child))]
    return [scheduler]


def extend_scheduler(scheduler: Any, group: dict[str, Any], apply_lambdas_new_pgs: bool = False) -> None:
    """Make ``scheduler`` (already attached to the optimizer ``group`` was just added to) handle it.

    Per-group lists are extended so the new group keeps its lr now and follows the schedule from
    here on (``base_lrs``, lambdas, ReduceLROnPlateau ``min_lrs``, CyclicLR and OneCycleLR bounds).
    """
    seen: set[int] = set()  # SequentialLR shares its last-lr list with its active inner scheduler: extend it once
    for s in iter_schedulers(scheduler):
        _extend_one(s, group, apply_lambdas_new_pgs, seen)


def _extend_one(s: Any, group: dict[str, Any], apply_lambdas: bool, seen: set[int]) -> None:
    lr = group["lr"]
    if isinstance(s, lrs.OneCycleLR):
        prev = s.optimizer.param_groups[-2]
        div = prev["max_lr"] / prev["initial_lr"]
        final_div = prev["initial_lr"] / prev["min_lr"]
        group["max_lr"] = lr
        group["initial_lr"] = lr / div
        group["min_lr"] = group["initial_lr"] / final_div
        group["lr"] = group["initial_lr"] if s.last_epoch <= 0 else lr
        if getattr(s, "cycle_momentum", False):
            for key in ("max_momentum", "base_momentum"):
                group[key] = prev[key]
            if "betas" in group and "betas" in prev:
                group["betas"] = prev["betas"]
            elif "momentum" in prev:
                group["momentum"] = prev["momentum"]
    elif isinstance(s, lrs.CyclicLR):
        ratio = s.max_lrs[-1] / s.base_lrs[-1] if s.base_lrs[-1] else 1.0
        s.max_lrs.append(lr * ratio)
        if getattr(s, "cycle_momentum", False):
            s.base_momentums.append(s.base_momentums[-1])
            s.max_momentums.append(s.max_momentums[-1])
            prev = s.optimizer.param_groups[-2]
            for key in ("max_momentum", "base_momentum"):
                if key in prev:
                    group[key] = prev[key]
    if isinstance(s, lrs.ReduceLROnPlateau):
        s.min_lrs.append(s.default_min_lr if s.default_min_lr is not None else s.min_lrs[-1])
    if isinstance(s, (lrs.LambdaLR, lrs.MultiplicativeLR)):
        s.lr_lambdas.append(s.lr_lambdas[-1] if apply_lambdas else constant_lambda)
    if "swa_lr" in s.optimizer.param_groups[-2] and "swa_lr" not in group:  # torch.optim.swa_utils.SWALR
        group["swa_lr"] = s.optimizer.param_groups[-2]["swa_lr"]
    group.setdefault("initial_lr", group["lr"])
    if hasattr(s, "base_lrs") and not isinstance(s, (lrs.SequentialLR, lrs.ChainedScheduler)):
        s.base_lrs.append(group["initial_lr"])
    last = getattr(s, "_last_lr", None)  # torch keeps get_last_lr()'s values here
    if isinstance(last, list) and id(last) not in seen:
        seen.add(id(last))
        last.append(group["lr"])


def check_scheduler_supported(scheduler: Any) -> str | None:
    """Why phasetune cannot add groups to ``scheduler``, or None when it can."""
    for s in iter_schedulers(scheduler):
        if isinstance(s, lrs.OneCycleLR) and not s.optimizer.param_groups:
            return "OneCycleLR has no param groups to derive new group bounds from"
    if not isinstance(scheduler, (lrs.LRScheduler, lrs.ReduceLROnPlateau)):
        return (
            f"{type(scheduler).__name__} is not a torch.optim.lr_scheduler.LRScheduler or ReduceLROnPlateau; "
            "phasetune extends those when it adds parameter groups"
        )
    return None


def add_groups(
    optimizer: Optimizer,
    groups: Sequence[dict[str, Any]],
    schedulers: Sequence[Any] = (),
    apply_lambdas_new_pgs: bool = False,
) -> None:
    """Add ``groups`` to ``optimizer`` and extend every scheduler in ``schedulers`` for each of them."""
    for g in groups:
        optimizer.add_param_group(g)
        added = optimizer.param_groups[-1]
        for s in schedulers:
            extend_scheduler(s, added, apply_lambdas_new_pgs)


# --------------------------------------------------------------------------------------------------
# phase-0 enforcement


@dataclass
class Phase0Report:
    """What :func:`restrict_to_phase0` found (and changed when ``enforce``)."""

    extra: list[str] = field(default_factory=list)  # names in the optimizer but not in phase 0
    missing: list[str] = field(default_factory=list)  # phase-0 names the optimizer lacked
    unnamed: int = 0  # tensors in the optimizer that are not parameters of the model
    empty_groups: list[int] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.extra or self.missing or self.unnamed)

    def message(self, source: str, enforce: bool, expected: bool) -> tuple[str, str] | None:
        """``(level, text)`` telling the user how ``source`` (the optimizer) differed from phase 0 and what was
        done; None when it did not differ. ``expected``: it was built before the model was frozen (over every
        parameter), so taking later phases' parameters out is routine ("info"), not a "warning"."""
        if not self.changed:
            return None
        if expected and enforce and not self.unnamed:
            return "info", (f"fitted {source} to phase 0 (it also held {len(self.extra)} tensors of later phases, now "
                             f"taken out; {len(self.missing)} phase-0 tensors added)")
        if not enforce:
            return "warning", (f"{source} held {self.describe()}; enforce_phase0_params=False leaves it as it is: "
                               "parameters of later phases already in it will train with its settings, not their phase's.")
        extra = (f"; groups {self.empty_groups} are now empty and kept so lr scheduler lists stay aligned"
                 if self.empty_groups else "")
        return "warning", (f"{source} held {self.describe()}. phasetune rebuilt its groups over exactly phase 0's "
                           f"parameters, keeping the optimizer, its hyperparameters and the lr scheduler{extra}.")

    def describe(self) -> str:
        """How the optimizer differed from phase 0, in words (empty when it did not)."""
        parts = []
        if self.extra:
            parts.append(f"{len(self.extra)} parameter(s) outside phase 0 (e.g. {self.extra[0]!r})")
        if self.missing:
            parts.append(f"lacked {len(self.missing)} phase-0 parameter(s) (e.g. {self.missing[0]!r})")
        if self.unnamed:
            parts.append(f"{self.unnamed} tensor(s) that are not parameters of the model")
        return "; ".join(parts)


def restrict_to_phase0(
    optimizer: Optimizer,
    phase0: Sequence[str],
    params: Mapping[str, torch.Tensor],
    name_of: Mapping[int, str],
    enforce: bool,
) -> Phase0Report:
    """Make the optimizer's groups hold exactly phase 0's parameters (when ``enforce``), keeping groups.

    Each group keeps its hyperparameters and the phase-0 parameters it already had; phase-0 parameters no
    group had join group 0; groups left empty stay (empty) so lr-scheduler lists stay aligned. State of
    removed parameters is dropped.
    """
    keep = set(phase0)
    report = Phase0Report()
    present: set[str] = set()
    for gi, g in enumerate(optimizer.param_groups):
        kept = []
        for p in g["params"]:
            name = name_of.get(id(p))
            if name is None:
                report.unnamed += 1
            elif name not in keep:
                report.extra.append(name)
            else:
                kept.append(p)
                present.add(name)
        if enforce:
            for p in g["params"]:
                if name_of.get(id(p)) not in keep:
                    optimizer.state.pop(p, None)
            g["params"] = kept
            if not kept:
                report.empty_groups.append(gi)
    report.missing = [n for n in phase0 if n not in present]
    if enforce:
        if report.missing:
            optimizer.param_groups[0]["params"].extend(params[n] for n in report.missing)
            if 0 in report.empty_groups:
                report.empty_groups.remove(0)
        for g in optimizer.param_groups:
            g.setdefault(PHASE_KEY, 0)
    return report
