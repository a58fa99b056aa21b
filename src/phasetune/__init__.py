"""phasetune: multi-phase scheduled fine-tuning (gradual unfreezing) for PyTorch and Lightning.

The core (schedules, the phase engine, transitions, snapshots) needs only torch. The Lightning names
(``FinetuningScheduler``, ``FTSEarlyStopping``, ``FTSCheckpoint``, ...) and the distributed ones
(``FSDP2Strategy``, ``ScheduledFinetuning``) are imported on first use, so ``import phasetune`` stays
light and never imports Lightning or ``torch.distributed.checkpoint`` by itself.
"""

from __future__ import annotations

from typing import Any

from phasetune import _aliases  # first: installs the finder that keeps old module paths importing
from phasetune.core.engine import PhaseEngine, Transition
from phasetune.core.generate import generate_schedule
from phasetune.core.schedule import Phase, Schedule, resolve_schedule
from phasetune.core.transitions import PatienceTracker, phase_end_reason
from phasetune.errors import ConfigurationError, PhasetuneError, ScheduleError, ScheduleGenerated
from phasetune.features.audit import AuditError, AuditOptions, PhaseAudit, group_names
from phasetune.features.prefix_cache import (
    IndexedCollate,
    IndexedDataset,
    PrefixCache,
    PrefixCachePhases,
    find_prefix_end,
)
from phasetune.features.snapshots import Snapshot, restore_snapshot, take_snapshot
from phasetune.lr_shapes import WarmupLinearDecay
from phasetune.run import PhaseRecord, PhaseRun, RunEnv, RunOptions

__version__ = "0.1.0.dev0"

_LAZY = {
    "ScheduledFinetuning": "phasetune.loop",
    "AcceleratedFinetuning": "phasetune.loop.accelerated",
    "FSDP2Strategy": "phasetune.loop.strategy",
    "FinetuningScheduler": "phasetune.lightning.callback",
    "FTSEarlyStopping": "phasetune.lightning.early_stopping",
    "FTSCheckpoint": "phasetune.lightning.fts_checkpoint",
    "StrategyAdapter": "phasetune.lightning.adapters",
    "DDPStrategyAdapter": "phasetune.lightning.adapters",
    "ModelParallelStrategyAdapter": "phasetune.lightning.fsdp2_adapter",
    "FSDPStrategyAdapter": "phasetune.lightning.fsdp1_adapter",
    "export_full_model": "phasetune.lightning.fsdp2_adapter",
    "PhasetuneCLI": "phasetune.lightning.cli",
    "ValidationHistory": "phasetune.lightning.summary",
    "plot_phases": "phasetune.lightning.summary",
    "summary_table": "phasetune.lightning.summary",
    "PhasetuneTrainer": "phasetune.hf",
    "PhasetuneTrainerCallback": "phasetune.hf",
    "PhasetuneTrainerMixin": "phasetune.hf",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    if f"phasetune.{name}" in _aliases.ALIASES:  # `phasetune.engine` as an attribute: the old module path
        import importlib

        return importlib.import_module(f"phasetune.{name}")
    raise AttributeError(f"module 'phasetune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AcceleratedFinetuning",
    "AuditError",
    "AuditOptions",
    "ConfigurationError",
    "DDPStrategyAdapter",
    "FSDP2Strategy",
    "FSDPStrategyAdapter",
    "FTSCheckpoint",
    "FTSEarlyStopping",
    "FinetuningScheduler",
    "IndexedCollate",
    "IndexedDataset",
    "ModelParallelStrategyAdapter",
    "PatienceTracker",
    "Phase",
    "PhaseAudit",
    "PhaseEngine",
    "PhaseRecord",
    "PhaseRun",
    "PhasetuneCLI",
    "PhasetuneError",
    "PhasetuneTrainer",
    "PhasetuneTrainerCallback",
    "PhasetuneTrainerMixin",
    "PrefixCache",
    "PrefixCachePhases",
    "RunEnv",
    "RunOptions",
    "Schedule",
    "ScheduleError",
    "ScheduleGenerated",
    "ScheduledFinetuning",
    "Snapshot",
    "StrategyAdapter",
    "Transition",
    "ValidationHistory",
    "WarmupLinearDecay",
    "__version__",
    "export_full_model",
    "find_prefix_end",
    "generate_schedule",
    "group_names",
    "phase_end_reason",
    "plot_phases",
    "resolve_schedule",
    "restore_snapshot",
    "summary_table",
    "take_snapshot",
]
