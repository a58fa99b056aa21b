"""PhasetuneTrainer under 2-process DDP (torchrun, gloo, CPU), run by tests/test_hf_ddp.py in one launch.

Also the tiny BERT, data and Trainer settings the single-process tests in tests/test_hf_*.py share, so both
sides build exactly the same runs.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
from transformers.utils import logging as hf_logging

from phasetune.hf import PhasetuneTrainer, PhasetuneTrainerCallback

VOCAB, SEQ = 64, 8

#: phase 0 ends at epoch 1, phase 1 when eval_loss stops improving (or at epoch 4), phase 2 runs to the end
DDP_SCHEDULE = {
    0: {"params": ["classifier.*", "bert.pooler.*"], "max_transition_epoch": 1},
    1: {"params": [r"bert\.encoder\.layer\.1\..*"], "lr": 0.05, "max_transition_epoch": 4},
    2: {"params": [r"bert\.encoder\.layer\.0\..*", "bert.embeddings.*"], "lr": 0.02},
}


class Tokens(torch.utils.data.Dataset):
    """Random token sequences labelled by their first token: a task a tiny BERT learns a little of."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, VOCAB, (n, SEQ), generator=g)
        self.labels = (self.ids[:, 0] < VOCAB // 2).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert(seed: int = 0, dropout: float = 0.1) -> BertForSequenceClassification:
    """2 layers, hidden 32, random weights (no download): 41 parameter tensors, 23k parameters."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=SEQ, num_labels=2,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(cfg)


def training_args(out: str | Path, **overrides: Any) -> TrainingArguments:
    """Quiet CPU settings: eval and save every epoch, eval_loss as the metric, nothing reported."""
    kw: dict[str, Any] = dict(
        output_dir=str(out), num_train_epochs=6, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        eval_strategy="epoch", save_strategy="epoch", metric_for_best_model="eval_loss", report_to=[],
        logging_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=1e-2, seed=0,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def trajectory(trainer: Any, ft: PhasetuneTrainerCallback) -> dict[str, Any]:
    model = trainer.model
    return {
        "depth": ft.depth,
        "trainable": sum(p.requires_grad for p in model.parameters()),
        "phases": [[r.start_epoch, r.end_epoch, r.end_reason] for r in ft.history],
        "groups": [[g.get("ft_phase", 0), len(g["params"]), g["lr"]] for g in trainer.optimizer.param_groups],
    }


def ddp_run(out: Path, name: str, resume: str | None = None, batch: int = 8) -> tuple[dict[str, Any], Any]:
    """SGD, no dropout, data in order: 2 ranks x 8 per step equal one process x 16 per step."""
    model = tiny_bert(dropout=0.0)
    ft = PhasetuneTrainerCallback(DDP_SCHEDULE, patience=1)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # under torchrun
    # average_tokens_across_devices=False: else the Trainer multiplies the loss by the number of processes for
    # models that take loss kwargs, which BERT's sequence-classification loss (a plain mean) then does not undo
    args = training_args(out / name, ddp_backend="gloo" if distributed else None, average_tokens_across_devices=False,
                         optim="sgd", learning_rate=0.1, max_grad_norm=0.0,
                         per_device_train_batch_size=batch,
                         lr_scheduler_type="constant", train_sampling_strategy="sequential")
    trainer = PhasetuneTrainer(model=model, args=args, train_dataset=Tokens(64, 0), eval_dataset=Tokens(32, 1),
                               callbacks=[ft])
    trainer.train(resume_from_checkpoint=resume)
    report = trajectory(trainer, ft)
    report["params"] = {n: p.detach().double().flatten().tolist() for n, p in model.named_parameters()}
    return report, trainer


def memory_check_run(out: Path) -> dict[str, Any]:
    """A run whose memory check finds that no phase fits (a 1.0001 GiB device: ~0.1 MiB after the 1 GiB reserve):
    rank 0 plans in a fresh process (the process group is up) and every rank raises its error before any step."""
    from phasetune import ConfigurationError

    ft = PhasetuneTrainerCallback(DDP_SCHEDULE, memory_check=1.0001)
    args = training_args(out / "memory_check", ddp_backend="gloo", average_tokens_across_devices=False)
    trainer = PhasetuneTrainer(model=tiny_bert(), args=args, train_dataset=Tokens(64, 0), eval_dataset=Tokens(32, 1),
                               callbacks=[ft])
    try:
        trainer.train()
    except ConfigurationError as e:
        return {"problems": e.problems, "steps": trainer.state.global_step}
    return {"problems": [], "steps": trainer.state.global_step}


def main() -> None:
    from launch import write_report

    warnings.simplefilter("ignore")
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    report: dict[str, Any] = {}
    report["run"], trainer = ddp_run(out, "run")
    # checkpoint after epoch 1 (4 steps per epoch): phase 1, restore-best snapshot and patience state inside
    report["resumed"], _ = ddp_run(out, "resumed", resume=str(out / "run" / "checkpoint-8"))
    report["world_size"] = trainer.args.world_size
    report["memory_check"] = memory_check_run(out)
    write_report(str(out), trainer.args.process_index, report)


if __name__ == "__main__":
    main()
