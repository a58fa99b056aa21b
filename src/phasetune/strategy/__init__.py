"""The plain-PyTorch face of phasetune: an FSDP2 training strategy for your own loop (no Lightning).

Use it with :class:`phasetune.loop.ScheduledFinetuning`; ``docs/plain_pytorch.md`` shows a complete loop.
"""

from phasetune.strategy.checkpoint import CheckpointInfo, list_checkpoints
from phasetune.strategy.fsdp2 import FSDP2Strategy, block_plan

__all__ = ["CheckpointInfo", "FSDP2Strategy", "block_plan", "list_checkpoints"]
