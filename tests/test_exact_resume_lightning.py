"""Exact resume under Lightning on one device, with randomness: a shuffled DataLoader (no generator of its own, or
a sampler with one), Dropout, and data that draws from Python's ``random`` (gauss cache) and NumPy
(helpers.DropoutToyModule). Resumed from any epoch checkpoint, or from the middle of an epoch with torchdata's
StatefulDataLoader, a run ends bit-equal to the uninterrupted one; without the random state it does not. A resume
onto another number of processes is refused, or re-seeded when asked. 2 processes: tests/test_exact_resume_sharded.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import phasetune.features.random_state
from helpers import SCHEDULE_3, DropoutToyModule, NoisyData, assert_bit_equal, dataset, trainer
from phasetune import ConfigurationError, FinetuningScheduler, FTSCheckpoint, FTSEarlyStopping


class OwnGeneratorModule(DropoutToyModule):
    """A shuffling sampler with a generator of its own (seeded as the loader is built), advanced every epoch."""

    def train_dataloader(self) -> DataLoader:
        data = NoisyData()
        sampler = torch.utils.data.RandomSampler(data, generator=torch.Generator().manual_seed(3))
        return DataLoader(data, batch_size=16, sampler=sampler)


class Losses(pl.Callback):
    """Every optimizer step's loss, by step: the batches and dropout masks, also of epochs restore-best rolls back."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, *args) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def fit(root: Path, ckpt_path=None, module_cls=DropoutToyModule, losses: Losses | None = None, **fts_kwargs):
    pl.seed_everything(7)
    module = module_cls()
    fts = FinetuningScheduler(ft_schedule=SCHEDULE_3, **fts_kwargs)
    ck = FTSCheckpoint(monitor="val_loss", save_top_k=-1, dirpath=str(root / "ckpts"), filename="{epoch}")
    t = trainer(root, [fts, FTSEarlyStopping(monitor="val_loss", patience=2), ck, *([losses] if losses else [])],
                max_epochs=30, enable_checkpointing=True, num_sanity_val_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module, ckpt_path=ckpt_path)
    return {n: p.detach().clone() for n, p in module.named_parameters()}, fts


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    params, fts = fit(root)
    assert [(r.start_epoch, r.end_epoch) for r in fts.history] == [(0, 4), (4, 7), (7, 11)]
    assert fts.restore_best and all(r.restored_best for r in fts.history[:2])
    return root, params


@pytest.mark.parametrize("epoch", range(11))
def test_lightning_resume_from_every_epoch_checkpoint_is_bit_equal_with_shuffling_and_dropout(tmp_path, reference, epoch):
    root, expected = reference
    params, _ = fit(tmp_path, ckpt_path=root / "ckpts" / f"epoch={epoch}.ckpt")
    assert_bit_equal(params, expected)  # exact: resume against the uninterrupted run


def test_lightning_resume_without_the_random_state_differs(tmp_path, reference, monkeypatch):
    root, expected = reference
    monkeypatch.setattr(phasetune.features.random_state, "restore_checkpoint_state", lambda *a, **k: None)
    params, _ = fit(tmp_path, ckpt_path=root / "ckpts" / "epoch=5.ckpt")
    assert any(not torch.equal(params[n], expected[n]) for n in expected)  # exact: the control differs


def test_the_checkpoint_holds_every_generator_of_every_rank(reference):
    root, _ = reference
    state = torch.load(root / "ckpts" / "epoch=5.ckpt", weights_only=True)["callbacks"]["FinetuningScheduler"]["rng"]
    assert state["world_size"] == 1 and set(state["states"]) == {0}
    assert {"python", "numpy", "torch"} <= set(state["states"][0])


def test_a_resume_onto_another_number_of_processes_is_refused_naming_resume_rng(tmp_path, reference):
    root, _ = reference
    path = root / "ckpts" / "epoch=5.ckpt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["callbacks"]["FinetuningScheduler"]["rng"]["world_size"] = 2
    torch.save(ckpt, tmp_path / "two.ckpt")
    with pytest.raises(ConfigurationError, match=r"saved by 2 processes and this run has 1.*resume_rng='reseed'"):
        fit(tmp_path, ckpt_path=tmp_path / "two.ckpt")


def test_reseed_continues_a_resume_onto_another_number_of_processes_with_a_warning(tmp_path, reference, caplog):
    root, _ = reference
    ckpt = torch.load(root / "ckpts" / "epoch=5.ckpt", weights_only=True)
    ckpt["callbacks"]["FinetuningScheduler"]["rng"]["world_size"] = 2
    torch.save(ckpt, tmp_path / "two.ckpt")
    with pytest.warns(UserWarning, match="re-seeded"):
        pl.seed_everything(7)
        module = DropoutToyModule()
        fts = FinetuningScheduler(ft_schedule=SCHEDULE_3, resume_rng="reseed")
        ck = FTSCheckpoint(monitor="val_loss", dirpath=str(tmp_path / "ckpts"))
        t = trainer(tmp_path, [fts, FTSEarlyStopping(monitor="val_loss", patience=2), ck], max_epochs=30,
                    enable_checkpointing=True)
        t.fit(module, ckpt_path=tmp_path / "two.ckpt")
    assert fts.history[-1].end_epoch == 11


def test_resume_rng_must_be_exact_or_reseed():
    with pytest.raises(ConfigurationError, match="resume_rng must be one of"):
        FinetuningScheduler(resume_rng="ignore")


def test_a_sampler_generator_of_its_own_comes_back_with_the_checkpoint(tmp_path, monkeypatch):
    expected = Losses()
    fit(tmp_path / "ref", module_cls=OwnGeneratorModule, losses=expected)
    ckpt = tmp_path / "ref" / "ckpts" / "epoch=5.ckpt"
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["FinetuningScheduler"]["rng"]["states"][0]
    assert len(saved["data"]) == 1  # the sampler's generator, as it was after epoch 5's order was drawn
    resumed = Losses()
    fit(tmp_path / "resumed", ckpt, module_cls=OwnGeneratorModule, losses=resumed)
    assert min(resumed.losses) == 25  # 4 steps an epoch: epoch 6 on
    assert resumed.losses == {k: v for k, v in expected.losses.items() if k >= 25}  # exact: each step's loss
    # the control: without it the resumed sampler starts from its seed and repeats epoch 0's order
    monkeypatch.setattr(phasetune.features.random_state, "loader_generators", lambda loaders: [])
    control = Losses()
    fit(tmp_path / "control", ckpt, module_cls=OwnGeneratorModule, losses=control)
    assert control.losses[25] != expected.losses[25]


# ---------------------------------------------------------------------------------------------- mid-epoch
def fit_with_step_checkpoints(root: Path, loader_cls, ckpt_path=None):
    class Module(DropoutToyModule):
        def train_dataloader(self):
            return loader_cls(dataset(64, 0), batch_size=16, shuffle=True)

    pl.seed_everything(7)
    module = Module()
    fts = FinetuningScheduler(ft_schedule=SCHEDULE_3)
    steps = ModelCheckpoint(every_n_train_steps=3, save_top_k=-1, dirpath=str(root / "steps"), filename="{step}")
    t = trainer(root, [fts, FTSEarlyStopping(monitor="val_loss", patience=2), steps], max_epochs=30,
                enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(module, ckpt_path=ckpt_path)
    said = [str(w.message) for w in caught if "StatefulDataLoader" in str(w.message)]
    return {n: p.detach().clone() for n, p in module.named_parameters()}, said


@pytest.fixture(scope="module")
def stateful_reference(tmp_path_factory):
    loader = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader
    root = tmp_path_factory.mktemp("stateful")
    return root, loader, fit_with_step_checkpoints(root, loader)[0]


# 4 batches an epoch: step 6 is mid epoch 1 (phase 0), 18 mid epoch 4 (first of phase 1), 30 mid epoch 7
@pytest.mark.parametrize("step", [6, 18, 30])
def test_a_mid_epoch_resume_with_stateful_dataloader_is_bit_equal(tmp_path, stateful_reference, step):
    root, loader, expected = stateful_reference
    params, said = fit_with_step_checkpoints(tmp_path, loader, root / "steps" / f"step={step}.ckpt")
    assert_bit_equal(params, expected)  # exact: resume against the uninterrupted run
    assert said == []


def test_a_mid_epoch_resume_of_a_plain_dataloader_warns_once_naming_stateful_dataloader(tmp_path):
    fit_with_step_checkpoints(tmp_path / "ref", DataLoader)
    _, said = fit_with_step_checkpoints(tmp_path, DataLoader, tmp_path / "ref" / "steps" / "step=6.ckpt")
    assert len(said) == 1 and "middle of an epoch (after 2 batches)" in said[0]
    assert "torchdata.stateful_dataloader.StatefulDataLoader" in said[0]
