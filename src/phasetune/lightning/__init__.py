"""Lightning integration: the FinetuningScheduler callback and its companions (the only Lightning users)."""

from phasetune.lightning.adapters import DDPStrategyAdapter, StrategyAdapter, register_adapter, select_adapter
from phasetune.lightning.callback import FinetuningScheduler, PhaseRecord
from phasetune.lightning.early_stopping import FTSEarlyStopping

# importing the adapter modules registers their adapters
from phasetune.lightning.fsdp1_adapter import FSDPStrategyAdapter
from phasetune.lightning.fsdp2_adapter import ModelParallelStrategyAdapter, export_full_model
from phasetune.lightning.fts_checkpoint import FTSCheckpoint

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
