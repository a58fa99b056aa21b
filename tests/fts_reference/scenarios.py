"""Scenarios that run the same scheduled fine-tune under finetuning-scheduler (FTS) or phasetune.

Plain torch + Lightning only: the scheduler, early-stopping and checkpoint classes are passed in, so this module
imports neither FTS nor phasetune.

Every scenario is one small deterministic fit on CPU: a 4-layer MLP (``layers.0`` .. ``layers.3``; ``layers.3``
is the head), fixed unshuffled data (4 training batches, 1 validation batch per epoch), SGD with momentum, an
optional epoch-interval ``StepLR``, and an explicit 3-phase schedule. The monitored ``val_loss`` is a scripted
curve indexed by epoch (``Scenario.val_curve``), so *when* a phase ends depends only on the transition rules
under test, never on numerics; ``val_mse`` is always the real validation loss, and ``val_curve=None`` monitors
it instead.

Hook order, and why the recorder sees what the scheduler decided:

- Lightning calls a hook on the callbacks in ``trainer.callbacks`` order, after moving checkpoint callbacks
  (``ModelCheckpoint`` and subclasses such as ``FTSCheckpoint``) to the end; callbacks run before the
  LightningModule's own hook of the same name (except the monitoring callbacks in ``on_train_epoch_end``).
- FTS 2.14.1 decides and performs a transition in ``on_train_epoch_start`` (restore the best checkpoint, thaw,
  add param groups); FTSEarlyStopping marks a phase complete in ``on_validation_end``.
- An epoch-interval lr scheduler steps after the epoch's last training batch, *before* that epoch's validation,
  so a checkpoint saved at validation end already holds the stepped scheduler.
- The recorder therefore takes its epoch-start row in ``on_train_batch_start`` of batch 0: after every
  epoch-start hook of every callback and of the module, i.e. exactly the thawed set, param groups and lrs the
  epoch's first optimizer step uses, whichever epoch-start hook a scheduler transitions in. It is placed right
  after the scheduler in ``callbacks`` all the same, so that for any hook they share it runs second. Its
  epoch-end half (``val_loss``, the weights after the epoch) runs in ``on_train_epoch_end``, after validation
  and after early stopping's ``on_validation_end``; ``on_fit_end`` takes the final per-parameter sums.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SEED = 7
D_IN, D_HIDDEN = 6, 16
N_TRAIN, N_VAL, BATCH = 32, 16, 8

# Phase 0 names tensors exactly, phase 1 uses a regex that matches whole names (fine under both re.match and
# re.fullmatch), phase 2 has no lr so it gets base_max_lr.
SCHEDULE: dict[int, dict[str, Any]] = {
    0: {"params": ["layers.3.weight", "layers.3.bias"]},
    1: {"params": [r"layers\.2\..*"], "lr": 0.05},
    2: {"params": [r"layers\.[01]\..*"]},
}
BASE_FTS_KWARGS: dict[str, Any] = {"base_max_lr": 0.02}

# val_loss by epoch. CURVE_A: best 0.8 at epoch 2, a new best 0.7 at 4 and 0.6 at 7. CURVE_B: falls to 0.8 at
# epoch 2 and rises from epoch 3 on (the "falls until epoch 3, then rises"). FALLING never stops improving.
CURVE_A = (1.0, 0.9, 0.8, 0.85, 0.7, 0.75, 0.8, 0.6, 0.65, 0.7, 0.72, 0.74, 0.76, 0.78)
CURVE_B = (1.0, 0.9, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.25)
CONSTANT = (0.5,) * 14
FALLING = tuple(round(1.0 - 0.05 * e, 2) for e in range(14))

SGD_MOMENTUM = {"class": "SGD", "lr": 0.1, "momentum": 0.9}
STEP_LR = {"class": "StepLR", "step_size": 1, "gamma": 0.7, "interval": "epoch"}
ES_PATIENCE_1 = {"monitor": "val_loss", "mode": "min", "patience": 1}
CKPT = {"monitor": "val_loss", "mode": "min", "save_top_k": 1}

# What every Trainer gets (a scenario's ``trainer`` adds to it; ``default_root_dir`` is set per run).
BASE_TRAINER: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "deterministic": True,
    "log_every_n_steps": 1,
}


@dataclass(frozen=True)
class Scenario:
    """One fit: the schedule, the keyword arguments of each callback and of the Trainer, the optimizer."""

    name: str
    description: str
    schedule: Mapping[int, Mapping[str, Any]] = field(default_factory=lambda: copy.deepcopy(SCHEDULE))
    fts_kwargs: Mapping[str, Any] = field(default_factory=dict)  # FinetuningScheduler, besides ft_schedule
    early_stopping: Mapping[str, Any] | None = field(default_factory=lambda: dict(ES_PATIENCE_1))  # None: no ES
    checkpoint: Mapping[str, Any] = field(default_factory=lambda: dict(CKPT))  # FTSCheckpoint, besides dirpath
    trainer: Mapping[str, Any] = field(default_factory=dict)
    optimizer: Mapping[str, Any] = field(default_factory=lambda: dict(SGD_MOMENTUM))
    lr_scheduler: Mapping[str, Any] | None = None
    val_curve: Sequence[float] | None = CURVE_A

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings; schedule phase keys become strings, as in any JSON file."""
        out = asdict(self)
        out["schedule"] = {str(k): dict(v) for k, v in self.schedule.items()}
        out["val_curve"] = list(self.val_curve) if self.val_curve is not None else None
        return out


def _kw(**kwargs: Any) -> dict[str, Any]:
    return {**BASE_FTS_KWARGS, **kwargs}


def _with_epochs(*epochs: int) -> dict[int, dict[str, Any]]:
    sched = copy.deepcopy(SCHEDULE)
    for depth, epoch in enumerate(epochs):
        sched[depth]["max_transition_epoch"] = epoch
    return sched


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("es_restore_best", "early-stopping transitions (patience 1), all phases, restore_best on",
             fts_kwargs=_kw(), trainer={"max_epochs": 12}),
    Scenario("es_no_restore", "as es_restore_best with restore_best off",
             fts_kwargs=_kw(restore_best=False), trainer={"max_epochs": 12}),
    Scenario("max_depth_0", "max_depth 0: phase 0 is the final phase", fts_kwargs=_kw(max_depth=0),
             trainer={"max_epochs": 12}),
    Scenario("max_depth_1", "max_depth 1: phase 2 never runs", fts_kwargs=_kw(max_depth=1),
             trainer={"max_epochs": 12}),
    Scenario("constant_monitor", "val_loss constant (patience 2): no check after the first ever improves",
             fts_kwargs=_kw(), early_stopping={**ES_PATIENCE_1, "patience": 2}, trainer={"max_epochs": 12},
             val_curve=CONSTANT),
    Scenario("issue_patience1_mte3", "issue 11 case 1: patience 1, phase 0 ends by max_transition_epoch 3, "
             "val_loss falls to epoch 2 and rises from 3", schedule=_with_epochs(3), fts_kwargs=_kw(),
             trainer={"max_epochs": 12}, val_curve=CURVE_B),
    Scenario("epoch_only_123", "issue 11 case 3: epoch_transitions_only, max_transition_epoch 1/2/3, max_epochs 6",
             schedule=_with_epochs(1, 2, 3), fts_kwargs=_kw(epoch_transitions_only=True), early_stopping=None,
             trainer={"max_epochs": 6}),
    Scenario("epoch_only_123_no_restore", "epoch_only_123 with restore_best off",
             schedule=_with_epochs(1, 2, 3), fts_kwargs=_kw(epoch_transitions_only=True, restore_best=False),
             early_stopping=None, trainer={"max_epochs": 6}),
    Scenario("final_phase_mte", "early stopping never fires; max_transition_epoch 2/4/8 with max_epochs 5 "
             "(the final phase's max_transition_epoch exceeds max_epochs)", schedule=_with_epochs(2, 4, 8),
             fts_kwargs=_kw(), trainer={"max_epochs": 5}, val_curve=FALLING),
    Scenario("steplr_es_restore", "issue 11 case 2: StepLR (gamma 0.7 per epoch), early-stopping transitions, "
             "restore_best on", fts_kwargs=_kw(), trainer={"max_epochs": 12}, lr_scheduler=dict(STEP_LR)),
    Scenario("steplr_es_no_restore", "steplr_es_restore with restore_best off",
             fts_kwargs=_kw(restore_best=False), trainer={"max_epochs": 12}, lr_scheduler=dict(STEP_LR)),
    Scenario("steplr_epoch_only", "StepLR with epoch_transitions_only at 3/5/7, max_epochs 8, restore_best on",
             schedule=_with_epochs(3, 5, 7), fts_kwargs=_kw(epoch_transitions_only=True), early_stopping=None,
             trainer={"max_epochs": 8}, lr_scheduler=dict(STEP_LR)),
    Scenario("best_from_earlier_phase", "epoch_transitions_only at 3/5/7, max_epochs 7, restore_best on; phase 1 "
             "(epochs 3-4) never beats phase 0's best (epoch 2), so the restore before phase 2 goes back to it",
             schedule=_with_epochs(3, 5, 7), fts_kwargs=_kw(epoch_transitions_only=True), early_stopping=None,
             trainer={"max_epochs": 7}, val_curve=CURVE_B),
    Scenario("real_val_loss", "monitors the real validation loss (patience 1), restore_best on",
             fts_kwargs=_kw(), trainer={"max_epochs": 10}, val_curve=None),
)


def scenario(name: str) -> Scenario:
    """The scenario called ``name``."""
    for s in SCENARIOS:
        if s.name == name:
            return s
    raise KeyError(f"no scenario {name!r}; known: {', '.join(s.name for s in SCENARIOS)}")


# ---------------------------------------------------------------------------------------------- model and data
def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    y = 0.5 * x[:, :1] - 0.3 * x[:, 1:2] + 0.4 * torch.tanh(x[:, 2:3] * x[:, 3:4])
    return TensorDataset(x, y)


class ReferenceModule(pl.LightningModule):
    """4 Linear layers with tanh between them; logs ``val_loss`` (scripted or real) and ``val_mse``."""

    def __init__(self, sc: Scenario) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(SEED)
        sizes = [(D_IN, D_HIDDEN), (D_HIDDEN, D_HIDDEN), (D_HIDDEN, D_HIDDEN), (D_HIDDEN, 1)]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in sizes)
        with torch.no_grad():
            for p in self.parameters():  # independent of the global RNG, so of anything run before
                p.copy_(torch.empty_like(p).uniform_(-0.5, 0.5, generator=g))
        self.sc = sc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        mse = nn.functional.mse_loss(self(x), y)
        self.log("val_mse", mse)
        curve = self.sc.val_curve
        if curve is None:
            self.log("val_loss", mse)
            return
        epoch = self.trainer.current_epoch
        if epoch >= len(curve):
            raise IndexError(f"scenario {self.sc.name!r}: val_curve has {len(curve)} values, epoch {epoch} needs more")
        self.log("val_loss", torch.tensor(float(curve[epoch])))

    def configure_optimizers(self) -> Any:
        cfg = dict(self.sc.optimizer)
        opt_cls = getattr(torch.optim, cfg.pop("class"))
        # the FTS idiom: the scheduler froze everything but phase 0 in setup, before this runs
        optimizer = opt_cls([p for p in self.parameters() if p.requires_grad], **cfg)
        if self.sc.lr_scheduler is None:
            return optimizer
        lcfg = dict(self.sc.lr_scheduler)
        sched_cls = getattr(torch.optim.lr_scheduler, lcfg.pop("class"))
        interval = lcfg.pop("interval", "epoch")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched_cls(optimizer, **lcfg), "interval": interval}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_data(N_TRAIN, 0), batch_size=BATCH, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_data(N_VAL, 1), batch_size=N_VAL, shuffle=False)


# ---------------------------------------------------------------------------------------------- the recorder
def _param_sum(module: nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in module.parameters()))


def _param_abs_sum(module: nn.Module) -> float:
    """The sum of the weights' magnitudes: the scale of the rounding error of :func:`_param_sum` (whose signed
    terms can cancel to near zero)."""
    return float(sum(p.detach().double().abs().sum() for p in module.parameters()))


class TrajectoryRecorder(Callback):
    """Records one row per trained epoch and the final weights; put it right after the scheduler callback.

    Row keys: ``epoch``, ``depth`` (the scheduler's ``curr_depth``), ``thawed`` (names with ``requires_grad``,
    registration order), ``groups`` (the parameter names of each optimizer param group), ``lrs`` (each group's
    lr), ``sched_last_lr`` (``get_last_lr()`` of the first lr scheduler, or None), ``global_step``,
    ``param_sum_start`` (all weights, at the epoch's first batch: shows a restore-best) and
    ``param_abs_sum_start`` (their magnitudes: the scale the sum is compared at), then at epoch end ``val_loss``,
    ``depth_end``, ``param_sum_end`` and ``param_abs_sum_end``. ``final`` (at fit end): ``epoch``,
    ``global_step``, ``depth``, ``epochs_trained``, ``thawed``, ``param_sums`` and ``param_abs_sums`` (per
    parameter).
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.epochs: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}

    def _depth(self) -> int | None:
        depth = getattr(self.scheduler, "curr_depth", None)
        return None if depth is None else int(depth)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx != 0:
            return
        names = {id(p): n for n, p in pl_module.named_parameters()}
        optimizer = trainer.optimizers[0]
        configs = trainer.lr_scheduler_configs
        self.epochs.append({
            "epoch": trainer.current_epoch,
            "depth": self._depth(),
            "thawed": [n for n, p in pl_module.named_parameters() if p.requires_grad],
            "groups": [[names.get(id(p), "<not a parameter>") for p in g["params"]] for g in optimizer.param_groups],
            "lrs": [float(g["lr"]) for g in optimizer.param_groups],
            "sched_last_lr": [float(v) for v in configs[0].scheduler.get_last_lr()] if configs else None,
            "global_step": trainer.global_step,
            "param_sum_start": _param_sum(pl_module),
            "param_abs_sum_start": _param_abs_sum(pl_module),
        })

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.epochs or self.epochs[-1]["epoch"] != trainer.current_epoch:
            return
        value = trainer.callback_metrics.get("val_loss")
        self.epochs[-1].update(
            val_loss=None if value is None else float(value),
            depth_end=self._depth(),
            param_sum_end=_param_sum(pl_module),
            param_abs_sum_end=_param_abs_sum(pl_module),
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.final = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "depth": self._depth(),
            "epochs_trained": len(self.epochs),
            "thawed": [n for n, p in pl_module.named_parameters() if p.requires_grad],
            "param_sums": {n: float(p.detach().double().sum()) for n, p in pl_module.named_parameters()},
            "param_abs_sums": {n: float(p.detach().double().abs().sum()) for n, p in pl_module.named_parameters()},
        }


# ---------------------------------------------------------------------------------------------- one run
NOISE = (  # Lightning chatter that says nothing about scheduling
    "does not have many workers",
    "log_every_n_steps",
    "GPU available",
    "TPU available",
    "HPU available",
    "You are using a CUDA device",
    "isinstance(treespec, LeafSpec)",
    "deterministic",
    "Seed set to",
    "Tip: For seamless cloud logging",
)
CAPTURED_LOGGERS = ("lightning", "lightning.pytorch", "lightning_fabric", "finetuning_scheduler", "phasetune")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


@contextmanager
def _captured() -> Iterator[tuple[_Collect, list[warnings.WarningMessage]]]:
    handler = _Collect()
    saved = []
    for name in CAPTURED_LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.level))
        lg.addHandler(handler)
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler, caught
    finally:
        for lg, level in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)


def _clean(lines: Sequence[str], root: Path) -> list[str]:
    out: list[str] = []
    for line in lines:
        if any(n in line for n in NOISE):
            continue
        line = line.replace(str(root), "<root>")
        line = re.sub(r"0x[0-9a-f]{6,}", "0x...", line)
        out.append(line)
    return out


def run_scenario(sc: Scenario, scheduler_cls: type, early_stopping_cls: type, checkpoint_cls: type,
                 root_dir: str | Path) -> dict[str, Any]:
    """Fit ``sc`` with the given FinetuningScheduler / FTSEarlyStopping / FTSCheckpoint classes under ``root_dir``.

    Returns ``{"epochs": [...], "final": {...}, "messages": [...], "warnings": [...]}`` (see
    :class:`TrajectoryRecorder`); messages and warnings have ``root_dir`` replaced by ``<root>``.
    """
    root = Path(root_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _captured() as (logs, caught):
            pl.seed_everything(SEED, verbose=False)
            module = ReferenceModule(sc)
            scheduler = scheduler_cls(ft_schedule=copy.deepcopy(dict(sc.schedule)), **sc.fts_kwargs)
            recorder = TrajectoryRecorder(scheduler)
            callbacks: list[Callback] = [scheduler, recorder]
            if sc.early_stopping is not None:
                callbacks.append(early_stopping_cls(**sc.early_stopping))
            callbacks.append(checkpoint_cls(dirpath=str(root / "checkpoints"), **sc.checkpoint))
            trainer = pl.Trainer(default_root_dir=str(root), callbacks=callbacks, **{**BASE_TRAINER, **sc.trainer})
            trainer.fit(module)
    finally:
        torch.set_num_threads(threads)
    return {
        "epochs": recorder.epochs,
        "final": recorder.final,
        "messages": _clean(logs.lines, root),
        "warnings": _clean([str(w.message) for w in caught], root),
    }


# ---------------------------------------------------------------------------------------------- thawed sets only
class ThawedRecorder(Callback):
    """Records ``[epoch, depth, thawed names]`` at each epoch's first batch (as :class:`TrajectoryRecorder` does),
    touching no weights: it runs under any strategy, sharded ones included."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.rows: list[list[Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            depth = getattr(self.scheduler, "curr_depth", None)
            self.rows.append([trainer.current_epoch, depth,
                              [n for n, p in pl_module.named_parameters() if p.requires_grad]])


class _Stack(nn.ModuleList):
    """The layers with the forward :class:`ReferenceModule` runs over them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self[:-1]:
            x = torch.tanh(layer(x))
        return self[-1](x)


class ShardableReferenceModule(ReferenceModule):
    """:class:`ReferenceModule` (same names, weights and data) whose ``layers`` container has a forward: FSDP2
    shards the module holding every parameter (here ``layers``) last, and ``fully_shard`` refuses a plain
    ``ModuleList``."""

    def __init__(self, sc: Scenario) -> None:
        super().__init__(sc)
        self.layers = _Stack(list(self.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def thawed_per_epoch(sc: Scenario, scheduler_cls: type, early_stopping_cls: type, checkpoint_cls: type,
                     root_dir: str | Path, scheduler_kwargs: Mapping[str, Any] | None = None,
                     shardable: bool = False, **trainer_kwargs: Any) -> list[list[Any]]:
    """Fit ``sc`` as :func:`run_scenario` does, with ``trainer_kwargs`` added to the Trainer's (e.g. ``devices=2,
    strategy="ddp"``) and ``scheduler_kwargs`` to the scheduler's; returns :class:`ThawedRecorder`'s rows.
    ``shardable`` fits :class:`ShardableReferenceModule` (for FSDP2)."""
    root = Path(root_dir)
    pl.seed_everything(SEED, verbose=False)
    module = ShardableReferenceModule(sc) if shardable else ReferenceModule(sc)
    scheduler = scheduler_cls(ft_schedule=copy.deepcopy(dict(sc.schedule)), **sc.fts_kwargs, **(scheduler_kwargs or {}))
    recorder = ThawedRecorder(scheduler)
    callbacks: list[Callback] = [scheduler, recorder]
    if sc.early_stopping is not None:
        callbacks.append(early_stopping_cls(**sc.early_stopping))
    callbacks.append(checkpoint_cls(dirpath=str(root / "checkpoints"), **sc.checkpoint))
    trainer = pl.Trainer(default_root_dir=str(root), callbacks=callbacks,
                         **{**BASE_TRAINER, **sc.trainer, **trainer_kwargs})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    return recorder.rows
