"""The thaw audit in every front end: the Lightning callback, the Hugging Face Trainer and the plain loop.

Each fault test fails without the audit (the run would train on silently). The 2-process cases (Lightning DDP,
FSDP1 and FSDP2) share one torchrun launch of tests/distributed/audit_frontend_scenarios.py.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from helpers import FLOAT32_UNIT_ROUNDOFF, ToyModule, trainer
from launch import launch
from phasetune import AuditError, FinetuningScheduler
from phasetune.lightning.summary import summary_table
from phasetune.loop import ScheduledFinetuning
from plain_models import SCHEDULE as PLAIN_SCHEDULE
from plain_models import TinyLM, data

pytestmark = pytest.mark.usefixtures("plain_process")  # Hugging Face Trainers here run as one plain process

#: phases at epochs 1 and 2 (4 steps an epoch): phase 1 thaws layers 2-3, phase 2 the rest
SCHEDULE = {
    0: {"params": ["model.head.*"], "max_transition_epoch": 1},
    1: {"params": [r"model\.layers\.[23]\..*"], "lr": 0.05, "max_transition_epoch": 2},
    2: {"params": [r"model\.layers\.[01]\..*", "model.embed.*"], "lr": 0.02, "max_transition_epoch": 3},
}
LAYER3 = [f"model.layers.3.{n}" for n in ("norm.weight", "norm.bias", "lin.weight", "lin.bias")]


class Refreeze(pl.Callback):
    """The issue's example: old BaseFinetuning-style code, listed after FinetuningScheduler, that freezes
    ``model.layers.3`` again at every epoch start."""

    def on_train_epoch_start(self, trainer, pl_module):
        for p in pl_module.model.layers[3].parameters():
            p.requires_grad_(False)


def lightning_fit(tmp_path, callbacks=(), **fts_kwargs):
    torch.manual_seed(0)
    module = ToyModule(lr=0.1)
    fts = FinetuningScheduler(ft_schedule=SCHEDULE, epoch_transitions_only=True, **fts_kwargs)
    t = trainer(tmp_path, [fts, *callbacks], max_epochs=3, logger=CSVLogger(str(tmp_path)), enable_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(module)
    return t, fts, [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------------------ Lightning


@pytest.fixture(scope="module")
def normal_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit_normal")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("phasetune")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        t, fts, _ = lightning_fit(out)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return t, fts, [r.getMessage() for r in records if r.levelno >= logging.INFO]


def test_a_normal_lightning_run_passes_with_one_audit_line_per_phase(normal_run):
    _, fts, lines = normal_run
    passes = [line for line in lines if line.startswith("phasetune: audit")]
    assert [line.split(":")[1] for line in passes] == [" audit phase 0", " audit phase 1", " audit phase 2"], passes
    assert passes[1].endswith("8 tensors thawed, all trained; 2 groups at the scheduled lrs; 10 frozen unchanged")


def test_the_audit_result_is_in_the_history_and_the_summary_table(normal_run):
    _, fts, _ = normal_run
    assert [r.audit.split(":")[0] for r in fts.history] == ["audit phase 0", "audit phase 1", "audit phase 2"]
    assert all("all trained" in r.audit for r in fts.history)
    rows = summary_table(fts.history).splitlines()[2:5]
    assert [r.split()[-1] for r in rows] == ["passed"] * 3


def test_each_groups_lr_is_logged_under_its_phase_and_block(normal_run):
    t, _, _ = normal_run
    header = (Path(t.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert sorted(h for h in header if h.startswith("lr/")) == [
        "lr/phase0/model.head", "lr/phase1/model.layers.2-3", "lr/phase2/model.embed+model.layers.0-1"]
    # numerical: a float32 metric against a decimal (one rounding, at most 2**-24 of it)
    assert t.callback_metrics["lr/phase1/model.layers.2-3"] == pytest.approx(0.05, rel=FLOAT32_UNIT_ROUNDOFF)


def test_a_callback_that_refreezes_a_layer_every_epoch_fails_naming_the_layer(tmp_path):
    with pytest.raises(AuditError) as err:
        lightning_fit(tmp_path, [Refreeze()])
    result = err.value.result
    assert (result.depth, result.stage) == (1, "first step")
    assert [(f.cause, f.params) for f in result.findings] == [("refrozen", LAYER3)]
    assert "re-frozen after the thaw: 'model.layers.3.norm.weight'" in str(err.value)


def test_with_audit_warn_the_refrozen_layer_is_warned_recorded_and_training_goes_on(tmp_path):
    t, fts, said = lightning_fit(tmp_path, [Refreeze()], audit="warn")
    assert t.current_epoch == 3 and fts.curr_depth == 2
    assert any("re-frozen after the thaw: 'model.layers.3.norm.weight'" in s for s in said)
    assert "FAILED" in fts.history[1].audit and "re-frozen" in fts.history[1].audit
    assert summary_table(fts.history).splitlines()[3].split()[-1] == "FAILED"


def test_audit_off_lets_the_refrozen_layer_go_unnoticed(tmp_path):
    t, fts, _ = lightning_fit(tmp_path, [Refreeze()], audit="off")
    assert t.current_epoch == 3 and [r.audit for r in fts.history] == [None] * 3


def test_audit_options_are_validated_with_the_other_options():
    with pytest.raises(Exception, match="audit must be one of"):
        FinetuningScheduler(audit="loud")
    with pytest.raises(Exception, match="audit_zero_lr must be one of"):
        ScheduledFinetuning(PLAIN_SCHEDULE, TinyLM(), torch.optim.SGD(TinyLM().parameters(), lr=0.1),
                            audit_zero_lr="ignore")


# ------------------------------------------------------------------------------------------------ plain loop


def loop(**kw) -> ScheduledFinetuning:
    torch.manual_seed(0)
    model = TinyLM()
    return ScheduledFinetuning(PLAIN_SCHEDULE, model, torch.optim.SGD(model.parameters(), lr=0.1), restore_best=False,
                               **kw)


def train_step(ft: ScheduledFinetuning) -> None:
    ids, labels = data(16)
    ft.optimizer.zero_grad()
    F.cross_entropy(ft.model(ids), labels).backward()
    ft.optimizer.step()


def test_the_loop_catches_a_hook_that_zeroes_a_gradient():
    ft = loop()
    train_step(ft)
    assert ft.step(0) is not None  # phase 1 thaws layers 2-3
    ft.model.layers[2].lin.weight.register_hook(torch.zeros_like)
    with pytest.raises(AuditError) as err:
        train_step(ft)
    assert [(f.cause, f.params) for f in err.value.result.findings] == [("no_gradient", ["layers.2.lin.weight"])]


def test_the_loop_records_each_phase_audit_and_names_the_lrs():
    ft = loop()
    train_step(ft)
    ft.step(0)
    assert ft.lrs() == {"phase0/head": 0.1, "phase1/layers.2-3": ft.engine.lr_for(1)}  # exact: the lr it set
    train_step(ft)
    assert ft.history[0].audit.startswith("audit phase 0: ") and ft.history[1].audit.startswith("audit phase 1: ")


def resumed_loop() -> ScheduledFinetuning:
    ft = loop()
    train_step(ft)
    ft.step(0)
    train_step(ft)
    state = ft.state_dict()
    torch.manual_seed(1)
    fresh = loop()
    fresh.model.load_state_dict(ft.model.state_dict())
    fresh.load_state_dict(state)
    return fresh


def test_a_resumed_loop_is_audited_after_its_first_step_on_every_trainable_tensor():
    ft = resumed_loop()
    assert ft.run.audit.pending  # armed by load_state_dict
    train_step(ft)
    assert ft.history[1].audit.startswith("audit phase 1: 10 trainable tensors checked, all trained")


def test_a_layer_refrozen_after_a_resume_of_the_loop_is_named():
    ft = resumed_loop()
    ft.model.layers[3].lin.bias.requires_grad_(False)
    with pytest.raises(AuditError, match=r"re-frozen after the thaw: 'layers\.3\.lin\.bias'"):
        train_step(ft)


# ------------------------------------------------------------------------------------------------ Hugging Face


HF_SCHEDULE = {0: {"params": ["classifier.*", "bert.pooler.*"], "max_transition_epoch": 1},
               1: {"params": [r"bert\.encoder\.layer\.1\..*"], "lr": 0.05}}


def hf_fit(tmp_path, callbacks=()):
    from distributed.hf_scenarios import Tokens, tiny_bert, training_args
    from phasetune.hf import PhasetuneTrainer, PhasetuneTrainerCallback

    ft = PhasetuneTrainerCallback(HF_SCHEDULE, restore_best=False)
    args = training_args(tmp_path, num_train_epochs=2, save_strategy="no", eval_strategy="no",
                         metric_for_best_model=None, logging_strategy="steps", logging_steps=2)
    t = PhasetuneTrainer(model=tiny_bert(), args=args, train_dataset=Tokens(32, 0), callbacks=[ft, *callbacks])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.train()
    return t, ft


def test_a_normal_trainer_run_passes_and_logs_lrs_by_name(tmp_path, one_process):
    t, ft = hf_fit(tmp_path)
    assert ft.depth == 1
    assert [r.audit.split(":")[0] for r in ft.history] == ["audit phase 0", "audit phase 1"]
    assert all("all trained" in r.audit for r in ft.history)
    logged = [log for log in t.state.log_history if "learning_rate" in log]
    assert any("lr/phase1/bert.encoder.layer.1" in log for log in logged)
    assert all(any(k.startswith("lr/phase0/") for k in log) for log in logged)


def test_the_trainer_path_catches_a_phase_missing_from_the_optimizer(tmp_path, one_process):
    from transformers import TrainerCallback

    from phasetune.hf.callback import unwrap_optimizer

    class DropNewGroups(TrainerCallback):  # listed after phasetune's: takes a new phase's groups out again
        def on_epoch_begin(self, args, state, control, optimizer=None, **kwargs):
            groups = unwrap_optimizer(optimizer).param_groups
            while groups[-1].get("ft_phase", 0) > 0:
                groups.pop()

    with pytest.raises(AuditError) as err:
        hf_fit(tmp_path, [DropNewGroups()])
    assert err.value.result.findings[0].cause == "missing"
    assert "missing from the optimizer: 'bert.encoder.layer.1." in str(err.value)


# ------------------------------------------------------------------------------------------------ 2 processes


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch("audit_frontend_scenarios.py", tmp_path_factory.mktemp("audit_frontends"))


def test_lightning_ddp_passes_after_each_rebuild_of_ddp_fresh_and_resumed(ranks):
    for rank in ranks:
        assert rank["ddp_ok"]["depth"] == 2
        assert rank["ddp_ok"]["audits"] == ["passed"] * 3, rank["ddp_ok"]
        assert rank["ddp_resumed"]["audits"][1:] == ["passed"] * 2, rank["ddp_resumed"]
        assert rank["ddp_resumed"]["stages"][1].startswith("audit phase 1: "), rank["ddp_resumed"]


def test_lightning_ddp_catches_a_refrozen_layer_on_every_rank(ranks):
    for rank in ranks:
        found = rank["ddp_refrozen"]["found"]
        assert rank["ddp_refrozen"]["stage"] == "first step"
        assert found["refrozen"] == LAYER3
        # DDP's reducer still waits for layer 3's gradients, so the rest of their bucket is never averaged either:
        # the only other finding allowed is that true consequence, on parameters thawed with them
        assert set(found) <= {"refrozen", "not_synchronised"}, found
        assert all(n.startswith("model.layers.2.") for n in found.get("not_synchronised", [])), found


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_lightning_sharded_runs_pass_the_audit(ranks, kind):
    for rank in ranks:
        assert rank[kind]["depth"] == 2, rank[kind]
        assert rank[kind]["audits"] == ["passed"] * 3, rank[kind]
