"""The memory check at fit start (``memory_check``, phasetune.run.memory_check): every front end plans the run before
phase 0 and raises naming each phase that will not fit, before any optimizer step; off by default off CUDA.

A tiny BERT (2 layers, hidden 32) built locally. On this CPU machine a device size turns the check on: 80 GiB fits
anything here, 1.0001 GiB leaves a budget of about 0.1 MiB after the default 1 GiB reserve, which no phase fits.
The 2-process run (every rank raises the same error) is in tests/test_hf_ddp.py, in its one launch.
"""

from __future__ import annotations

import logging
import random
import re

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from distributed.hf_scenarios import DDP_SCHEDULE, Tokens, tiny_bert, training_args
from helpers import trainer
from phasetune import ConfigurationError, FinetuningScheduler, RunOptions, ScheduledFinetuning
from phasetune.run import memory_check
from phasetune.run.memory_check import RunShape, check_memory, loader_shape, noted_shape

pytestmark = pytest.mark.usefixtures("plain_process")

#: LoRA on the attention's query and value, then the top layer's base weights with its adapters merged
LORA_SCHEDULE = {
    "peft": {"method": "lora", "r": 4, "alpha": 8},
    0: {"params": ["classifier.*", r"bert\.encoder\.layer\.\d\.attention\.self\.(query|value)\.lora_.*"],
        "max_transition_step": 2},
    1: {"params": [r"bert\.encoder\.layer\.1\.attention\.self\.(query|value)\.base_layer\..*"], "lr": 1e-4,
        "merge_lora": True},
}
FITS, TIGHT = 80, 1.0001  # GiB: far more than a tiny BERT needs; a ~0.1 MiB budget after the 1 GiB reserve


def loader(batch: int = 8) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(Tokens(64, 0), batch_size=batch, shuffle=True)


def loop_run(**kw):
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer, ScheduledFinetuning(DDP_SCHEDULE, model, optimizer, **kw)


def check_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "memory check" in r.getMessage()]


def problems_of(error: pytest.ExceptionInfo) -> list[str]:
    return error.value.problems


# ------------------------------------------------------------------------------------------------ the option
@pytest.mark.parametrize("value, says", [
    ("yes", "memory_check must be None (on for a CUDA device), False, True, the device's size in GiB or a mapping"),
    (-1, "memory_check as a number is the device's size in GiB and must be > 0, got -1"),
    ({"devce_gib": 80}, "unknown memory_check key 'devce_gib'; did you mean 'device_gib'?"),
    ({"seq_len": 0}, "memory_check['seq_len'] must be an integer >= 1, got 0"),
    ({"micro_batch": 2.5}, "memory_check['micro_batch'] must be an integer >= 1, got 2.5"),
    ({"device_gib": "80"}, "memory_check['device_gib'] must be the device's size in GiB (> 0), got '80'"),
    ({"name_prefix": "model"}, "memory_check['name_prefix'] goes with memory_check['model']"),
])
def test_a_bad_memory_check_is_refused_naming_the_key(value, says):
    assert [p for p in RunOptions(memory_check=value).problems(explicit_schedule=True) if says in p]
    with pytest.raises(ConfigurationError, match=re.escape(says)):
        FinetuningScheduler(DDP_SCHEDULE, memory_check=value)
    with pytest.raises(ConfigurationError, match=re.escape(says)):
        loop_run(memory_check=value)


@pytest.mark.parametrize("value", [None, False, True, 80, 79.5, {}, {"device_gib": 80, "model": "pkg.mod:factory",
                                                                 "name_prefix": "model", "seq_len": 512, "micro_batch": 4}])
def test_the_documented_forms_are_accepted(value):
    assert RunOptions(memory_check=value).problems(explicit_schedule=True) == []


def test_memory_check_true_off_cuda_asks_for_the_device_size():
    with pytest.raises(ConfigurationError, match=r"memory_check=True needs the device's size, and the run's device "
                                                 r"\(cpu\) is not a CUDA device: give it in GiB, memory_check=80"):
        loop_run(memory_check=True, train_loader=loader())


def test_the_default_is_off_on_cpu_no_plan_no_message(caplog, monkeypatch):
    import phasetune.plan.planner as planner

    def no_plan(*args, **kwargs):
        raise AssertionError("the default planned on CPU")

    monkeypatch.setattr(planner, "plan_memory", no_plan)
    with caplog.at_level(logging.INFO, logger="phasetune"):
        loop_run(train_loader=loader())
    assert check_lines(caplog) == []


# ------------------------------------------------------------------------------------------------ the plain loop
def test_the_loop_raises_before_phase_0_naming_each_phase_that_will_not_fit():
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ConfigurationError) as e:
        ScheduledFinetuning(DDP_SCHEDULE, model, optimizer, train_loader=loader(), memory_check=TIGHT)
    lines = problems_of(e)
    assert [line.split(":")[0] for line in lines[:3]] == [f"phase {k} will not fit" for k in range(3)]
    assert " MiB over the 0.10 MiB budget (1.0001 GiB less 1.0 GiB reserve" in lines[0]  # small sizes in MiB
    assert lines[-1].startswith("(memory check before phase 0: BertForSequenceClassification")
    assert "micro-batch 8 x 8 tokens (sequence length from the first 8 sample(s) of the training set" in lines[-1]
    assert "memory_check=False switches the check off" in lines[-1]
    assert optimizer.state == {}  # no step was taken
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # exact: untouched weights


def test_max_depth_limits_the_check_to_the_phases_the_run_reaches():
    with pytest.raises(ConfigurationError) as e:
        loop_run(train_loader=loader(), memory_check=TIGHT, max_depth=1)
    assert [line.split(":")[0] for line in problems_of(e)[:-1]] == ["phase 0 will not fit", "phase 1 will not fit"]


def test_the_loop_passes_with_one_line_when_every_phase_fits(caplog):
    with caplog.at_level(logging.INFO, logger="phasetune"):
        loop_run(train_loader=loader(), memory_check=FITS)
    start, end = check_lines(caplog)
    assert start.startswith("phasetune: memory check: planning 3 phase(s) before phase 0 (one device, micro-batch 8 x 8")
    assert re.match(r"phasetune: memory check: every phase fits on a 80 GiB device: peak phase 2 [\d.]+ MiB at "
                    r"bert\.\S+ \(backward\), 75\.24 GiB headroom \(planned in [\d.]+ s\)$", end), end


def test_a_bfloat16_model_is_planned_in_its_dtype_not_skipped(caplog):
    model = tiny_bert().to(torch.bfloat16)  # a large model is usually loaded in bf16
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with caplog.at_level(logging.INFO, logger="phasetune"):
        ScheduledFinetuning(DDP_SCHEDULE, model, optimizer, train_loader=loader(), memory_check=FITS)
    assert "every phase fits on a 80 GiB device" in check_lines(caplog)[-1]


def test_a_lora_schedule_is_planned_with_the_runs_adapters(caplog):
    pytest.importorskip("peft")
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with caplog.at_level(logging.INFO, logger="phasetune"):
        ScheduledFinetuning(LORA_SCHEDULE, model, optimizer, train_loader=loader(), memory_check=FITS)
    assert "every phase fits on a 80 GiB device" in check_lines(caplog)[-1]  # not skipped: the plan found the adapters


def test_fit_start_draws_no_random_numbers():
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    random.seed(1)
    state = (random.getstate(), torch.get_rng_state())
    ScheduledFinetuning(DDP_SCHEDULE, model, optimizer, train_loader=loader(), memory_check=FITS)
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])  # exact: the same state


def test_an_unknown_sequence_length_skips_the_check_with_one_warning(caplog):
    with caplog.at_level(logging.INFO, logger="phasetune"):
        loop_run(memory_check=FITS)  # no train_loader: neither the micro-batch nor the sequence length is known
    (line,) = check_lines(caplog)
    assert line == ("phasetune: memory check skipped: the run's micro-batch size and sequence length is unknown (no "
                    "training set given); give memory_check={'micro_batch': N, 'seq_len': N} (with 'device_gib' off "
                    "CUDA); memory_check=False switches the check off")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="phasetune"):
        loop_run(memory_check={"device_gib": FITS, "micro_batch": 8, "seq_len": 8})
    assert "every phase fits" in check_lines(caplog)[-1]


def test_the_sequence_length_comes_from_an_indexed_micro_batch_not_from_the_loader():
    data = loader(batch=4)
    shape = loader_shape(data)
    assert (shape["micro_batch"], shape["dataset"], shape["collate_fn"]) == (4, data.dataset, data.collate_fn)
    assert memory_check.seq_len_of(data.dataset, data.collate_fn, 4) == (8, "the first 4 sample(s) of the training set, "
                                                                          "collated")
    texts = [{"input_ids": [1, 2, 3], "text": "a"}, {"input_ids": [1, 2, 3, 4, 5], "text": "b"}]  # a Trainer's rows

    def pads_tensors_only(samples):
        return {k: torch.tensor([s[k] for s in samples]) for k in samples[0]}  # refuses ragged lists and text
    assert memory_check.seq_len_of(texts, pads_tensors_only, 2) == (5, "the input_ids of the first 2 sample(s) of the "
                                                                     "training set")
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            raise AssertionError("the check iterated the training set")

    assert memory_check.seq_len_of(Stream(), None, 4) == (None, "the training set is no map-style dataset (Stream)")


# ------------------------------------------------------------------------------------------------ models
class Holder(nn.Module):
    """A model the plan cannot rebuild from a config (no Hugging Face model inside); named, the plan builds it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def example_inputs(self, micro_batch: int, seq_len: int) -> tuple[torch.Tensor]:
        return (torch.randn(micro_batch, 8),)


HOLDER_SCHEDULE = {0: {"params": ["net.1.*"]}, 1: {"params": ["net.0.*"]}}


def test_a_model_the_plan_cannot_rebuild_is_an_error_when_asked_for_and_one_warning_by_default(caplog, monkeypatch):
    import phasetune.plan.fit_check as fit_check

    model = Holder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = HOLDER_SCHEDULE
    with pytest.raises(ConfigurationError, match=re.escape("the memory plan cannot rebuild Holder under fake tensors")):
        ScheduledFinetuning(schedule, model, optimizer, memory_check={"device_gib": FITS, "micro_batch": 4, "seq_len": 8})
    # the default on a CUDA device (its size read): a warning, and the run goes on
    ft = ScheduledFinetuning(schedule, Holder(), torch.optim.SGD(Holder().parameters(), lr=0.1), memory_check=False)
    ft.run.options.memory_check = None
    monkeypatch.setattr(fit_check, "device_gib", lambda device=None: 80.0)
    with caplog.at_level(logging.INFO, logger="phasetune"):
        assert check_memory(ft.run, ft.model, ft.optimizer, RunShape(micro_batch=4, device="cuda:0")) is None
    (line,) = check_lines(caplog)
    assert line.startswith("phasetune: memory check skipped: the memory plan cannot rebuild Holder under fake tensors")
    assert "give memory_check={'model': 'path/to/config.json' or 'package.module:factory'" in line


def test_a_model_named_in_memory_check_is_planned_from_its_factory(caplog):
    model = Holder()
    with caplog.at_level(logging.INFO, logger="phasetune"):
        ScheduledFinetuning(HOLDER_SCHEDULE, model, torch.optim.SGD(model.parameters(), lr=0.1), memory_check={
            "device_gib": FITS, "model": "test_memory_check:Holder", "micro_batch": 2, "seq_len": 8})
    assert check_lines(caplog)[-1].startswith("phasetune: memory check: every phase fits on a 80 GiB device")


# ------------------------------------------------------------------------------------------------ other front ends
def test_the_hugging_face_trainer_raises_before_its_first_step(tmp_path):
    from phasetune.hf import PhasetuneTrainer, PhasetuneTrainerCallback

    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = PhasetuneTrainer(model=model, args=training_args(tmp_path, num_train_epochs=1), train_dataset=Tokens(64, 0),
                         eval_dataset=Tokens(32, 1), callbacks=[PhasetuneTrainerCallback(DDP_SCHEDULE, memory_check=TIGHT)])
    with pytest.raises(ConfigurationError) as e:
        t.train()
    assert problems_of(e)[0].startswith("phase 0 will not fit")
    assert "micro-batch 8 x 8 tokens" in problems_of(e)[-1]  # per_device_train_batch_size, the collated Tokens
    assert t.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # exact: untouched weights


def test_accelerate_raises_at_construction():
    from accelerate import Accelerator

    from phasetune import AcceleratedFinetuning

    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ConfigurationError) as e:
        AcceleratedFinetuning(DDP_SCHEDULE, Accelerator(cpu=True), model, optimizer,
                              memory_check={"device_gib": TIGHT, "micro_batch": 8, "seq_len": 8})
    assert problems_of(e)[0].startswith("phase 0 will not fit")
    assert "one device, micro-batch 8 x 8 tokens (sequence length from memory_check's seq_len)" in problems_of(e)[-1]


class BertModule(pl.LightningModule):
    """A LightningModule holding the tiny BERT as ``self.model``: the schedule's names start with ``model.``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_bert()
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return loader()

    def val_dataloader(self):
        return torch.utils.data.DataLoader(Tokens(32, 1), batch_size=16)


LIGHTNING_SCHEDULE = {k: {**v, "params": [f"model.{p}" for p in v["params"]]} for k, v in DDP_SCHEDULE.items()}


def test_lightning_raises_before_its_first_training_step(tmp_path):
    module = BertModule()
    fts = FinetuningScheduler(LIGHTNING_SCHEDULE, memory_check=TIGHT)
    with pytest.raises(ConfigurationError) as e:
        trainer(tmp_path, [fts], max_epochs=1).fit(module)
    assert [line.split(":")[0] for line in problems_of(e)[:3]] == [f"phase {k} will not fit" for k in range(3)]
    assert "BertForSequenceClassification from a BertConfig (as 'model')" in problems_of(e)[-1]
    assert module.steps == 0


def test_lightning_trains_after_a_check_that_fits(tmp_path, caplog):
    module = BertModule()
    with caplog.at_level(logging.INFO, logger="phasetune"):
        trainer(tmp_path, [FinetuningScheduler(LIGHTNING_SCHEDULE, memory_check=FITS)], max_epochs=1,
                limit_train_batches=2, limit_val_batches=1).fit(module)
    assert "from the first 8 sample(s) of the training set, collated" in check_lines(caplog)[0]
    assert check_lines(caplog)[1].startswith("phasetune: memory check: every phase fits on a 80 GiB device")
    assert module.steps > 0


def test_lightning_strategies_map_to_the_plans():
    from lightning.pytorch import strategies as st

    from phasetune.lightning.memory_facts import strategy_kind

    class CPUFSDP(st.FSDPStrategy):  # a subclass, as phasetune's FSDP1 tests use on CPU
        pass

    strategies = [st.ModelParallelStrategy(), st.FSDPStrategy(), CPUFSDP(), st.DDPStrategy(), st.SingleDeviceStrategy("cpu")]
    assert [strategy_kind(s) for s in strategies] == ["fsdp2", "fsdp1", "fsdp1", "ddp", "single"]


def test_the_plain_fsdp2_strategy_notes_its_plan_for_the_loop(gloo_one_rank):
    from phasetune.loop.run_facts import loop_shape
    from phasetune.loop.strategy import FSDP2Strategy
    from phasetune.plan import model_for_plan

    strategy = FSDP2Strategy(micro_batch_size=2, global_batch_size=4, bf16=True)
    model = strategy.prepare_model(tiny_bert())
    noted = noted_shape(model)
    assert (noted["strategy"], noted["world_size"], noted["micro_batch"], noted["accumulation"]) == ("fsdp2", 1, 2, 2)
    assert noted["mixed_precision"] == "bf16" and "bert.encoder.layer.0" in noted["fsdp_plan"]
    shape = loop_shape(model, loader(), None)
    assert (shape.strategy, shape.micro_batch, shape.fsdp_plan) == ("fsdp2", 2, noted["fsdp_plan"])  # the strategy's
    config, prefix = model_for_plan(model)  # fully_shard's FSDPBertForSequenceClassification is planned as its class
    assert (config.architectures, prefix) == (["BertForSequenceClassification"], "")


def test_the_isolated_plan_does_not_start_an_unguarded_training_script_again(tmp_path):
    """Rank 0 plans in a fresh process when a process group is up; a script without a ``__main__`` guard (common in
    training scripts) must not run again in it, as multiprocessing's spawn would run it."""
    import subprocess
    import sys
    from pathlib import Path

    data = Path(__file__).parent / "data" / "plan"
    script = tmp_path / "train.py"
    script.write_text(
        "import sys\nimport torch.distributed as dist\n"
        f"sys.path.insert(0, {str(data)!r})\n"
        "from phasetune import ConfigurationError\n"
        "from phasetune.plan import plan_memory_isolated\n"
        "from plan_models import schedule\n"
        "open('started', 'a').write('once\\n')  # the script's top level, no guard\n"
        "dist.init_process_group('gloo', rank=0, world_size=1, store=dist.HashStore())\n"
        "plan = plan_memory_isolated(schedule(2), 'plan_models:small_net', world_size=2, seq_len=8)\n"
        "try:\n"
        "    plan_memory_isolated(schedule(2), 'plan_models:nope')\n"
        "except ConfigurationError as e:\n"
        "    print('refused:', e.problems[0])\n"
        "print('planned', len(plan.phases))\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "started").read_text() == "once\n"
    assert "refused: model 'plan_models:nope'" in done.stdout and "planned 3" in done.stdout
