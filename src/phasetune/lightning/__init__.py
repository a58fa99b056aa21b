"""Lightning integration: the FinetuningScheduler callback and its companions (the only Lightning users)."""

from phasetune.lightning.adapters import DDPStrategyAdapter, StrategyAdapter, register_adapter, select_adapter
from phasetune.lightning.callback import FinetuningScheduler, PhaseRecord
from phasetune.lightning.checkpoint import FTSCheckpoint
from phasetune.lightning.early_stopping import FTSEarlyStopping
from phasetune.lightning.fsdp import FSDPStrategyAdapter  # registers the adapter
from phasetune.lightning.fsdp2 import ModelParallelStrategyAdapter, export_full_model  # registers the adapter

__all__ = [
    "DDPStrategyAdapter",
    "FSDPStrategyAdapter",
    "FTSCheckpoint",
    "FTSEarlyStopping",
    "FinetuningScheduler",
    "ModelParallelStrategyAdapter",
    "PhaseRecord",
    "StrategyAdapter",
    "export_full_model",
    "register_adapter",
    "select_adapter",
]
