"""The Trainer hook PhasetuneTrainerCallback needs: four public Trainer methods, overridden in a mixin.

``transformers.Trainer`` builds its optimizer once, in ``create_optimizer``, and on resume loads optimizer and
scheduler state before any callback event, so a callback alone can neither fit that optimizer to phase 0 nor
rebuild a saved phase's groups in time. ``create_optimizer`` and ``create_scheduler`` give the callback those
moments, ``train`` tells it which checkpoint it resumes, ``log`` adds each group's lr (``lr/phase1/layers.2-3``)
before the reporting integrations see the logs. docs/hf_trainer.md gives the order of events in ``train()``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from phasetune.errors import ConfigurationError
from phasetune.hf.callback import PhasetuneTrainerCallback, unwrap_optimizer
from phasetune.run.lora_glue import inject_adapters


class PhasetuneTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (first in the bases) to run a PhasetuneTrainerCallback."""

    @property
    def phasetune(self) -> PhasetuneTrainerCallback:
        """The PhasetuneTrainerCallback among the Trainer's callbacks (exactly one)."""
        found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, PhasetuneTrainerCallback)]  # type: ignore[attr-defined]
        if len(found) != 1:
            raise ConfigurationError(
                f"{type(self).__name__} runs exactly one PhasetuneTrainerCallback, found {len(found)}: pass "
                "callbacks=[PhasetuneTrainerCallback(schedule)]"
            )
        return found[0]

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        ft = self.phasetune
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)  # type: ignore[attr-defined]
            if resume_from_checkpoint is None:
                raise ConfigurationError(f"resume_from_checkpoint=True, but {self.args.output_dir} holds no "  # type: ignore[attr-defined]
                                         "checkpoint-* folder: pass a checkpoint path, or train without it")
        ft.resume_from = str(resume_from_checkpoint) if resume_from_checkpoint else None
        if self.model is not None:  # LoRA adapters a peft section asks for, before a checkpoint's weights load
            inject_adapters(self.model, ft.schedule_source)  # type: ignore[attr-defined]
        if ft.run is not None and ft.run.history:
            # this Trainer already ran a schedule: its optimizer holds every phase's groups. Start afresh,
            # as the Trainer itself does for a new model from model_init.
            self.optimizer, self.lr_scheduler = None, None
        return super().train(resume_from_checkpoint or None, *args, **kwargs)  # type: ignore[misc]

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        ft = self.phasetune
        if self.optimizer is not None and ft.run is not None and not ft.run.history:  # type: ignore[has-type]
            return self.optimizer  # type: ignore[has-type]  # built earlier in this train() (batch-size retry)
        ft.setup(self, self.model if model is None else model)  # type: ignore[arg-type, attr-defined]
        optimizer = super().create_optimizer(model)  # type: ignore[misc]
        ft.fit_optimizer(unwrap_optimizer(optimizer))
        return optimizer

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "learning_rate" in logs:  # a training log (evaluation logs carry no lr); at logging steps only
            logs.update({f"lr/{name}": lr for name, lr in self.phasetune.lrs().items()})
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        scheduler = super().create_scheduler(num_training_steps, optimizer)  # type: ignore[misc]
        self.phasetune.after_prepare(self)  # type: ignore[arg-type]
        return self.lr_scheduler if self.lr_scheduler is not None else scheduler  # type: ignore[has-type]


class PhasetuneTrainer(PhasetuneTrainerMixin, Trainer):
    """``transformers.Trainer`` with the hook a :class:`PhasetuneTrainerCallback` needs; otherwise unchanged."""


__all__ = ["PhasetuneTrainer", "PhasetuneTrainerMixin"]
