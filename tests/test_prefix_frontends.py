"""The frozen-prefix cache (``prefix_cache``) through the three front ends: a cached phase trains exactly as the same
phase without the cache with its prefix in eval mode, its line lands in the history, its spill files go, and what
cannot work is refused before training."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distributed.hf_scenarios import training_args
from helpers import one_process_environment, trainer
from phasetune import ConfigurationError, FinetuningScheduler
from phasetune.hf import PhasetuneTrainer, PhasetuneTrainerCallback
from phasetune.lightning.sharded import ShardedStrategyAdapter
from phasetune.lightning.summary import summary_table
from phasetune.loop import ScheduledFinetuning
from phasetune.prefix_cache import IndexedDataset, strip_indices
from phasetune.run import PhaseRun, RunEnv

# phase 0 trains the head on a frozen body (epochs 0-1, the second served from the cache); phase 1 thaws the body
SCHEDULE = {0: {"params": [r"head\..*"], "max_transition_epoch": 2},
            1: {"params": [r"body\..*"], "lr": 0.05, "max_transition_epoch": 4}}
CACHED = {0: {**SCHEDULE[0], "prefix_cache": True}, 1: SCHEDULE[1]}


@pytest.fixture(autouse=True, scope="module")
def one_process_trainer():
    """Hugging Face Trainers here run as one plain process (see helpers.one_process_environment)."""
    with one_process_environment():
        yield



class Net(nn.Module):
    """A frozen-body/trainable-head network with dropout in the body. ``eval_body``: called on each training forward,
    True puts the body in eval mode (what the cache does in a cached phase), False back in training mode."""

    def __init__(self, eval_body: Callable[[], bool] | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 2)
        self.eval_body = eval_body

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.training and self.eval_body is not None:
            self.body.train(not self.eval_body())
        logits = self.head(self.body(x))
        return logits if labels is None else {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def data(n: int = 48) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def no_spill_folders(where: Path) -> None:
    assert not list(Path(where).rglob("prefix-cache-*")), "spill folders left behind"


# ---------------------------------------------------------------------------------------------- Lightning
class Module(pl.LightningModule):
    def __init__(self, eval_body: Callable[[], bool] | None = None) -> None:
        super().__init__()
        net = Net(eval_body)
        self.body, self.head, self.eval_body = net.body, net.head, eval_body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.eval_body is not None:
            self.body.train(not self.eval_body())
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        (x, y), _ = batch  # IndexedDataset items: ((x, y), index)
        return nn.functional.cross_entropy(self(x), y)

    def train_dataloader(self):
        return DataLoader(IndexedDataset(data()), batch_size=16, shuffle=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Spills(pl.Callback):
    """Spill every entry (tiny chunks) and count the spill files at the end of phase 0's last epoch."""

    def __init__(self, fts: FinetuningScheduler) -> None:
        self.fts, self.files = fts, 0

    def on_fit_start(self, trainer, pl_module):
        assert "on_train_batch_start" in vars(self.fts)  # the per-batch hook exists in a fit that caches
        self.fts._caches.chunk_bytes = 256

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.files = len(self.fts._caches.cache.spill_files())


def lightning_run(tmp_path: Path, cached: bool) -> tuple[Module, FinetuningScheduler, Spills | None]:
    fts = FinetuningScheduler(CACHED if cached else SCHEDULE, restore_best=False, epoch_transitions_only=True,
                              prefix_cache={0: {"limit_mb": 0}} if cached else None)
    module = Module(None if cached else lambda: fts.curr_depth == 0)
    spills = Spills(fts) if cached else None
    torch.manual_seed(0)
    trainer(tmp_path, [fts, *([spills] if spills else [])], max_epochs=4, limit_val_batches=0,
                                                         enable_checkpointing=False).fit(module)
    return module, fts, spills


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
    assert fts._caches is None and "on_train_batch_start" not in vars(fts)  # hooks gone with the fit
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


def test_loop_a_cached_phase_trains_as_the_uncached_phase_with_its_prefix_in_eval_mode(tmp_path):
    cached, ft = loop_run(True, tmp_path)
    plain, _ = loop_run(False, tmp_path)
    assert_same(params(cached), params(plain))
    assert "2 batches served from it, 4 computed" in ft.history[0].prefix_cache
    assert ft.history[1].prefix_cache is None
    no_spill_folders(tmp_path)


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
