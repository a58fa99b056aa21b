"""finetuning-scheduler's (FTS) public surface beyond the schedule: the attributes FTS users' code reads, FTS's
FinetuningScheduler arguments with FTS's meaning, and what resuming a checkpoint FTS wrote does."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from fts_reference.scenarios import ReferenceModule, scenario
from helpers import SCHEDULE_3, ToyModule, trainer
from phasetune import ConfigurationError, FinetuningScheduler, FTSCheckpoint, FTSEarlyStopping
from phasetune.lightning import adapters
from phasetune.lightning.adapters import DDPStrategyAdapter, StrategyAdapter, select_adapter

FTS_CHECKPOINT = Path(__file__).parent / "fts_reference" / "fts_2.14.1_phase1.ckpt"
# val_loss: best at epoch 1, no better after: with patience 1 each phase ends after one check without improvement
LOSSES = [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99]


class PerEpoch(Callback):
    """Records, at each epoch start (after the scheduler's), the depth and what the companions say."""

    def __init__(self, fts: FinetuningScheduler, es: FTSEarlyStopping) -> None:
        self.fts, self.es, self.rows = fts, es, []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.rows.append((self.fts.curr_depth, self.es.final_phase))


def es_fit(tmp_path, **fts_kwargs):
    fts = FinetuningScheduler(SCHEDULE_3, **fts_kwargs)
    es = FTSEarlyStopping(monitor="val_loss", patience=1)
    ck = FTSCheckpoint(monitor="val_loss", save_top_k=-1, save_last=True, dirpath=str(tmp_path / "ckpt"))
    rec = PerEpoch(fts, es)
    t = trainer(tmp_path, [fts, rec, es, ck], max_epochs=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(ToyModule(val_losses=LOSSES))
    return fts, es, ck, rec, t


@pytest.fixture(scope="module")
def es_run(tmp_path_factory):
    return es_fit(tmp_path_factory.mktemp("es_run"))


# ------------------------------------------------------------------ FTSEarlyStopping and FTSCheckpoint attributes
def test_es_phase_complete_is_phase_done_under_fts_name():
    es = FTSEarlyStopping(monitor="val_loss")
    assert es.es_phase_complete is False
    es.phase_done = True
    assert es.es_phase_complete is True
    es.es_phase_complete = False
    assert es.phase_done is False


def test_finetuningscheduler_callback_is_the_linked_scheduler(es_run):
    fts, es, *_ = es_run
    assert es.finetuningscheduler_callback is fts is es.scheduler_callback
    other = FTSEarlyStopping(monitor="val_loss")
    other.finetuningscheduler_callback = fts
    assert other.scheduler_callback is fts


def test_final_phase_is_true_exactly_while_the_scheduler_is_in_its_final_phase(es_run):
    fts, es, _, rec, _ = es_run
    assert fts.final_depth == 2 and {d for d, _ in rec.rows} == {0, 1, 2}
    assert all(final == (depth == 2) for depth, final in rec.rows), rec.rows
    assert FTSEarlyStopping(monitor="val_loss").final_phase is True  # no scheduler linked: its decisions end the run


def test_reduce_transition_decisions_is_false_on_one_process(es_run):
    assert es_run[1].reduce_transition_decisions is False


def test_stopping_threshold_ends_the_run_in_any_phase_as_in_fts(tmp_path):
    fts = FinetuningScheduler(SCHEDULE_3)
    es = FTSEarlyStopping(monitor="val_loss", patience=3, stopping_threshold=0.92)
    t = trainer(tmp_path, [fts, es], max_epochs=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(ToyModule(val_losses=LOSSES))
    assert (fts.curr_depth, t.current_epoch) == (0, 2)  # 0.9 < 0.92 at epoch 1 ends training, not the phase


def test_current_ckpt_depth_is_the_phase_of_the_latest_checkpoint_and_is_saved(es_run):
    fts, _, ck, _, _ = es_run
    assert ck.current_ckpt_depth == fts.curr_depth == 2
    saved = torch.load(ck.last_model_path, weights_only=True)["callbacks"][ck.state_key]
    assert saved["current_ckpt_depth"] == 2
    fresh = FTSCheckpoint(monitor="val_loss", save_top_k=-1, save_last=True, dirpath=ck.dirpath)
    fresh.load_state_dict(saved)
    assert fresh.current_ckpt_depth == 2


# ------------------------------------------------------------------ FinetuningScheduler arguments
def test_bad_fts_arguments_are_one_line_each_naming_the_argument():
    with pytest.raises(ConfigurationError) as info:
        FinetuningScheduler(log_dir=3, logging_level="loud", allow_untested="yes", custom_strategy_adapters=["x"])
    found = info.value.problems
    assert len(found) == 4 and all("\n" not in p for p in found)
    for name in ("log_dir", "logging_level", "allow_untested", "custom_strategy_adapters"):
        assert sum(p.startswith(name) for p in found) == 1, (name, found)


def test_log_dir_receives_the_resolved_schedule(tmp_path):
    fts = FinetuningScheduler(SCHEDULE_3, log_dir=tmp_path / "fts_logs")
    t = trainer(tmp_path / "root", [fts], max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(ToyModule())
    assert fts.log_dir == str(tmp_path / "fts_logs")
    assert (tmp_path / "fts_logs" / "ToyModule_ft_schedule_resolved.yaml").is_file()
    assert not list((tmp_path / "root").glob("*_ft_schedule_resolved.yaml"))


@pytest.fixture
def phasetune_logger():
    logger = logging.getLogger("phasetune")
    level = logger.level
    yield logger
    logger.setLevel(level)


@pytest.mark.parametrize("given, level", [(logging.DEBUG, logging.DEBUG), ("warning", logging.WARNING)])
def test_logging_level_sets_the_phasetune_logger(phasetune_logger, given, level):
    phasetune_logger.setLevel(logging.NOTSET)
    FinetuningScheduler(logging_level=given)
    assert phasetune_logger.level == level


def test_logging_level_none_leaves_the_logger_alone(phasetune_logger):
    phasetune_logger.setLevel(logging.ERROR)
    FinetuningScheduler()
    assert phasetune_logger.level == logging.ERROR


def fit_one_epoch(tmp_path, fts):
    t = trainer(tmp_path, [fts], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    t.fit(ToyModule())
    return t


def test_unsupported_strategy_is_refused_without_allow_untested(tmp_path, monkeypatch):
    monkeypatch.setattr(adapters, "_REGISTRY", [])  # no adapter knows SingleDeviceStrategy now
    with pytest.raises(ConfigurationError, match="pass allow_untested=True"):
        fit_one_epoch(tmp_path, FinetuningScheduler(SCHEDULE_3))


def test_allow_untested_runs_an_unsupported_strategy_with_the_default_adapter_and_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(adapters, "_REGISTRY", [])
    fts = FinetuningScheduler(SCHEDULE_3, allow_untested=True)
    with pytest.warns(UserWarning, match="allow_untested=True: running the SingleDeviceStrategy strategy"):
        fit_one_epoch(tmp_path, fts)
    assert type(fts.adapter) is StrategyAdapter


@pytest.mark.parametrize("target", ["phasetune.lightning.adapters.DDPStrategyAdapter",
                                    "phasetune.lightning.adapters:DDPStrategyAdapter", DDPStrategyAdapter])
def test_custom_strategy_adapters_choose_the_adapter_by_strategy_name(tmp_path, target):
    fts = FinetuningScheduler(SCHEDULE_3, custom_strategy_adapters={"single_device": target})
    fit_one_epoch(tmp_path, fts)
    assert type(fts.adapter) is DDPStrategyAdapter


def test_custom_strategy_adapters_match_class_names_and_lightning_registry_names():
    from lightning.pytorch.strategies import DDPStrategy

    for key in ("DDPStrategy", "ddpstrategy", "ddp", "ddp_spawn"):
        assert type(select_adapter(DDPStrategy(), custom={key: StrategyAdapter})) is StrategyAdapter, key


def test_custom_strategy_adapters_without_this_strategy_warn_and_use_the_built_in_adapter():
    from lightning.pytorch.strategies import SingleDeviceStrategy

    with pytest.warns(UserWarning, match="no entry for the SingleDeviceStrategy strategy.*'single_device'"):
        adapter = select_adapter(SingleDeviceStrategy(), custom={"fsdp": DDPStrategyAdapter})
    assert type(adapter) is StrategyAdapter


def test_custom_strategy_adapters_that_cannot_be_imported_are_refused_naming_the_key():
    with pytest.raises(ConfigurationError) as info:
        FinetuningScheduler(custom_strategy_adapters={
            "ddp": "no_such_package.Adapter", "fsdp": "collections.OrderedDict", "single_device": "Adapter"})
    found = info.value.problems
    assert len(found) == 3
    assert "custom_strategy_adapters['ddp']: cannot import 'no_such_package.Adapter'" in found[0]
    assert "custom_strategy_adapters['fsdp']: 'collections.OrderedDict' is not a phasetune StrategyAdapter" in found[1]
    assert "custom_strategy_adapters['single_device']: 'Adapter' is not an import path" in found[2]


# ------------------------------------------------------------------ checkpoints written by FTS
def fts_scenario():
    return dataclasses.replace(scenario("es_restore_best"), trainer={"max_epochs": 7})


def test_resuming_a_checkpoint_fts_wrote_is_refused_in_one_line_saying_what_to_do(tmp_path):
    sc = fts_scenario()
    fts = FinetuningScheduler(ft_schedule=dict(sc.schedule), base_max_lr=0.02)
    t = trainer(tmp_path, [fts, FTSEarlyStopping(monitor="val_loss", patience=1)], max_epochs=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigurationError) as info:
            t.fit(ReferenceModule(sc), ckpt_path=FTS_CHECKPOINT)
    message = str(info.value)
    assert "\n" not in message
    assert "written by finetuning-scheduler (FTS) at phase 1" in message
    assert "load_from_checkpoint" in message and "without ckpt_path" in message


def test_an_fts_checkpoints_weights_start_a_new_phasetune_fit(tmp_path):
    sc = fts_scenario()
    module = ReferenceModule.load_from_checkpoint(FTS_CHECKPOINT, sc=sc)
    saved = torch.load(FTS_CHECKPOINT, weights_only=True)["state_dict"]
    assert all(torch.equal(p, saved[n]) for n, p in module.named_parameters())  # exact: loaded as saved
    fts = FinetuningScheduler(ft_schedule=dict(sc.schedule), base_max_lr=0.02)
    t = trainer(tmp_path, [fts], max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module)
    assert t.global_step > 0 and fts.curr_depth == 0
