"""phasetune: multi-phase scheduled fine-tuning (gradual unfreezing) for PyTorch and Lightning.

The core (schedules, the phase engine, transitions, snapshots) needs only torch. The Lightning names
(``FinetuningScheduler``, ``FTSEarlyStopping``, ``FTSCheckpoint``) are imported on first use, so
``import phasetune`` stays light for plain-PyTorch users.
"""

from __future__ import annotations

from typing import Any

from phasetune.engine import PhaseEngine, Transition
from phasetune.errors import ConfigurationError, PhasetuneError, ScheduleError, ScheduleGenerated
from phasetune.generate import generate_schedule
from phasetune.schedule import Phase, Schedule, resolve_schedule
from phasetune.snapshots import Snapshot, restore_snapshot, take_snapshot
from phasetune.transitions import PatienceTracker, phase_end_reason

__version__ = "0.1.0.dev0"

_LIGHTNING = {
    "FinetuningScheduler": "phasetune.lightning.callback",
    "PhaseRecord": "phasetune.lightning.callback",
    "FTSEarlyStopping": "phasetune.lightning.early_stopping",
    "FTSCheckpoint": "phasetune.lightning.checkpoint",
    "StrategyAdapter": "phasetune.lightning.adapters",
    "DDPStrategyAdapter": "phasetune.lightning.adapters",
}


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING:
        import importlib

        return getattr(importlib.import_module(_LIGHTNING[name]), name)
    raise AttributeError(f"module 'phasetune' has no attribute {name!r}")


__all__ = [
    "ConfigurationError",
    "DDPStrategyAdapter",
    "FTSCheckpoint",
    "FTSEarlyStopping",
    "FinetuningScheduler",
    "PatienceTracker",
    "Phase",
    "PhaseEngine",
    "PhaseRecord",
    "PhasetuneError",
    "Schedule",
    "ScheduleError",
    "ScheduleGenerated",
    "Snapshot",
    "StrategyAdapter",
    "Transition",
    "__version__",
    "generate_schedule",
    "phase_end_reason",
    "resolve_schedule",
    "restore_snapshot",
    "take_snapshot",
]
