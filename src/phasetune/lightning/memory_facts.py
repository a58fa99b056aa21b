"""The memory check of a Lightning fit (``memory_check``, :mod:`phasetune.run.memory_check`), at ``on_train_start``.

What only the Trainer knows of the run: the strategy (``ModelParallelStrategy`` is FSDP2 with the adapter's
``fsdp_plan``, reducing gradients on every micro-step; ``FSDPStrategy`` FSDP1; ``DDPStrategy`` DDP; anything
else one device), the world size, autocast precision outside FSDP2, gradient accumulation, the training loader
(built by ``on_train_start``, never iterated here) and the optimizer from ``configure_optimizers``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from phasetune.run.memory_check import RunShape, check_memory, loader_shape

if TYPE_CHECKING:
    import lightning.pytorch as pl

#: Lightning's mixed precision settings -> the plan's autocast dtype
PRECISIONS = {"bf16-mixed": "bf16", "16-mixed": "fp16"}


def strategy_kind(strategy: Any) -> str:
    """The plan's strategy for a Lightning strategy (by class, subclasses included)."""
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if "ModelParallelStrategy" in names:
        return "fsdp2"
    if "FSDPStrategy" in names:
        return "fsdp1"
    return "ddp" if "DDPStrategy" in names else "single"


def check_at_train_start(fts: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Plan the fit ``fts`` (a FinetuningScheduler) runs when its ``memory_check`` asks for it; raises on every rank
    before the first training step when a phase will not fit."""
    kind = strategy_kind(trainer.strategy)
    cfg = fts.strategy_adapter_cfg if kind == "fsdp2" else {}
    shape = RunShape(
        kind, trainer.world_size, fsdp_plan=cfg.get("fsdp_plan"), fsdp_default_kwargs=cfg.get("fsdp_default_kwargs"),
        # FSDP2 under Lightning autocasts around fp32 gathers (no mp_policy unless the plan's kwargs set one)
        mixed_precision=None if kind == "fsdp2" else PRECISIONS.get(str(trainer.precision)),
        sync_every_micro_step=kind == "fsdp2", accumulation=int(trainer.accumulate_grad_batches),
        device=pl_module.device, **loader_shape(trainer.train_dataloader))
    check_memory(fts.run, pl_module, trainer.optimizers[0] if len(trainer.optimizers) == 1 else None, shape)


__all__ = ["PRECISIONS", "check_at_train_start", "strategy_kind"]
