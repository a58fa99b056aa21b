"""The frozen-prefix cache (``prefix_cache``) through the three front ends: a cached phase trains as the same phase
without the cache with its prefix in eval mode (to the rounding of rows computed in other batches), its line lands
in the history, its spill files go, and what cannot work is refused before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from distributed.hf_scenarios import training_args
from helpers import PrefixModule as Module
from helpers import PrefixNet as Net
from helpers import PrefixSpills as Spills
from helpers import float32_drift, trainer
from helpers import prefix_data as data
from phasetune import ConfigurationError, FinetuningScheduler, FTSEarlyStopping
from phasetune.features.prefix_cache import PrefixCachePhases
from phasetune.features.prefix_cache.cache import IndexedDataset, strip_indices
from phasetune.hf import PhasetuneTrainer, PhasetuneTrainerCallback
from phasetune.lightning.sharded import ShardedStrategyAdapter
from phasetune.lightning.summary import summary_table
from phasetune.loop import ScheduledFinetuning
from phasetune.run import Patience, PhaseRun, RunEnv

pytestmark = pytest.mark.usefixtures("plain_process")  # Hugging Face Trainers here run as one plain process

# phase 0 trains the head on a frozen body (epochs 0-1, the second served from the cache); phase 1 thaws the body
SCHEDULE = {0: {"params": [r"head\..*"], "max_transition_epoch": 2},
            1: {"params": [r"body\..*"], "lr": 0.05, "max_transition_epoch": 4}}
CACHED = {0: {**SCHEDULE[0], "prefix_cache": True}, 1: SCHEDULE[1]}


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Numerical: a cached prefix output was computed in another batch than the uncached one, and a kernel may round
    a row differently in another batch; 4 epochs of 3 steps, sums of 16 terms (width and batch), weights below 1."""
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=float32_drift(12, 16), msg=lambda m, n=n: f"{n}: {m}")


def no_spill_folders(where: Path) -> None:
    assert not list(Path(where).rglob("prefix-cache-*")), "spill folders left behind"


# ---------------------------------------------------------------------------------------------- Lightning
def lightning_run(tmp_path: Path, cached: bool) -> tuple[Module, FinetuningScheduler, Spills | None]:
    fts = FinetuningScheduler(CACHED if cached else SCHEDULE, restore_best=False, epoch_transitions_only=True,
                              prefix_cache={0: {"limit_mb": 0}} if cached else None)
    module = Module(None if cached else lambda: fts.curr_depth == 0)
    spills = Spills(fts) if cached else None
    torch.manual_seed(0)
    trainer(tmp_path, [fts, *([spills] if spills else [])], max_epochs=4, limit_val_batches=0,
                                                         enable_checkpointing=False).fit(module)
    return module, fts, spills


@pytest.mark.numerical
def test_lightning_a_cached_phase_trains_as_the_uncached_phase_with_its_prefix_in_eval_mode(tmp_path):
    cached, fts, spills = lightning_run(tmp_path / "cached", True)
    plain, plain_fts, _ = lightning_run(tmp_path / "plain", False)
    assert_same(params(cached), params(plain))
    line = fts.history[0].prefix_cache
    assert line.startswith("phase 0: prefix cache up to body.3 (prefix in eval mode")
    assert "48 samples" in line and "2 batches served from it, 4 computed" in line, line
    assert fts.history[1].prefix_cache is None and plain_fts.history[0].prefix_cache is None
    assert line in summary_table(fts.history).splitlines()
    assert spills.files > 0
    no_spill_folders(tmp_path / "cached")
    assert fts.caches is None and "on_train_batch_start" not in vars(fts)  # hooks gone with the fit
    assert all(m.training for m in cached.modules())


def test_lightning_refuses_the_cache_under_a_sharded_strategy_before_training(tmp_path):
    fts = FinetuningScheduler(CACHED, restore_best=False)
    t = trainer(tmp_path, [fts], max_epochs=4)
    module = Module()
    fts.adapter = ShardedStrategyAdapter()  # what setup picks under FSDPStrategy / ModelParallelStrategy
    names = dict(module.named_parameters())
    fts.run = PhaseRun(CACHED, names, {n: tuple(p.shape) for n, p in names.items()}, options=fts.options,
                       env=RunEnv(), model=module)
    with pytest.raises(ConfigurationError) as e:
        raise ConfigurationError(fts._prepare_caches(t, module))  # on_fit_start raises these before training
    assert len(e.value.problems) == 1
    assert "prefix_cache is on in phase 0, but the model is sharded (FSDP1" in str(e.value)


def test_lightning_prefix_cache_argument_must_be_a_mapping():
    with pytest.raises(ConfigurationError, match="prefix_cache must map phase indices"):
        FinetuningScheduler(SCHEDULE, prefix_cache=True)


# ---------------------------------------------------------------------------------------------- the loop
def loop_run(cached: bool, tmp_path: Path) -> tuple[Net, ScheduledFinetuning]:
    holder: dict = {}
    model = Net(None if cached else lambda: holder["ft"].depth == 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train = IndexedDataset(data())
    ft = ScheduledFinetuning(SCHEDULE, model, optimizer, restore_best=False, epoch_transitions_only=True,
                             prefix_cache={0: True} if cached else None, train_dataset=train, spill_dir=tmp_path)
    holder["ft"] = ft
    torch.manual_seed(0)
    loader = DataLoader(train, batch_size=16, shuffle=True)
    for epoch in range(4):
        model.train()
        for batch in loader:
            item = ft.before_batch(batch)  # without a cached phase: untouched, ((x, y), indices)
            x, y = item if cached else strip_indices(item)
            loss = nn.functional.cross_entropy(model(x), y)
            ft.optimizer.zero_grad()
            loss.backward()
            ft.optimizer.step()
        ft.step(epoch)
    ft.close()
    return model, ft


@pytest.mark.numerical
def test_loop_a_cached_phase_trains_as_the_uncached_phase_with_its_prefix_in_eval_mode(tmp_path):
    cached, ft = loop_run(True, tmp_path)
    plain, _ = loop_run(False, tmp_path)
    assert_same(params(cached), params(plain))
    assert "2 batches served from it, 4 computed" in ft.history[0].prefix_cache
    assert ft.history[1].prefix_cache is None
    no_spill_folders(tmp_path)


def test_loop_prefix_cache_argument_must_be_a_mapping():
    model = Net(None)
    with pytest.raises(ConfigurationError, match=r"prefix_cache must map phase indices to True, False or .* got list"):
        ScheduledFinetuning(SCHEDULE, model, torch.optim.SGD(model.parameters(), lr=0.1), prefix_cache=[0])


def test_loop_a_resume_says_nothing_of_the_unused_cache_its_constructor_started(tmp_path, caplog):
    model = Net(None)
    train = IndexedDataset(data())
    ft = ScheduledFinetuning(SCHEDULE, model, torch.optim.SGD(model.parameters(), lr=0.1), restore_best=False,
                             epoch_transitions_only=True, prefix_cache={0: True}, train_dataset=train, spill_dir=tmp_path)
    state = ft.state_dict()
    ft.close()
    model = Net(None)
    with caplog.at_level("INFO", logger="phasetune"):
        resumed = ScheduledFinetuning(SCHEDULE, model, torch.optim.SGD(model.parameters(), lr=0.1), restore_best=False,
                                      epoch_transitions_only=True, prefix_cache={0: True}, train_dataset=train,
                                      spill_dir=tmp_path)
        resumed.load_state_dict(state)
    assert "0 samples" not in caplog.text and "batches served" not in caplog.text
    assert resumed.caches.active  # phase 0's cache, started again by the resume
    resumed.close()


# ---------------------------------------------------------------------------------------------- Hugging Face
class Items(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = data().tensors

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def hf_run(tmp_path: Path, cached: bool, **overrides) -> tuple[Net, PhasetuneTrainerCallback]:
    ft = PhasetuneTrainerCallback(SCHEDULE, restore_best=False, epoch_transitions_only=True,
                                  prefix_cache={0: True} if cached else None)
    model = Net(None if cached else lambda: ft.depth == 0)
    args = training_args(tmp_path, num_train_epochs=4, per_device_train_batch_size=16, eval_strategy="no",
                         save_strategy="no", metric_for_best_model=None, optim="sgd", learning_rate=0.1,
                         lr_scheduler_type="constant", max_grad_norm=0.0, **{"remove_unused_columns": False, **overrides})
    PhasetuneTrainer(model=model, args=args, train_dataset=IndexedDataset(Items()) if cached else Items(),
                     callbacks=[ft]).train()
    return model, ft


@pytest.mark.numerical
def test_hf_a_cached_phase_trains_as_the_uncached_phase_with_its_prefix_in_eval_mode(tmp_path):
    cached, ft = hf_run(tmp_path / "cached", True)
    plain, _ = hf_run(tmp_path / "plain", False)
    assert_same(params(cached), params(plain))
    assert "2 batches served from it, 4 computed" in ft.history[0].prefix_cache
    assert ft.caches is None
    no_spill_folders(tmp_path / "cached")


def test_hf_refuses_the_cache_when_the_trainer_drops_unused_columns(tmp_path):
    with pytest.raises(ConfigurationError) as e:
        hf_run(tmp_path, True, remove_unused_columns=True)
    assert len(e.value.problems) == 1
    assert "remove_unused_columns=True" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- one order everywhere
TRANSITION_ORDER = ["leave cache", "transition", "install", "reset patience", "audit", "enter cache"]


@pytest.fixture
def events(monkeypatch) -> list[str]:
    """What each front end does at a transition, in the order it happens (recorded around the real calls)."""
    seen: list[str] = []

    def record(cls: type, name: str, label: str, when=lambda *args, **kwargs: True) -> None:
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            if when(*args, **kwargs):
                seen.append(label)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    record(PrefixCachePhases, "leave", "leave cache", when=lambda history=None: bool(history))  # not enter's own
    record(PrefixCachePhases, "enter", "enter cache")
    record(PhaseRun, "transition", "transition")
    record(PhaseRun, "audit_phase", "audit")
    for host in (FinetuningScheduler, PhasetuneTrainerCallback, ScheduledFinetuning):
        record(host, "install", "install")
    for patience in (Patience, FTSEarlyStopping):
        record(patience, "start_phase", "reset patience")
    return seen


def first_transition(seen: list[str]) -> list[str]:
    start = seen.index("transition") - 1
    return seen[start: seen.index("enter cache", start) + 1]


class ValidatedModule(Module):
    """The Lightning prefix module with a validation loss, so that FTSEarlyStopping (Lightning's patience) runs."""

    def validation_step(self, batch, batch_idx):
        (x, y), _ = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def val_dataloader(self):
        return self.train_dataloader()


def test_every_front_end_runs_a_transition_in_one_order(tmp_path, events):
    fts = FinetuningScheduler(CACHED, restore_best=False)
    trainer(tmp_path / "lightning", [fts, FTSEarlyStopping(monitor="val_loss", patience=10)], max_epochs=3,
            enable_checkpointing=False).fit(ValidatedModule())
    lightning = first_transition(events)
    events.clear()
    hf_run(tmp_path / "hf", True)
    hf = first_transition(events)
    events.clear()
    loop_run(True, tmp_path / "loop")
    assert lightning == hf == first_transition(events) == TRANSITION_ORDER
