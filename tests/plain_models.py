"""A small transformer-shaped model and data for the plain-PyTorch tests (no Lightning import here)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB, D_MODEL, SEQ = 32, 16, 8


class Block(nn.Module):
    def __init__(self, d: int = D_MODEL, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.lin = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(torch.tanh(self.lin(self.norm(x))))


class TinyLM(nn.Module):
    """embedding -> 4 blocks -> mean pool -> head (2 classes); ``_no_split_modules`` names the block class."""

    _no_split_modules = ["Block"]

    def __init__(self, n_layers: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.layers = nn.ModuleList(Block(dropout=dropout) for _ in range(n_layers))
        self.head = nn.Linear(D_MODEL, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(dim=1))


SCHEDULE = {
    0: {"params": ["head.*"], "max_transition_epoch": 1},
    1: {"params": [r"layers\.[23]\..*"], "lr": 5e-3, "max_transition_epoch": 2},
    2: {"params": [r"layers\.[01]\..*", "embed.*"], "lr": 2e-3},
}


def data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return ids, (ids[:, 0] + ids[:, 1] > VOCAB).long()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) parameters on every rank, for comparisons."""
    out = {}
    for n, p in model.named_parameters():
        t = p.detach()
        out[n] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()
    return out
