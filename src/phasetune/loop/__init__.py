"""The plain-PyTorch front end: :class:`ScheduledFinetuning` in your own loop, and the FSDP2 strategy for it
(:mod:`phasetune.loop.strategy`)."""

from phasetune.loop.finetuning import PhaseSummary, ScheduledFinetuning
from phasetune.loop.run_facts import loop_facts
from phasetune.run import NON_FINITE

__all__ = ["NON_FINITE", "PhaseSummary", "ScheduledFinetuning", "loop_facts"]
