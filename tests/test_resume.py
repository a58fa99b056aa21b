"""Exact resume: a run interrupted anywhere and resumed ends with exactly the parameters of an uninterrupted one."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from helpers import ToyModule, trainer
from phasetune import ConfigurationError, FinetuningScheduler, FTSCheckpoint, FTSEarlyStopping

LOSSES = [1.0, 0.9, 0.95, 0.96, 0.8, 0.85, 0.86, 0.87, 0.5, 0.6, 0.7, 0.8]  # transitions at epochs 4 and 7; ends at 11
SCHEDULE = {
    0: {"params": ["model.head.*"]},
    1: {
        "params": [r"model\.layers\.[23]\..*"],
        "lr": 0.02,
        "new_lr_scheduler": {
            "lr_scheduler_init": {"class_path": "CosineAnnealingLR", "init_args": {"T_max": 20}},
            "pl_lrs_cfg": {"interval": "step"},
        },
    },
    2: {
        "params": [r"model\.layers\.[01]\..*", "model.embed.*"],
        "lr": 0.01,
        "new_optimizer": {"optimizer_init": {"class_path": "torch.optim.AdamW", "init_args": {"weight_decay": 0.01}}},
        "new_lr_scheduler": {"lr_scheduler_init": {"class_path": "ExponentialLR", "init_args": {"gamma": 0.9}}},
    },
}


def run(root: Path, ckpt_path=None, schedule=SCHEDULE, storage="memory", quiet=True, **fts_kwargs):
    pl.seed_everything(7)
    module = ToyModule(val_losses=LOSSES, optimizer="adam", lr=0.01, scheduler="step")
    fts = FinetuningScheduler(ft_schedule=schedule, snapshot_storage=storage, **fts_kwargs)
    ck = FTSCheckpoint(monitor="val_loss", save_top_k=-1, dirpath=str(root / "ckpts"), filename="{epoch}", save_last=True)
    t = trainer(root, [fts, FTSEarlyStopping(monitor="val_loss", patience=2), ck], max_epochs=30, enable_checkpointing=True)
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        t.fit(module, ckpt_path=ckpt_path)
    return module, fts, t


def final_state(module, t):
    opt = t.optimizers[0]
    return (
        {n: p.detach().clone() for n, p in module.named_parameters()},
        [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for s in opt.state.values()],
        [g["lr"] for g in opt.param_groups],
        type(opt).__name__,
        type(t.lr_scheduler_configs[0].scheduler).__name__,
    )


def assert_same(a, b):
    """Exact: a resumed run's final state (parameters, optimizer state, ...) against the uninterrupted run's, bit
    for bit."""
    pa, sa, la, oa, ska = a
    pb, sb, lb, ob, skb = b
    assert (oa, ska, la) == (ob, skb, lb)
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb):
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    module, fts, t = run(root)
    assert [(r.start_epoch, r.end_epoch) for r in fts.history] == [(0, 4), (4, 7), (7, 11)]
    return root, final_state(module, t), fts


# 1: mid phase 0; 3: just before a transition that restores the best state; 4: first epoch under the new
# scheduler; 6: before the transition that swaps the optimizer; 7: first epoch with AdamW; 9: final phase
@pytest.mark.parametrize("epoch", [1, 3, 4, 6, 7, 9])
def test_resume_from_any_checkpoint_ends_exactly_where_the_uninterrupted_run_does(tmp_path, reference, epoch):
    root, expected, ref_fts = reference
    module, fts, t = run(tmp_path, ckpt_path=root / "ckpts" / f"epoch={epoch}.ckpt")
    assert_same(final_state(module, t), expected)
    assert [(r.start_epoch, r.end_epoch, r.end_reason) for r in fts.history] == [
        (r.start_epoch, r.end_epoch, r.end_reason) for r in ref_fts.history
    ]


def test_resume_from_the_best_checkpoint_continues_from_its_phase(tmp_path, reference):
    root, _, ref_fts = reference
    best = ref_fts.checkpoint.best_model_path
    assert Path(best).name == "epoch=8.ckpt" and ref_fts.checkpoint.best_ckpt_depth == 2
    _, fts, _ = run(tmp_path, ckpt_path=best)
    assert fts.history[-1].depth == 2 and fts.curr_depth == 2


def test_resume_into_a_new_checkpoint_directory(tmp_path, reference):
    root, expected, _ = reference
    module, fts, t = run(tmp_path / "elsewhere", ckpt_path=root / "ckpts" / "epoch=5.ckpt")
    assert_same(final_state(module, t), expected)
    new_dir = tmp_path / "elsewhere" / "ckpts"
    assert {p.name for p in new_dir.glob("epoch=*.ckpt")} == {f"epoch={e}.ckpt" for e in range(6, 11)}
    assert fts.checkpoint.best_ckpt_depth == 2 and Path(fts.checkpoint.best_model_path).parent == new_dir


def test_resuming_a_finished_run_trains_nothing(tmp_path, reference):
    root, expected, _ = reference
    module, fts, t = run(tmp_path, ckpt_path=root / "ckpts" / "last.ckpt")
    assert_same(final_state(module, t), expected)
    assert t.current_epoch == 11


def test_a_checkpoint_from_a_different_schedule_is_refused_saying_what_differs(tmp_path, reference):
    root, _, _ = reference
    other = {**SCHEDULE, 1: {**SCHEDULE[1], "params": [r"model\.layers\.3\..*"]},
             2: {**SCHEDULE[2], "params": [r"model\.layers\.[012]\..*", "model.embed.*"]}}
    with pytest.raises(ConfigurationError) as info:
        run(tmp_path, ckpt_path=root / "ckpts" / "epoch=5.ckpt", schedule=other)
    text = str(info.value)
    assert "the checkpoint was trained with a different schedule or model:" in text
    assert "phase 1 trains different parameters: no longer 'model.layers.2.lin.bias', 'model.layers.2.lin.weight'" in text
    assert "phase 2 trains different parameters: now also 'model.layers.2.lin.bias'" in text
    assert "epoch=5.ckpt" in text


def test_a_checkpoint_beyond_max_depth_is_refused(tmp_path, reference):
    root, _, _ = reference
    with pytest.raises(ConfigurationError, match="saved in phase 2, beyond max_depth=1"):
        run(tmp_path, ckpt_path=root / "ckpts" / "epoch=8.ckpt", max_depth=1)


def test_disk_snapshots_resume_exactly_and_say_when_they_were_lost(tmp_path, reference):
    _, expected, _ = reference
    ref_root = tmp_path / "disk_ref"
    module, _, t = run(ref_root, storage="disk")
    assert_same(final_state(module, t), expected)  # same trajectory as the in-memory snapshots
    snaps = sorted(p.name for p in (ref_root / "phasetune_snapshots").iterdir())
    assert snaps == ["rank0_phase0.pt", "rank0_phase1.pt"]  # the final phase is never restored: no snapshot
    ckpt = torch.load(ref_root / "ckpts" / "epoch=3.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("FinetuningScheduler"))
    assert "snapshot" not in state and state["snapshot_ref"]["step"] == 8  # checkpoints only reference it

    module, _, t = run(tmp_path / "r1", ckpt_path=ref_root / "ckpts" / "epoch=3.ckpt", storage="disk")
    assert_same(final_state(module, t), expected)

    # Control: without the snapshot, restore-best at the epoch-4 transition cannot happen and the run differs.
    shutil.rmtree(ref_root / "phasetune_snapshots")
    with pytest.warns(UserWarning, match="snapshot .* is gone"):
        module, _, t = run(tmp_path / "r2", ckpt_path=ref_root / "ckpts" / "epoch=3.ckpt", storage="disk", quiet=False)
    lost = final_state(module, t)
    assert any(not torch.equal(lost[0][n], expected[0][n]) for n in expected[0])  # exact: the control differs


class LateRestoreStrategy(SingleDeviceStrategy):
    """Restores checkpoints after on_fit_start, as Lightning's FSDP and ModelParallel strategies do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def test_resume_is_exact_when_the_strategy_restores_after_fit_start(tmp_path, reference):
    root, expected, _ = reference
    pl.seed_everything(7)
    module = ToyModule(val_losses=LOSSES, optimizer="adam", lr=0.01, scheduler="step")
    fts = FinetuningScheduler(ft_schedule=SCHEDULE)
    t = trainer(tmp_path, [fts, FTSEarlyStopping(monitor="val_loss", patience=2),
                           FTSCheckpoint(monitor="val_loss", dirpath=str(tmp_path / "ck"))],
                max_epochs=30, enable_checkpointing=True, strategy=LateRestoreStrategy(device=torch.device("cpu")))
    assert t.strategy.restore_checkpoint_after_setup
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module, ckpt_path=root / "ckpts" / "epoch=7.ckpt")  # phase 2: AdamW and ExponentialLR
    assert_same(final_state(module, t), expected)


def test_a_checkpoint_without_phasetune_state_is_refused_with_how_to_start_from_its_weights(tmp_path):
    plain = trainer(tmp_path / "plain", [], max_epochs=1)
    plain.fit(ToyModule(all_params_in_optimizer=True))
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ConfigurationError, match=r"plain\.ckpt: it holds no FinetuningScheduler state .* call fit without ckpt_path"):
        run(tmp_path / "resumed", ckpt_path=tmp_path / "plain.ckpt")
