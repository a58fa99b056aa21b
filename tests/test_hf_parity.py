"""phasetune.hf: the Hugging Face Trainer runs a schedule as the Lightning callback and the plain loop do, epoch by
epoch and step by step (the toy network, CPU)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

from distributed.hf_scenarios import training_args
from helpers import ToyModule, dataset, float32_drift, trainer
from loop_runs import MIXED, MIXED_VAL_LOSSES, RESTARTS, STEP_VAL_LOSSES, STEPS, epoch_loop_run, step_loop_run
from phasetune import FinetuningScheduler, FTSEarlyStopping
from phasetune.core.param_groups import PHASE_KEY
from phasetune.hf import PhasetuneTrainer, PhasetuneTrainerCallback

pytestmark = pytest.mark.usefixtures("plain_process")  # the Trainers run as one plain process
hf_logging.set_verbosity_error()

# The weights of two front ends are compared numerically: the same losses and steps, through other code (the
# Trainer's loss and optimizer wrappers, Lightning's closure) that may order a sum otherwise; sums of 16 terms
# (the toy network's width, the batch), weights below 1, over the runs' optimizer steps (float32_drift)


def per_epoch(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    """What trains in an epoch: the thawed names and each phase's lrs (the Trainer splits decay groups)."""
    thawed = tuple(sorted(n for n, p in model.named_parameters() if p.requires_grad))
    lrs: dict[int, set] = {}
    for g in optimizer.param_groups:
        if g["params"]:
            lrs.setdefault(g.get(PHASE_KEY, 0), set()).add(round(g["lr"], 12))
    return thawed, sorted((k, sorted(v)) for k, v in lrs.items())


class ToyForTrainer(nn.Module):
    """The Lightning ToyModule's network (same names, same init under the same seed) with a Trainer forward."""

    def __init__(self) -> None:
        super().__init__()
        self.model = ToyModule().model

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.model(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.x, self.y = dataset(n, seed).tensors

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class RecordEpochs(TrainerCallback):
    """Per-epoch trajectory, read after PhasetuneTrainerCallback's epoch-begin event (it comes later in the list)."""

    def __init__(self) -> None:
        self.epochs: list[tuple] = []

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.epochs.append(per_epoch(model, optimizer))


def trainer_parity_run(tmp_path):
    torch.manual_seed(0)
    model = ToyForTrainer()
    evaluations = iter(range(100))

    def scripted(_):  # the Lightning module's scripted val_loss of the same epoch
        return {"scripted": MIXED_VAL_LOSSES[min(next(evaluations), len(MIXED_VAL_LOSSES) - 1)]}

    ft = PhasetuneTrainerCallback(MIXED, patience=2)
    rec = RecordEpochs()
    args = training_args(tmp_path / "hf", num_train_epochs=12, per_device_train_batch_size=16, save_strategy="no",
                         metric_for_best_model="scripted", greater_is_better=False, optim="sgd",
                         optim_args="momentum=0.9", learning_rate=0.1, lr_scheduler_type="constant",
                         max_grad_norm=0.0, train_sampling_strategy="sequential")
    t = PhasetuneTrainer(model=model, args=args, train_dataset=Pairs(64, 0), eval_dataset=Pairs(32, 1),
                         compute_metrics=scripted, callbacks=[ft, rec])
    t.train()
    return model, ft, rec.epochs


def lightning_parity_run(tmp_path):
    torch.manual_seed(0)
    module = ToyModule(val_losses=MIXED_VAL_LOSSES, lr=0.1)

    class Record(pl.Callback):
        def __init__(self) -> None:
            self.epochs: list[tuple] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.epochs.append(per_epoch(pl_module, trainer.optimizers[0]))

    rec = Record()
    fts = FinetuningScheduler(ft_schedule=MIXED)
    t = trainer(tmp_path / "pl", [fts, FTSEarlyStopping(monitor="val_loss", patience=2), rec], max_epochs=12,
                enable_checkpointing=False)
    t.fit(module)
    return module, fts, rec.epochs


@pytest.mark.numerical
def test_the_trainer_the_lightning_callback_and_the_loop_run_the_same_schedule_alike(tmp_path):
    hf_model, hf_ft, hf_epochs = trainer_parity_run(tmp_path)
    pl_module, pl_fts, pl_epochs = lightning_parity_run(tmp_path)
    loop_module, loop_ft, loop_epochs = epoch_loop_run(record=per_epoch)
    assert hf_epochs == pl_epochs == loop_epochs  # thawed set and each phase's lr, epoch by epoch
    assert len({e[0] for e in hf_epochs}) == 3
    rows = [[(r.depth, r.start_epoch, r.end_epoch, r.end_reason, r.best_epoch, r.restored_best) for r in h]
            for h in (hf_ft.history, pl_fts.history, loop_ft.history)]
    assert rows[0] == rows[1] == rows[2]
    reference = dict(loop_module.named_parameters())
    for other in (hf_model, pl_module):
        for n, p in other.named_parameters():  # numerical (front ends): up to 12 epochs of 4 steps
            torch.testing.assert_close(p, reference[n], rtol=0, atol=float32_drift(48, 16), msg=n)


class RecordSteps(TrainerCallback):
    """Per-step trajectory: what trains in each optimizer step, read before it."""

    def __init__(self) -> None:
        self.steps: list[tuple] = []

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.steps.append(per_epoch(model, optimizer))


@pytest.mark.numerical
@pytest.mark.parametrize("which", ["STEPS", "RESTARTS"])  # RESTARTS: phase 0's own scheduler, a new optimizer
def test_a_step_capped_schedule_runs_alike_under_the_trainer_and_the_loop(tmp_path, which):
    schedule = {"STEPS": STEPS, "RESTARTS": RESTARTS}[which]
    epochs, restore_best = 4 if which == "STEPS" else 3, which == "STEPS"
    torch.manual_seed(0)
    model = ToyForTrainer()
    evaluations = iter(range(100))
    ft = PhasetuneTrainerCallback(schedule, patience=2, restore_best=restore_best)
    rec = RecordSteps()
    args = training_args(tmp_path / "hf", num_train_epochs=epochs, per_device_train_batch_size=16,
                         save_strategy="no", metric_for_best_model="scripted", greater_is_better=False, optim="sgd",
                         optim_args="momentum=0.9", learning_rate=0.1, lr_scheduler_type="constant",
                         max_grad_norm=0.0, train_sampling_strategy="sequential")
    t = PhasetuneTrainer(model=model, args=args, train_dataset=Pairs(64, 0), eval_dataset=Pairs(32, 1),
                         compute_metrics=lambda _: {"scripted": STEP_VAL_LOSSES[next(evaluations)]},
                         callbacks=[ft, rec])
    t.train()
    loop_module, loop_ft, loop_steps, _ = step_loop_run(schedule, steps=4 * epochs, record=per_epoch,
                                                        restore_best=restore_best)
    assert rec.steps == loop_steps  # thawed set and each phase's lrs, step by step (warm-ups restarting)
    rows = [[(r.depth, r.start_epoch, r.start_step, r.end_step, r.end_reason, r.restored_best) for r in h]
            for h in (ft.history, loop_ft.history)]
    assert rows[0][:2] == rows[1][:2] and rows[0][2][:3] == rows[1][2][:3]
    reference = dict(loop_module.named_parameters())
    for n, p in model.named_parameters():  # numerical (front ends): at most 16 steps
        torch.testing.assert_close(p, reference[n], rtol=0, atol=float32_drift(16, 16), msg=n)
