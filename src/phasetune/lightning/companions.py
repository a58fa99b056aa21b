"""The callbacks FinetuningScheduler works with: one FTSEarlyStopping that ends phases, FTSCheckpoints that
record phases, and the metric both follow.

:func:`configure_companions` runs in the scheduler's ``setup``, while Lightning is iterating
``trainer.callbacks`` to call every callback's ``setup``. It therefore never edits that list in place
(an insertion or removal would shift entries Lightning has not reached yet, which then miss their
``setup``): it assigns a new list, and calls ``setup`` itself on the callbacks it added or upgraded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from phasetune.errors import ConfigurationError
from phasetune.lightning import messages
from phasetune.lightning.early_stopping import FTSEarlyStopping
from phasetune.lightning.fts_checkpoint import FTSCheckpoint

if TYPE_CHECKING:
    import lightning.pytorch as pl

DEFAULT_MONITOR = "val_loss"


@dataclass
class Companions:
    """What :func:`configure_companions` settled on."""

    early_stopping: FTSEarlyStopping | None
    checkpoint: FTSCheckpoint | None
    monitor: str
    mode: str


def configure_companions(
    trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, scheduler: Any, *, epoch_transitions_only: bool,
    restore_best: bool,
) -> Companions:
    """Find, add or upgrade the early-stopping and checkpoint callbacks ``scheduler`` works with."""
    cbs: list[Callback] = list(trainer.callbacks)
    fresh: list[Callback] = []  # added or upgraded here: Lightning's setup loop will not reach them
    stoppers = [c for c in cbs if isinstance(c, EarlyStopping)]
    es: FTSEarlyStopping | None = None
    if epoch_transitions_only:
        cbs = [c for c in cbs if not isinstance(c, EarlyStopping)]
        if stoppers:
            messages.warn(
                f"epoch_transitions_only=True: removed {len(stoppers)} EarlyStopping callback(s); phases end at "
                "their max_transition_epoch / max_transition_step and the run ends after the final phase's."
            )
    else:
        odd = [type(c).__name__ for c in stoppers if not isinstance(c, FTSEarlyStopping) and type(c) is not EarlyStopping]
        if odd:
            raise ConfigurationError(
                f"{', '.join(odd)} subclasses EarlyStopping but not FTSEarlyStopping; phase transitions need "
                "FTSEarlyStopping (derive from it instead)"
            )
        if len(stoppers) > 1:
            raise ConfigurationError(
                f"found {len(stoppers)} EarlyStopping callbacks; FinetuningScheduler uses exactly one to end phases"
            )
        if stoppers and isinstance(stoppers[0], FTSEarlyStopping):
            es = stoppers[0]
        elif stoppers:
            es = FTSEarlyStopping.upgrade(stoppers[0])
            cbs[cbs.index(stoppers[0])] = es
            fresh.append(es)
        else:
            es = FTSEarlyStopping(monitor=DEFAULT_MONITOR, mode="min", patience=3)
            first_ckpt = next((i for i, c in enumerate(cbs) if isinstance(c, ModelCheckpoint)), len(cbs))
            cbs.insert(first_ckpt, es)  # before checkpoints, so they save its state of this epoch
            fresh.append(es)
            messages.warn(
                f"FinetuningScheduler added FTSEarlyStopping(monitor={DEFAULT_MONITOR!r}, patience=3) to end "
                "phases; pass your own FTSEarlyStopping to choose the metric and patience."
            )
        es.scheduler_callback = scheduler

    monitor = es.monitor if es is not None else DEFAULT_MONITOR
    mode = es.mode if es is not None else "min"
    ckpts = [c for c in cbs if isinstance(c, ModelCheckpoint)]
    checkpoint: FTSCheckpoint | None = None
    for c in ckpts:
        if isinstance(c, FTSCheckpoint):
            up = c
        elif type(c) is ModelCheckpoint:
            overrides = {}
            if c.monitor is None:
                overrides = {"monitor": monitor, "mode": mode}
                messages.warn(
                    f"FinetuningScheduler upgraded ModelCheckpoint(monitor=None) to FTSCheckpoint(monitor="
                    f"{monitor!r}, mode={mode!r}) so checkpoints and restore-best follow the phase metric; "
                    "pass an FTSCheckpoint to choose otherwise."
                )
            up = FTSCheckpoint.upgrade(c, **overrides)
            cbs[cbs.index(c)] = up
            fresh.append(up)
        else:
            continue
        up.scheduler_callback = scheduler
        if checkpoint is None:
            checkpoint = up
    if checkpoint is None and ckpts:
        messages.warn(f"{type(ckpts[0]).__name__} is not an FTSCheckpoint; checkpoint depths are not recorded.")
    if checkpoint is not None and checkpoint.monitor:
        monitor, mode = checkpoint.monitor, checkpoint.mode
    elif restore_best and epoch_transitions_only:
        messages.warn(
            f"restore_best=True with epoch_transitions_only=True: the best state is judged by {monitor!r}; "
            "pass an FTSCheckpoint(monitor=...) to choose the metric."
        )
    trainer.callbacks = cbs  # a new list: the one Lightning is iterating stays as it was
    for c in fresh:
        c.setup(trainer, pl_module, stage)
    return Companions(es, checkpoint, monitor, mode)
