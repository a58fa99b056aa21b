"""What a thaw audit found (:mod:`phasetune.features.audit.phase_audit`): the probable causes it names, its result and its options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from phasetune.errors import ConfigurationError
from phasetune.util.text import few

#: probable causes: key -> (what the message calls it, what to do)
CAUSES: dict[str, tuple[str, str]] = {
    "adapter_frozen": ("LoRA adapters that do not train", "the schedule trains these adapter parameters but they do not "
                       "require grad: peft makes adapters trainable or frozen on its own (set_adapter, "
                       "enable_adapter_layers, merge_and_unload, a second injection); let the schedule decide, and "
                       "merge with merge_lora rather than peft's merge()"),
    "injection_refrozen": ("re-frozen by a LoRA injection", "peft's inject_adapter_in_model / get_peft_model sets "
                           "requires_grad=False on every non-adapter parameter when it injects: inject before "
                           "phasetune builds the run (a peft section in the schedule does, phasetune.run.lora_glue."
                           "inject_adapters), not after it thawed them"),
    "refrozen": ("re-frozen after the thaw", "something set requires_grad=False after phasetune thawed them (a callback "
                 "or hook that freezes layers, e.g. BaseFinetuning-style code run every epoch); remove it and let the "
                 "schedule decide what trains"),
    "missing": ("missing from the optimizer", "the optimizer that steps does not hold them: was it built from the "
                "parameters trainable at that moment, or replaced after phasetune added the phase's groups? Give "
                "phasetune the optimizer that trains and do not rebuild it after a transition"),
    "duplicate": ("in more than one optimizer group", "each parameter must sit in exactly one group; remove it from the "
                  "extra group"),
    "not_in_reducer": ("not in the DDP reducer", "DistributedDataParallel was built while they were frozen, so their "
                       "gradients are never averaged across ranks; make every parameter the schedule will train require "
                       "grad when the model is wrapped (phasetune freezes them again after) and pass "
                       "find_unused_parameters=True"),
    "not_synchronised": ("gradients differ across ranks", "their gradients were not averaged across ranks (not in DDP's "
                         "reducer, or a hook changed them after the all-reduce); wrap the model with every parameter the "
                         "schedule will train requiring grad"),
    "flat_frozen": ("FSDP FlatParameter frozen", "the FSDP1 unit holding them has a FlatParameter that does not require "
                    "grad, so FSDP computes no gradient for them; use use_orig_params=True and thaw through phasetune"),
    "no_gradient": ("no gradient reached them", "they got no gradient (or an all-zero one) at the phase's first step: "
                    "check that the forward uses them for the loss and that no hook, detach() or no_grad cuts or zeroes "
                    "their gradient"),
    "nonfinite": ("non-finite gradient", "their gradient holds inf or NaN: lower the phase's lr, check the loss, clip "
                  "gradients or use a GradScaler"),
    "lr_zero": ("lr 0", "their group trained at lr 0 though the schedule asked for more; check the lr scheduler (one "
                "that already ended at eta_min=0, a lambda or warmup returning 0 for the new groups), or pass "
                "zero_lr='report' if a phase starting at lr 0 is intended"),
    "lr_mismatch": ("lr not the scheduled one", "something set the group's lr after the schedule and its lr scheduler "
                    "did (a callback, an lr finder, another scheduler); let the schedule set phase lrs"),
    "unchanged": ("value did not change", "a gradient reached them at a non-zero lr but the step left them as they were "
                  "(the optimizer skipped them, or other code restored them)"),
    "frozen_changed": ("frozen parameter changed", "a parameter that should be frozen moved at the step: it sits in an "
                       "optimizer group with a leftover gradient or weight decay, or other code writes to it; take it "
                       "out of the optimizer or set its .grad to None"),
}
#: stages of an audit
START, TRANSITION, RESUME, FIRST_STEP = "start", "transition", "resume", "first step"


class AuditError(ConfigurationError):
    """A phase did not take effect; ``result`` is the :class:`AuditResult` that says what and why."""

    def __init__(self, result: AuditResult) -> None:
        self.result = result
        super().__init__(result.message())


@dataclass
class Finding:
    """One probable cause and the parameters (schedule names) it applies to."""

    cause: str
    params: list[str]

    def line(self) -> str:
        label, advice = CAUSES[self.cause]
        return f"{label}: {few(self.params)} ({_n(len(self.params), 'tensor')}). What to do: {advice}"


@dataclass
class AuditResult:
    """What one audit found. ``passed`` is True when no finding is a failure; ``notes`` are reported only."""

    depth: int
    stage: str
    checked: int = 0  # trainable tensors checked (phases 0..depth)
    groups: int = 0  # non-empty optimizer groups
    newly_thawed: int = 0  # tensors whose gradient and change were checked (first step)
    frozen_checked: int = 0  # tensors of later phases fingerprinted (first step)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    recompiles: int | None = None  # graphs torch.compile built since the transition (see compile_support)

    @property
    def passed(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        """One line: the counts, and the verdict."""
        if not self.passed:
            return f"audit phase {self.depth} ({self.stage}) FAILED: " + "; ".join(
                f"{CAUSES[f.cause][0]}: {few(f.params, 2)}" for f in self.findings)
        if self.stage.startswith(FIRST_STEP):
            what = "trainable tensors checked" if self.stage != FIRST_STEP else "tensors thawed"
            text = (f"audit phase {self.depth}: {self.newly_thawed} {what}, all trained; {_n(self.groups, 'group')} "
                    f"at the scheduled lrs; {self.frozen_checked} frozen unchanged")
        else:
            text = (f"audit phase {self.depth} ({self.stage}): {self.checked} trainable tensors, each requiring grad "
                    f"and in exactly one of {_n(self.groups, 'optimizer group')}")
        if self.recompiles is not None:
            text += f"; torch.compile built {self.recompiles} graph(s) for it"
        return text + "".join(f"; note: {n}" for n in self.notes)

    def message(self) -> str:
        """The failure report: every finding with its parameters, its probable cause and what to do."""
        lines = [f"phasetune audit of phase {self.depth} ({self.stage}) failed: the phase did not take effect."]
        lines += [f"  - {f.line()}" for f in self.findings]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def record(self) -> dict[str, Any]:
        """A JSON-safe summary for a phase's history record."""
        return {"stage": self.stage, "passed": self.passed, "checked": self.checked, "groups": self.groups,
                "newly_thawed": self.newly_thawed, "frozen_checked": self.frozen_checked,
                "failures": {f.cause: f.params for f in self.findings}, "notes": list(self.notes),
                "recompiles": self.recompiles}


@dataclass
class AuditOptions:
    """``on_failure``: raise :class:`AuditError` or only warn. ``zero_lr``: a group a scheduler holds at lr 0
    at the phase's first step (a warmup from 0) fails, or is only reported."""

    on_failure: Literal["raise", "warn"] = "raise"
    zero_lr: Literal["fail", "report"] = "fail"

    def __post_init__(self) -> None:
        if self.on_failure not in ("raise", "warn"):
            raise ConfigurationError(f"audit on_failure must be 'raise' or 'warn', got {self.on_failure!r}")
        if self.zero_lr not in ("fail", "report"):
            raise ConfigurationError(f"audit zero_lr must be 'fail' or 'report', got {self.zero_lr!r}")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


__all__ = ["CAUSES", "FIRST_STEP", "RESUME", "START", "TRANSITION", "AuditError", "AuditOptions", "AuditResult",
           "Finding"]
