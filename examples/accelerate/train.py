"""Scheduled fine-tuning in your own Accelerate loop: a small network, three phases, a resumable run.

Run it from the repository root, on one process or on two (DDP)::

    python examples/accelerate/train.py                                    # seconds on a CPU
    torchrun --nproc_per_node 2 examples/accelerate/train.py               # 2 DDP processes (gloo)
    python examples/accelerate/train.py --resume    # after an interrupted run: continue from its last epoch

Accelerate reads torchrun's environment as its own launcher's (``accelerate launch --cpu`` starts one process on
CPU; on GPUs, drop ``cpu=True`` and use ``accelerate launch --multi_gpu --num_processes 2``).

The network (an embedding, four residual blocks, a head: a pretrained transformer in real life) learns whether a
sequence of tokens holds more small ids than large ones. Phase 0 trains the head for 20 optimizer steps (it ends
mid epoch 2), phase 1 adds the last two blocks at lr 1e-3 until epoch 4, phase 2 adds the rest at 5e-4 and trains
until epoch 12, or until the validation loss has not improved for 2 epochs. ``accelerator.save_state`` keeps each epoch, phasetune's
state included; ``--resume`` loads the last one (the saved phase first, then weights, optimizer, lr scheduler and
random state) and continues exactly where it stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from phasetune.loop.accelerated import AcceleratedFinetuning

SCHEDULE = {
    0: {"params": ["head.*"], "max_transition_step": 20},
    1: {"params": [r"blocks\.[23]\..*"], "lr": 1e-3, "max_transition_epoch": 4},
    2: {"params": [r"blocks\.[01]\..*", "embed.*"], "lr": 5e-4},
}


class Block(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(self.norm(x)))


class Net(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(4))
        self.head = nn.Linear(d, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(dim=1))


def data(n: int, seed: int) -> TensorDataset:
    ids = torch.randint(0, 100, (n, 12), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(ids, ((ids < 50).sum(dim=1) > 6).long())


def main(argv: list[str] | None = None) -> list[str]:
    """Train (or continue) the run; returns the lines it printed on the main process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="accelerate_output", help="a save_state folder per epoch")
    parser.add_argument("--resume", action="store_true", help="continue from the last epoch in --output_dir")
    args = parser.parse_args(argv)
    accelerator = Accelerator(cpu=True)
    set_seed(0)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)  # phase 0's lr; over every parameter (the template)
    # before accelerator.prepare: phasetune freezes the model to phase 0, then prepares model and optimizer
    ft = AcceleratedFinetuning(SCHEDULE, accelerator, model, optimizer, patience=2)
    train = DataLoader(data(512, 0), batch_size=32, shuffle=True)  # 16 batches an epoch (8 a process on 2)
    val = DataLoader(data(256, 1), batch_size=64)
    train, val = accelerator.prepare(train, val)
    start, printed = 0, []
    saved = sorted(Path(args.output_dir).glob("epoch_*"), key=lambda p: int(p.name.split("_")[1]))
    if args.resume and saved:
        accelerator.load_state(str(saved[-1]))
        start = int(saved[-1].name.split("_")[1]) + 1
    for epoch in range(start, 12):
        ft.model.train()
        for ids, y in train:
            accelerator.backward(F.cross_entropy(ft.model(ids), y))  # always ft.model: a transition may rebuild DDP
            ft.optimizer.step()
            ft.optimizer.zero_grad()
            ft.step_end()  # phase 0 ends at its max_transition_step here
        ft.model.eval()
        with torch.no_grad():
            losses = [accelerator.gather_for_metrics(F.cross_entropy(ft.model(x), y, reduction="none")) for x, y in val]
        val_loss = torch.cat(losses).mean().item()
        printed.append(f"epoch {epoch}: phase {ft.depth}, {len(ft.thawed_params)} tensors train, val_loss {val_loss:.6f}")
        accelerator.print(printed[-1])
        ft.step(epoch, metric=val_loss)  # phase 1 ends at its max_transition_epoch, phase 2 by early stopping
        accelerator.save_state(str(Path(args.output_dir) / f"epoch_{epoch}"))
        if ft.done:
            break
    ft.close()
    printed.append("phases: " + ", ".join(f"{r.depth} from step {r.start_step}" + (f" to {r.end_step} ({r.end_reason})"
                                                                                  if r.end_reason else "")
                                          for r in ft.history))
    accelerator.print(printed[-1])
    return printed


if __name__ == "__main__":
    main()
