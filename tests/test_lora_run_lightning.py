"""LoRA schedules under Lightning: the callback injects the adapters in setup (before the strategy wraps or shards the
model and before configure_optimizers), merges at the transition, and a fit resumed from a checkpoint taken just
before or just after the merge transition ends bit-equal to the uninterrupted fit."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest

from helpers import ToyModule, assert_bit_equal, trainer
from phasetune import FinetuningScheduler, FTSCheckpoint, FTSEarlyStopping

pytest.importorskip("peft")

#: LoRA on the top block with the head, then merged while the top block's base weights train, then block 2
SCHEDULE = {
    "peft": {"method": "lora", "r": 2, "alpha": 4},
    0: {"params": ["model.head.*", r"model\.layers\.3\.lin\.lora_.*"], "max_transition_epoch": 2},
    1: {"params": [r"model\.layers\.3\.lin\.base_layer\..*"], "lr": 0.05, "merge_lora": True,
        "max_transition_epoch": 4},
    2: {"params": [r"model\.layers\.2\..*"], "lr": 0.02},
}
VAL_LOSSES = [1.0, 0.9, 0.95, 0.8, 0.85, 0.7]


def fit(root: Path, ckpt_path=None):
    pl.seed_everything(7)
    module = ToyModule(val_losses=VAL_LOSSES)
    fts = FinetuningScheduler(ft_schedule=SCHEDULE)
    ck = FTSCheckpoint(monitor="val_loss", save_top_k=-1, dirpath=str(root / "ckpts"), filename="{epoch}")
    t = trainer(root, [fts, FTSEarlyStopping(monitor="val_loss", patience=3), ck], max_epochs=6,
                enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module, ckpt_path=ckpt_path)
    return {n: p.detach().clone() for n, p in module.named_parameters()}, fts


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_lightning")
    params, fts = fit(root)
    assert [(r.start_epoch, r.end_epoch) for r in fts.history] == [(0, 2), (2, 4), (4, 6)]
    return root, params, fts


def test_lightning_injects_in_setup_and_merges_at_the_transition(reference):
    _, params, fts = reference
    assert fts.run.lora.record.to_state() == [{"phase": 1, "adapter": "default", "modules": ["model.layers.3.lin"],
                                               "reinit": False, "seed": None}]
    assert float(params["model.layers.3.lin.lora_B.default.weight"].abs().max()) == 0.0  # folded, never trained again
    assert "model.layers.3.lin.base_layer.weight" in fts.thawed_params
    assert "model.layers.3.lin.lora_A.default.weight" not in fts.thawed_params


@pytest.mark.parametrize("epoch", [1, 2])  # the last checkpoint before the merge transition, the first after it
def test_lightning_resumed_around_the_merge_transition_ends_bit_equal(tmp_path, reference, epoch):
    root, expected, _ = reference
    params, fts = fit(tmp_path, ckpt_path=root / "ckpts" / f"epoch={epoch}.ckpt")
    assert_bit_equal(params, expected)  # exact: same machine, same ops, same batches as the uninterrupted fit
    assert len(fts.run.lora.record.entries) == 1
