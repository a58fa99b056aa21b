"""A small plain-strategy training run for tests/test_exact_resume.py's crash test (one process, no torchrun).

``python crash_train.py DIR [KILL_EPOCH]``: trains TinyLM with dropout on a shuffled DataLoader under
FSDP2Strategy, resuming from DIR/checkpoints when there is one, saving a checkpoint after every epoch; with
KILL_EPOCH, the process kills itself with SIGKILL while writing that epoch's checkpoint (after the shards).
Writes the final parameters to DIR/final.pt.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from phasetune import FSDP2Strategy, ScheduledFinetuning
from phasetune.strategy import checkpoint_dirs
from plain_models import SCHEDULE, TinyLM, data


def killed_while_writing(state, checkpoint_id, real_save=checkpoint_dirs.dcp.save):
    """DCP's save, then SIGKILL: the shards are written, the checkpoint is not complete."""
    real_save(state, checkpoint_id=checkpoint_id)
    os.kill(os.getpid(), signal.SIGKILL)


out = Path(sys.argv[1])
kill_epoch = int(sys.argv[2]) if len(sys.argv) > 2 else None
torch.set_num_threads(1)
os.chdir(out)
strategy = FSDP2Strategy(seed=0, micro_batch_size=16, global_batch_size=16)
with strategy.init_model_context():
    model = TinyLM(dropout=0.2)
model = strategy.prepare_model(model)
optimizer = strategy.create_optimizer(model, lr=1e-2)
ft = ScheduledFinetuning(SCHEDULE, model, optimizer, patience=1)
_, client = strategy.load_ckpt(model, "checkpoints", finetuning=ft)
ids, labels = data(64, 0)
loader = DataLoader(list(zip(ids, labels)), batch_size=16, shuffle=True)
values = [1.0, 0.9, 0.95, 0.8, 0.85, 0.7]
for epoch in range(client.get("epoch", -1) + 1, len(values)):
    model.train()
    for xb, yb in loader:
        strategy.backward(nn.functional.cross_entropy(model(xb), yb), model)
        strategy.optimizer_step(ft.optimizer, model)
    ft.step(epoch, metric=values[epoch])
    if epoch == kill_epoch:
        checkpoint_dirs.dcp.save = killed_while_writing
    strategy.save_ckpt(model, "checkpoints", f"epoch{epoch}", finetuning=ft, client_state={"epoch": epoch}, max_num=2)
full = {n: p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach() for n, p in model.named_parameters()}
torch.save(full, out / "final.pt")
strategy.teardown()
