"""Lightning integration: the FinetuningScheduler callback and its companions (the only Lightning users)."""

from phasetune.lightning.adapters import DDPStrategyAdapter, StrategyAdapter, register_adapter, select_adapter
from phasetune.lightning.callback import FinetuningScheduler, PhaseRecord
from phasetune.lightning.checkpoint import FTSCheckpoint
from phasetune.lightning.early_stopping import FTSEarlyStopping

__all__ = [
    "DDPStrategyAdapter",
    "FTSCheckpoint",
    "FTSEarlyStopping",
    "FinetuningScheduler",
    "PhaseRecord",
    "StrategyAdapter",
    "register_adapter",
    "select_adapter",
]
