"""A small transformer-shaped LightningModule for the FSDP2 tests (sharded and single-process runs)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from helpers import D_IN, D_MODEL, N_CLASSES, Block, ToyModule, dataset

# phases end at fixed epochs; later phases' parameters must not move before their phase starts
SCHEDULE = {
    0: {"params": ["model.head.*", "model.norm.*"], "max_transition_epoch": 2},
    1: {"params": [r"model\.layers\.[23]\..*"], "lr": 0.05, "max_transition_epoch": 4},
    2: {"params": [r"model\.layers\.[01]\..*", "model.embed.*"], "lr": 0.02, "max_transition_epoch": 6},
}
# the plan the issue asks for: each block, the output head and the final norm (embed stays in the root unit)
PLAN = {r"model\.layers\.\d+": {}, "model.norm": {}, "model.head": {}}
# activation checkpointing both ways and fsdp_default_kwargs that the head's own entry overrides
ACT_CKPT_PLAN = {
    r"model\.layers\.[01]": {"act_ckpt": "wrapped"},
    r"model\.layers\.[23]": {"act_ckpt": ["composable", {}]},
    "model.norm": {},
    "model.head": {"reshard_after_forward": True, "cpu_offload_policy": None},
}
ACT_CKPT_DEFAULTS = {"reshard_after_forward": False, "cpu_offload_policy": {"pin_memory": False}}
# scripted val_loss per epoch: phase 0's best is epoch 0 and phase 1's is epoch 2, so restore-best matters
LOSSES = [1.0, 1.1, 0.9, 0.95, 0.8, 0.85]
TRAINABLE_TENSORS_PER_EPOCH = [4, 4, 12, 12, 22, 22]


class TinyLM(nn.Module):
    """embed -> 4 pre-norm residual blocks -> final norm -> head (22 parameter tensors)."""

    def __init__(self, n_layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(D_IN, D_MODEL)
        self.layers = nn.ModuleList(Block() for _ in range(n_layers))
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


class LMModule(ToyModule):
    """ToyModule's training/validation around :class:`TinyLM` (SGD with momentum, StepLR, scripted val_loss).

    SGD, not Adam: Adam's first steps move each weight by about ``lr * sign(grad)``, so gradients that are
    zero up to float noise make a sharded run and a single-process run differ by ``2 * lr``; SGD's
    updates are linear in the gradients, so the two runs agree to float tolerance.
    """

    def __init__(self, batch_size: int = 8, val_losses: Any = LOSSES) -> None:
        super().__init__(val_losses=val_losses, lr=0.1, optimizer="sgd", scheduler="step", batch_size=batch_size,
                         n_layers=1)
        self.model = TinyLM()

    def _loader(self, data: Any, batch_size: int) -> DataLoader:
        # Lightning's automatic sampler shuffles training data; an unshuffled split lets the 2-rank run see,
        # step by step, exactly the batches a single process with twice the batch size sees.
        sampler = DistributedSampler(data, shuffle=False) if torch.distributed.is_initialized() else None
        return DataLoader(data, batch_size=batch_size, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(dataset(64, 0), self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(dataset(32, 1), 16)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_digest(module: nn.Module, names: Any = None) -> dict[str, list[float]]:
    """Every parameter, unsharded, as exact float lists (a collective under FSDP2: all ranks call it)."""
    from phasetune.sharding import logical_name

    out = {}
    for n, p in module.named_parameters():
        n = logical_name(n)
        if names is None or n in names:
            out[n] = full(p.detach()).double().flatten().tolist()
    return out


class Probe(Callback):
    """Records, per epoch, the phase, the trainable set and the parameters; and the optimizer at start/end."""

    def __init__(self, fts: Any, digest_every_epoch: bool = True) -> None:
        self.fts = fts
        self.digest_every_epoch = digest_every_epoch
        self.epochs: list[dict[str, Any]] = []
        self.ends: list[dict[str, Any]] = []
        self.start: dict[str, Any] | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.start = {"epoch": trainer.current_epoch, "depth": self.fts.curr_depth, **optimizer_summary(trainer, self.fts),
                      "trainable": sorted(n for n, p in self.fts.engine.params.items() if p.requires_grad)}

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        params = self.fts.engine.params
        rec = {
            "epoch": trainer.current_epoch,
            "depth": self.fts.curr_depth,
            "trainable_tensors": sum(p.requires_grad for p in params.values()),
            "trainable_numel": sum(p.numel() for p in params.values() if p.requires_grad),
        }
        if self.digest_every_epoch:
            rec["params"] = full_digest(pl_module)
        self.epochs.append(rec)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.ends.append({"epoch": trainer.current_epoch, **optimizer_summary(trainer, self.fts)})


def optimizer_summary(trainer: Any, fts: Any) -> dict[str, Any]:
    """Groups (lr, size, phase) and this rank's optimizer state shards by parameter name."""
    opt = trainer.optimizers[0]
    name_of = fts.engine.name_of
    state = {}
    for p, st in opt.state.items():
        state[name_of[id(p)]] = {
            k: (v.to_local() if hasattr(v, "to_local") else v).double().flatten().tolist()
            for k, v in st.items() if torch.is_tensor(v)
        }
    return {
        "groups": [[g["lr"], len(g["params"]), g.get("ft_phase")] for g in opt.param_groups],
        "state": state,
    }
