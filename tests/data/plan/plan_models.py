"""Small models for the memory-plan tests and benchmarks: a transformer-shaped MLP and one that cannot run
under fake tensors. Importable as ``plan_models`` when this folder is on ``sys.path``."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    """embed -> blocks -> norm -> head; one FSDP2 unit per block (``_no_split_modules``)."""

    _no_split_modules = ["Block"]

    def __init__(self, width: int = 32, n_layers: int = 4, n_in: int = 16, n_out: int = 8) -> None:
        super().__init__()
        self.n_in = n_in
        self.embed = nn.Linear(n_in, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(n_layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))

    def example_inputs(self, micro_batch: int, seq_len: int) -> tuple[torch.Tensor]:
        return (torch.randn(micro_batch, seq_len, self.n_in),)


class DataDependent(Net):
    """Branches on a value inside its forward: fake tensors have no values, so it cannot be simulated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if h.sum().item() > 0:  # data-dependent control flow
            h = h * 2
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


def net() -> Net:
    return Net()


def small_net() -> Net:
    """Two blocks: the tests' model (every operator costs time under fake tensors)."""
    return Net(n_layers=2)


def data_dependent() -> DataDependent:
    return DataDependent()


def schedule(n_layers: int = 4) -> dict[int, dict]:
    """Head and norm; the top half of the blocks; the rest and the embedding."""
    top = "|".join(str(i) for i in range(n_layers // 2, n_layers))
    low = "|".join(str(i) for i in range(n_layers // 2))
    return {
        0: {"params": ["head.*", "norm.*"]},
        1: {"params": [rf"layers\.({top})\..*"]},
        2: {"params": [rf"layers\.({low})\..*", "embed.*"]},
    }
