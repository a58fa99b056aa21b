"""Learning-rate shapes for scheduled fine-tuning, as ordinary torch lr schedulers.

:class:`WarmupLinearDecay` warms every group up linearly to its lr, then decays it linearly to
``end_factor`` times that lr. Give each phase a new one (the schedule key ``new_lr_scheduler``) and the
shape restarts at every transition: the groups of earlier phases warm up again to the lr they were
created with, the new phase's groups to their own. A schedule file names it like any other scheduler::

    new_lr_scheduler:
      lr_scheduler_init:
        class_path: phasetune.lr_shapes.WarmupLinearDecay
        init_args: {total_steps: 40, warmup_steps: 4}
      pl_lrs_cfg: {interval: step}       # Lightning: step it every optimizer step, not every epoch
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupLinearDecay(LRScheduler):
    """Linear warm-up over ``warmup_steps``, then linear decay to ``end_factor`` at ``total_steps``.

    The factor applied to each group's initial lr at scheduler step ``t`` (0 before the first
    ``step()``) is ``(t + 1) / (warmup_steps + 1)`` while ``t < warmup_steps``, then falls linearly from 1
    at ``t = warmup_steps`` to ``end_factor`` at ``t = total_steps`` and stays there. So the first
    optimizer step never runs at lr 0, and the lr reaches its peak right after the warm-up. The factor
    is a function of ``t`` alone, so groups that phasetune adds later follow the same shape from where it
    is (``base_lrs`` gets their lr).

    Args:
        optimizer: the optimizer whose groups it drives.
        total_steps: steps of the whole shape (a phase's length in optimizer steps), >= 1.
        warmup_steps: steps of the linear warm-up, 0 <= warmup_steps < total_steps.
        end_factor: fraction of the initial lr reached at ``total_steps`` (0 ends at lr 0).
        last_epoch: torch's resume argument (the index of the last step taken).
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, end_factor: float = 0.0,
                 last_epoch: int = -1) -> None:
        problems = []
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            problems.append(f"total_steps must be an integer >= 1, got {total_steps!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            problems.append(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        elif isinstance(total_steps, int) and warmup_steps >= total_steps >= 1:
            problems.append(f"warmup_steps ({warmup_steps}) must be less than total_steps ({total_steps})")
        if isinstance(end_factor, bool) or not isinstance(end_factor, (int, float)) or not 0.0 <= end_factor <= 1.0:
            problems.append(f"end_factor must be a number in [0, 1], got {end_factor!r}")
        if problems:
            raise ValueError("WarmupLinearDecay: " + "; ".join(problems))
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.end_factor = float(end_factor)
        super().__init__(optimizer, last_epoch)

    def factor(self, t: int) -> float:
        """The multiplier of each group's initial lr at scheduler step ``t``."""
        t = max(t, 0)
        if t < self.warmup_steps:
            return (t + 1) / (self.warmup_steps + 1)
        if t >= self.total_steps:
            return self.end_factor
        left = (self.total_steps - t) / (self.total_steps - self.warmup_steps)
        return self.end_factor + (1.0 - self.end_factor) * left

    def get_lr(self) -> list[float]:  # type: ignore[override]
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()
