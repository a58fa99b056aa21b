"""What a run is configured with: :class:`RunOptions`, the knobs every front end shares (torch only).

The plain loop and the Hugging Face callback take one ``options=RunOptions(...)`` (or the same names as keywords,
mapped by :meth:`RunOptions.merged`); the Lightning callback keeps ``FinetuningScheduler``'s flat keywords and maps
them here once.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from phasetune.core import generate, recipes
from phasetune.errors import ConfigurationError
from phasetune.features import random_state as rng
from phasetune.run import memory_check

SNAPSHOT_STORAGES = ("memory", "disk")
AUDIT_MODES = ("raise", "warn", "off")
AUDIT_ZERO_LR = ("fail", "report")


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
    #: how an implicit schedule (none given) is generated: one of :data:`phasetune.core.generate.STYLES` (recipes)
    schedule_style: str = generate.DEFAULT_STYLE
    #: the recipe's options for an implicit schedule (any of :data:`phasetune.core.recipes.OPTIONS`); under the default
    #: style they override the default settings (:data:`phasetune.core.recipes.DEFAULT_RULE`), and ``total_steps``
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
    #: the thaw audit (:mod:`phasetune.features.audit.phase_audit`) at every start, transition and resume and after each phase's first
    #: optimizer step: raise on a failure ("raise"), warn ("warn"), or do not audit ("off")
    audit: str = "raise"
    #: a scheduler's lr of 0 on a newly thawed group at its first step: a failure ("fail") or only reported
    #: ("report": a phase whose new lr scheduler warms up from 0)
    audit_zero_lr: str = "fail"
    #: the memory plan of the run before phase 0, raising with each phase that will not fit
    #: (:mod:`phasetune.run.memory_check`): None (on for a CUDA device, whose size is read), False, True, the
    #: device's size in GiB, or a mapping of ``device_gib``, ``model``, ``name_prefix``, ``seq_len``, ``micro_batch``
    memory_check: Any = None

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
        found += memory_check.setting_problems(self.memory_check)
        if (self.reinit_optim_cfg or self.reinit_lr_cfg) and explicit_schedule:
            found.append(
                "reinit_optim_cfg/reinit_lr_cfg apply to implicit schedules only; with an explicit schedule "
                "put 'new_optimizer'/'new_lr_scheduler' in the phases that need them"
            )
        return found

    @classmethod
    def names(cls) -> list[str]:
        """The option names, in declaration order."""
        return [f.name for f in fields(cls)]

    @classmethod
    def merged(cls, options: RunOptions | None, keywords: Mapping[str, Any], owner: Callable[..., Any]) -> RunOptions:
        """``options`` (default: the defaults) with the options given as keywords to ``owner`` (a front end's
        ``__init__``; ``base_lr`` is the old name of ``base_max_lr``); an unknown keyword raises, naming it and the
        closest of the options and ``owner``'s own arguments."""
        name = owner.__qualname__.split(".")[0]
        if "base_lr" in keywords:
            warnings.warn(f"{name}(base_lr=...) is now base_max_lr=..., the Lightning callback's name; base_lr will be "
                          "removed", DeprecationWarning, stacklevel=3)
            keywords = {("base_max_lr" if k == "base_lr" else k): v for k, v in keywords.items()}
        known = cls.names()
        own = inspect.signature(owner).parameters
        valid = known + [p for p in own if p != "options" and own[p].kind is inspect.Parameter.KEYWORD_ONLY]
        unknown = [recipes.unknown_option(k, valid, f"{name} argument") for k in keywords if k not in known]
        if unknown:
            raise ConfigurationError(unknown)
        if options is not None and not isinstance(options, RunOptions):
            raise ConfigurationError(f"{name}(options=...) takes a phasetune.RunOptions, got {type(options).__name__}")
        return replace(options if options is not None else cls(), **keywords)


def prefix_cache_problems(value: Any) -> list[str]:
    """What is wrong with a front end's ``prefix_cache`` argument itself (its entries are checked against the
    schedule and model when the run is built)."""
    if value is None or isinstance(value, Mapping):
        return []
    return [f"prefix_cache must map phase indices to True, False or {{'prefix_end': ..., 'limit_mb': ...}} (e.g. "
            f"{{0: True}}), got {type(value).__name__} {value!r}"]


__all__ = ["RunOptions", "prefix_cache_problems"]
