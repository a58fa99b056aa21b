"""Small models and data shared by the tests (and the multi-process scripts they launch)."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from phasetune.features.prefix_cache.cache import IndexedDataset

D_IN, D_MODEL, N_CLASSES = 8, 16, 2


class Block(nn.Module):
    def __init__(self, d: int = D_MODEL, batchnorm: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(d) if batchnorm else nn.LayerNorm(d)
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(self.norm(x)))


class Net(nn.Module):
    """embed -> 4 blocks -> head: a transformer-shaped toy (20 parameter tensors)."""

    def __init__(self, n_layers: int = 4, batchnorm: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(D_IN, D_MODEL)
        self.layers = nn.ModuleList(Block(batchnorm=batchnorm) for _ in range(n_layers))
        self.head = nn.Linear(D_MODEL, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


SCHEDULE_3 = {
    0: {"params": ["model.head.*"]},
    1: {"params": [r"model\.layers\.3\..*", r"model\.layers\.2\..*"], "lr": 0.05},
    2: {"params": [r"model\.layers\.[01]\..*", "model.embed.*"], "lr": 0.02},
}


def dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


class ToyModule(pl.LightningModule):
    """A LightningModule over :class:`Net`.

    ``val_losses`` scripts the logged ``val_loss`` per epoch (index = epoch; the last value repeats), so
    early-stopping-driven transitions happen at known epochs regardless of training.
    """

    def __init__(
        self,
        val_losses: Sequence[float] | None = None,
        lr: float = 0.1,
        optimizer: str = "sgd",
        scheduler: str | None = None,
        batchnorm: bool = False,
        n_layers: int = 4,
        all_params_in_optimizer: bool = False,
        batch_size: int = 16,
    ) -> None:
        super().__init__()
        self.model = Net(n_layers=n_layers, batchnorm=batchnorm)
        self.val_losses = list(val_losses) if val_losses is not None else None
        self.lr = lr
        self.optimizer_name = optimizer
        self.scheduler_name = scheduler
        self.all_params_in_optimizer = all_params_in_optimizer
        self.batch_size = batch_size
        self.seen_val_epochs: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        real = nn.functional.cross_entropy(self(x), y)
        if self.val_losses is not None:
            i = min(self.current_epoch, len(self.val_losses) - 1)
            loss = torch.tensor(float(self.val_losses[i]))
        else:
            loss = real
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val_real_loss", real, on_epoch=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        params = self.parameters() if self.all_params_in_optimizer else [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "adam":
            opt = torch.optim.Adam(params, lr=self.lr)
        else:
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        if self.scheduler_name is None:
            return opt
        if self.scheduler_name == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        elif self.scheduler_name == "lambda":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.95**e)
        elif self.scheduler_name == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}
        else:
            raise ValueError(self.scheduler_name)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(dataset(64, 0), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(dataset(32, 1), batch_size=32)


def trainer(tmp_path: Any, callbacks: list, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU trainer for tests."""
    defaults: dict[str, Any] = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_epochs=6,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def float32_drift(steps: int, dot: int, scale: float = 1.0) -> float:
    """The tolerance of a numerical comparison of float32 weights: two runs that sum in another order (other
    kernels, batch compositions, reductions) may round a sum of ``dot`` terms differently by up to ``dot`` unit
    roundoffs of its terms' magnitudes; over ``steps`` optimizer steps, at weights of magnitude ``scale``."""
    return steps * dot * FLOAT32_UNIT_ROUNDOFF * scale


def lr_approx(expected: Any) -> Any:
    """Numerical: learning rates computed in float64 (a scheduler's products and quotients, each rounding by up to
    2**-53 of its value) against decimal literals: equal within 1e-12, relative."""
    import pytest

    return pytest.approx(expected, rel=1e-12)


def assert_bit_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    """Exact: every tensor of ``a`` bit-equal to ``b``'s of the same name (a resume against the uninterrupted run,
    on the same machine, the same operations and batches)."""
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


class NoisyData(torch.utils.data.Dataset):
    """``dataset(64, 0)`` with noise from Python's ``random.gauss`` (its cached second value) and NumPy's global
    generator: a resume that did not give back both random states would not be bit-equal."""

    def __init__(self) -> None:
        self.data = dataset(64, 0)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x, y = self.data[i]
        return x + 0.01 * random.gauss(0, 1) + 0.01 * float(np.random.normal()), y


#: the scripted val_loss of the resume tests: with patience 2, transitions at epochs 4 and 7, the run ends at 11
RESUME_LOSSES = [1.0, 0.9, 0.95, 0.96, 0.8, 0.85, 0.86, 0.87, 0.5, 0.6, 0.7, 0.8]


class DropoutToyModule(ToyModule):
    """:class:`ToyModule` (Adam at 0.01, StepLR) with Dropout(0.2) on its input and a shuffled loader over
    :class:`NoisyData`: every random generator an exact resume must bring back is drawn from (torch's for the
    order and the masks, Python's and NumPy's for the noise). Lightning puts its DistributedSampler under it."""

    def __init__(self, val_losses: Sequence[float] = RESUME_LOSSES, batch_size: int = 16) -> None:
        super().__init__(val_losses=val_losses, optimizer="adam", lr=0.01, scheduler="step", batch_size=batch_size)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.drop(x))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(NoisyData(), batch_size=self.batch_size, shuffle=True)


# ---------------------------------------------------------------------------------------------- prefix cache
class PrefixNet(nn.Module):
    """A frozen-body/trainable-head network for the prefix cache (tests/test_prefix_frontends.py and the DDP
    scenarios). ``eval_body``: called on each training forward, True puts the body in eval mode (what the cache
    does in a cached phase), False back in training mode. ``dropout``: ``"body"`` puts Dropout(0.3) in the body,
    ``"head"`` between body and head (in the suffix, which trains), None nowhere; the parameters are the same
    tensors, initialised the same, in every case."""

    def __init__(self, eval_body: Callable[[], bool] | None = None, dropout: str | None = "body") -> None:
        super().__init__()
        torch.manual_seed(0)
        body_drop = nn.Dropout(0.3) if dropout == "body" else nn.Identity()  # an Identity keeps body.3 the prefix end
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), body_drop, nn.Linear(16, 16), nn.ReLU())
        self.drop = nn.Dropout(0.3) if dropout == "head" else nn.Identity()
        self.head = nn.Linear(16, 2)
        self.eval_body = eval_body

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.training and self.eval_body is not None:
            self.body.train(not self.eval_body())
        logits = self.head(self.drop(self.body(x)))
        return logits if labels is None else {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def prefix_data(n: int = 48) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


class PrefixModule(pl.LightningModule):
    """:class:`PrefixNet` as a LightningModule over ``IndexedDataset(prefix_data())`` (shuffled batches)."""

    def __init__(self, eval_body: Callable[[], bool] | None = None, dropout: str | None = "body",
                 batch_size: int = 16) -> None:
        super().__init__()
        net = PrefixNet(eval_body, dropout)
        self.body, self.drop, self.head, self.eval_body = net.body, net.drop, net.head, eval_body
        self.batch_size = batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.eval_body is not None:
            self.body.train(not self.eval_body())
        return self.head(self.drop(self.body(x)))

    def training_step(self, batch, batch_idx):
        (x, y), _ = batch  # IndexedDataset items: ((x, y), index)
        return nn.functional.cross_entropy(self(x), y)

    def train_dataloader(self):
        return DataLoader(IndexedDataset(prefix_data()), batch_size=self.batch_size, shuffle=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PrefixSpills(pl.Callback):
    """Spill every entry (tiny chunks; with ``limit_mb: 0``) and count this rank's spill files at the end of epoch
    ``at_epoch`` (the cached phase's last)."""

    def __init__(self, fts: Any, at_epoch: int = 1) -> None:
        self.fts, self.at_epoch, self.files = fts, at_epoch, 0

    def on_fit_start(self, trainer, pl_module):
        assert "on_train_batch_start" in vars(self.fts)  # the per-batch hook exists in a fit that caches
        self.fts.caches.chunk_bytes = 256

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.at_epoch:
            self.files = len(self.fts.caches.cache.spill_files())
