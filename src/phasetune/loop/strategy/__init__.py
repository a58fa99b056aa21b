"""The plain-PyTorch face of phasetune: an FSDP2 training strategy for your own loop (no Lightning).

Use it with :class:`phasetune.loop.ScheduledFinetuning`; ``docs/plain_pytorch.md`` shows a complete loop.
"""

from phasetune.loop.strategy.checkpoint_dirs import CheckpointInfo, list_checkpoints
from phasetune.loop.strategy.fsdp2_strategy import FSDP2Strategy
from phasetune.sharding.units import block_plan

__all__ = ["CheckpointInfo", "FSDP2Strategy", "block_plan", "list_checkpoints"]
