"""``phasetune fit --baseline also`` prints the peak-memory ratio scheduled / full fine-tuning, measured beside the
one ``phasetune.plan`` gives for the same model, schedules and settings (phasetune.lightning.memory_ratio).

A tiny BERT (2 layers, hidden 32) built from its config inside a LightningModule; no download.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from distributed.hf_scenarios import SEQ, Tokens, tiny_bert
from phasetune.core.schedule import resolve_schedule
from phasetune.lightning.cli import main
from phasetune.lightning.memory_ratio import FitFacts, plan_kwargs
from phasetune.plan import model_for_plan, plan_memory

pytestmark = pytest.mark.usefixtures("plain_process")

BERT_SCHEDULE = {
    0: {"params": [r"model\.classifier\..*", r"model\.bert\.pooler\..*"], "max_transition_epoch": 1},
    1: {"params": [r"model\.bert\.encoder\.layer\.1\..*"], "lr": 0.01, "max_transition_epoch": 2},
    2: {"params": [r"model\.bert\.encoder\.layer\.0\..*"], "lr": 0.01},
}
TOY_SCHEDULE = {0: {"params": ["model.head.*"], "max_transition_epoch": 1},
                1: {"params": [r"model\.layers\..*", "model.embed.*"], "lr": 0.02}}


class BertModule(pl.LightningModule):
    """The tiny BERT as ``self.model`` (schedule names start with ``model.``), AdamW over every parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_bert(dropout=0.0)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(Tokens(64, 0), batch_size=8, shuffle=True)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(Tokens(16, 1), batch_size=16)


def fit_with_baseline(tmp_path: Path, model: str, schedule: dict) -> None:
    """``phasetune fit --baseline also`` of ``model`` (a class path) for 3 epochs of 2 batches."""
    sched_file = tmp_path / "schedule.yaml"
    sched_file.write_text(yaml.safe_dump(schedule))
    config = {
        "seed_everything": 0, "baseline": "also", "plot": False,
        "trainer": {"accelerator": "cpu", "max_epochs": 3, "limit_train_batches": 2, "limit_val_batches": 1,
                    "default_root_dir": str(tmp_path), "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0, "log_every_n_steps": 1,
                    "callbacks": [{"class_path": "phasetune.FinetuningScheduler",
                                   "init_args": {"ft_schedule": str(sched_file)}}]},
        "model": {"class_path": model},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["fit", "--config", str(path)]) == 0


def ratio_rows(out: str) -> dict[str, list[str]]:
    """The rows of the printed ratio table, by their first column."""
    block = out[out.index("phasetune: peak memory, scheduled / full fine-tuning"):].splitlines()
    rows = {}
    for line in block[3:]:
        m = re.match(r"(measured peak|measured, added in the fit|planned peak|planned, above the weights) +(.*)$", line)
        if m is None:
            break
        rows[m.group(1)] = re.split(r" {2,}", m.group(2).strip())
    return rows


@pytest.mark.filterwarnings("ignore:Module is None:UserWarning")  # torch's module tracker, on frozen blocks
def test_the_planned_ratio_is_that_of_the_two_plans_of_the_same_inputs(tmp_path, capsys):
    fit_with_baseline(tmp_path, "test_fit_memory_ratio.BertModule", BERT_SCHEDULE)
    out = capsys.readouterr().out
    rows = ratio_rows(out)
    names = [n for n, _ in BertModule().named_parameters()]
    config, prefix = model_for_plan(BertModule())
    settings = dict(strategy="single", world_size=1, micro_batch=8, seq_len=SEQ, param_dtype="float32",
                    search_micro_batch=False, name_prefix=prefix, optimizer="adamw", optimizer_impl="single_tensor",
                    optimizer_kwargs={"amsgrad": False, "weight_decay": 0.01, "maximize": False})
    scheduled = plan_memory(resolve_schedule(BERT_SCHEDULE, names).to_dict(), config, **settings)
    full = plan_memory({0: {"params": names}}, config, **settings)
    top_s, top_f = max(scheduled.phases, key=lambda p: p.peak), max(full.phases, key=lambda p: p.peak)
    # exact: the same planning code on the same inputs, compared as printed (3 decimals)
    assert rows["planned peak"][-1] == f"{top_s.peak / top_f.peak:.3f}x"
    assert rows["planned, above the weights"][-1] == f"{(top_s.peak - top_s.params) / (top_f.peak - top_f.params):.3f}x"
    assert top_s.peak < top_f.peak  # the schedule never trains the embeddings: a smaller planned peak
    assert re.fullmatch(r"\d+\.\d{3}x", rows["measured peak"][-1])
    assert re.fullmatch(r"\d+\.\d{3}x", rows["measured, added in the fit"][-1])
    assert f"one device, micro-batch 8 x {SEQ} tokens (sequence length: the first 8 sample(s) of the training set, " \
           "collated), float32 parameters, AdamW (single-tensor)" in out
    assert "the scheduled run's 3 phase(s) as resolved vs. one phase of the 41 parameter tensors the baseline trains" in out
    assert re.search(r"planned in \d+\.\d s", out)


def test_a_model_the_plan_cannot_rebuild_prints_the_measured_ratio_and_one_skip_line(tmp_path, capsys):
    fit_with_baseline(tmp_path, "helpers.ToyModule", TOY_SCHEDULE)
    out = capsys.readouterr().out
    rows = ratio_rows(out)
    assert list(rows) == ["measured peak", "measured, added in the fit"]
    skipped = [line for line in out.splitlines() if "planned peak memory ratio skipped" in line]
    assert skipped == ["phasetune: planned peak memory ratio skipped: ToyModule is no Hugging Face model, nor holds "
                       "exactly one and nothing else, so phasetune.plan cannot rebuild it from a config; `phasetune "
                       "schedule plan --model package.module:factory` plans a model a factory builds"]


def test_the_sequence_length_is_the_datamodules_max_length_when_it_has_one():
    facts = FitFacts(module=BertModule(), loader={"micro_batch": 16, "dataset": Tokens(4, 0)}, max_length=48)
    kwargs, what = plan_kwargs(facts, "model")
    assert (kwargs["micro_batch"], kwargs["seq_len"]) == (16, 48)
    assert "micro-batch 16 x 48 tokens (sequence length: the datamodule's max_length)" in what
