"""Small training runs that tests/test_kill_harness.py kills at chosen points and resumes (one process each).

``python crash_train.py DIR plain|lightning|modelparallel`` (or :func:`main` in a forked child process, as the harness does
to skip the imports): trains a 3-phase schedule with Dropout, a shuffled DataLoader,
restore-best snapshots on disk (``snapshot_storage="disk"``) and a checkpoint after every epoch, resuming from
the latest complete checkpoint under DIR when there is one; writes the final parameters to DIR/final.pt.

- ``plain``: :class:`phasetune.FSDP2Strategy` and :class:`phasetune.ScheduledFinetuning`, ``save_ckpt`` to
  DIR/checkpoints (the two newest kept) and ``save_model`` (a full-weights export) to DIR/export every epoch.
- ``lightning``: FinetuningScheduler with FTSEarlyStopping and FTSCheckpoint (every epoch and ``last.ckpt``),
  resumed with ``ckpt_path="last"``; ``export_full_model`` to DIR/export every epoch.
- ``modelparallel``: the same under ModelParallelStrategy (FSDP2, one device): sharded checkpoint directories.

``PHASETUNE_TEST_KILL`` makes the process SIGKILL itself at one point (the test's hook, not phasetune's):

- ``write:<text>:<n>``: during the n-th file write whose path contains <text> (``torch.save`` to a path or an
  open file, safetensors' ``save_file``): half the bytes are written and flushed, then the process dies.
- ``rename:<text>:<n>``: right before the n-th ``os.replace`` / ``shutil.move`` whose destination contains
  <text>: the file is complete under its temporary name, the rename never happens.
- ``step:<n>``: right before optimizer step n (counted over the whole run, resumes included).

``PHASETUNE_TEST_RECORD=1`` writes the parameters after every epoch to DIR/params_epoch<e>.pt.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

OUT = Path(".")  # set by main()
RECORD = False


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def file_path(f: Any) -> str | None:
    """The path torch.save writes to: a path, or the file an open file object refers to (None: in memory)."""
    if isinstance(f, (str, os.PathLike)):
        return str(f)
    try:
        return os.readlink(f"/proc/self/fd/{f.fileno()}")
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def write_half_and_die(f: Any, data: bytes) -> None:
    if isinstance(f, (str, os.PathLike)):
        f = open(f, "wb")  # noqa: SIM115 - the process dies with it open
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    die()


def install_kill_hook(spec: str) -> int | None:
    """Patch the calls ``spec`` names to kill this process at its n-th match; returns the step of a ``step:`` spec."""
    if not spec:
        return None
    kind, *rest = spec.split(":")
    if kind == "step":
        return int(rest[0])
    text, n = rest[0], int(rest[1])
    seen = 0

    def hit(path: Any) -> bool:
        nonlocal seen
        if path is None or text not in str(path):
            return False
        seen += 1
        return seen == n

    if kind == "write":
        import safetensors.torch

        real_save, real_save_file = torch.save, safetensors.torch.save_file

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if hit(file_path(f)):
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                write_half_and_die(f, buf.getvalue())
            real_save(obj, f, *args, **kwargs)

        def save_file(tensors: Any, filename: Any, metadata: Any = None) -> None:
            if hit(filename):
                write_half_and_die(filename, safetensors.torch.save(tensors, metadata=metadata))
            real_save_file(tensors, filename, metadata=metadata)

        torch.save, safetensors.torch.save_file = save, save_file
    elif kind == "rename":
        real_replace, real_move = os.replace, shutil.move

        def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if hit(dst):
                die()
            real_replace(src, dst, *args, **kwargs)

        def move(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            if hit(dst):
                die()
            return real_move(src, dst, *args, **kwargs)

        os.replace, shutil.move = replace, move
    else:
        raise SystemExit(f"PHASETUNE_TEST_KILL: unknown kind {kind!r}")
    return None


def full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def write_params(module: nn.Module, path: Path) -> None:
    from phasetune.sharding import logical_name

    buf = io.BytesIO()  # not through a path: a write: kill spec never matches the harness's own files
    torch.save({logical_name(n): full(p) for n, p in module.named_parameters()}, buf)
    path.write_bytes(buf.getvalue())


# ---------------------------------------------------------------------------------------------- plain strategy
def train_plain(kill_step: int | None) -> None:
    from phasetune import FSDP2Strategy, ScheduledFinetuning
    from plain_models import SCHEDULE, TinyLM, data

    values = [1.0, 0.9, 0.95, 0.8, 0.85]
    strategy = FSDP2Strategy(seed=0, micro_batch_size=16, global_batch_size=16)
    with strategy.init_model_context():
        model = TinyLM(dropout=0.2)
    model = strategy.prepare_model(model)
    optimizer = strategy.create_optimizer(model, lr=1e-2)
    ft = ScheduledFinetuning(SCHEDULE, model, optimizer, patience=1, snapshot_storage="disk",
                             snapshot_dir=OUT / "snapshots")
    _, client = strategy.load_ckpt(model, OUT / "checkpoints", finetuning=ft)
    ids, labels = data(64, 0)
    loader = DataLoader(list(zip(ids, labels)), batch_size=16, shuffle=True)
    for epoch in range(client.get("epoch", -1) + 1, len(values)):
        model.train()
        for xb, yb in loader:
            if strategy.global_step + 1 == kill_step:
                die()
            strategy.backward(nn.functional.cross_entropy(model(xb), yb), model)
            strategy.optimizer_step(ft.optimizer, model)
        ft.step(epoch, metric=values[epoch])
        strategy.save_ckpt(model, OUT / "checkpoints", f"epoch{epoch}", finetuning=ft, client_state={"epoch": epoch},
                           max_num=2)
        strategy.save_model(model, OUT / "export")
        if RECORD:
            write_params(model, OUT / f"params_epoch{epoch}.pt")
    write_params(model, OUT / "final.pt")
    (OUT / "phases.txt").write_text(repr([(r.start_epoch, r.end_epoch, r.restored_best) for r in ft.history]))
    strategy.teardown()


# ---------------------------------------------------------------------------------------------- Lightning
def train_lightning(kill_step: int | None, sharded: bool = False) -> None:
    """``sharded``: under ModelParallelStrategy (FSDP2) on one device, with sharded (directory) checkpoints."""
    import warnings

    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    from helpers import SCHEDULE_3, ToyModule, dataset, trainer
    from phasetune import FinetuningScheduler, FTSCheckpoint, FTSEarlyStopping, export_full_model

    class Module(ToyModule):
        def __init__(self) -> None:
            # phase 0 improves at epochs 0 and 1 (two snapshots), phase 1 at 4 and 5; transitions at 4 and 7
            super().__init__(val_losses=[1.0, 0.9, 0.95, 0.96, 0.8, 0.75, 0.86, 0.87, 0.5, 0.6, 0.7, 0.8],
                             optimizer="adam", lr=0.01, scheduler="step")
            self.drop = nn.Dropout(0.2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(self.drop(x))

        def train_dataloader(self) -> DataLoader:
            return DataLoader(dataset(64, 0), batch_size=16, shuffle=True)

    class Each(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step + 1 == kill_step:
                die()

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            export_full_model(trainer, OUT / "export")
            if RECORD:
                write_params(pl_module, OUT / f"params_epoch{trainer.current_epoch}.pt")

    pl.seed_everything(7)
    module = Module()
    cfg = {"fsdp_plan": {r"model\.layers\.\d+": {}, "model.head": {}}} if sharded else None
    fts = FinetuningScheduler(ft_schedule=SCHEDULE_3, snapshot_storage="disk", strategy_adapter_cfg=cfg)
    ck = FTSCheckpoint(monitor="val_loss", save_top_k=-1, save_last=True, dirpath=str(OUT / "ckpts"),
                       filename="{epoch}")
    kw = {"strategy": ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)} if sharded else {}
    t = trainer(OUT, [fts, FTSEarlyStopping(monitor="val_loss", patience=2), ck, Each()], max_epochs=30,
                enable_checkpointing=True, **kw)
    resume = "last" if (OUT / "ckpts").is_dir() else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(module, ckpt_path=resume)
    said = [str(w.message) for w in caught if "snapshot" in str(w.message) or "random" in str(w.message)]
    write_params(module, OUT / "final.pt")
    (OUT / "phases.txt").write_text(repr([(r.start_epoch, r.end_epoch, r.restored_best) for r in fts.history]))
    (OUT / "warnings.txt").write_text("\n".join(said))


def main(out: str | os.PathLike[str], front_end: str) -> None:
    """One run of ``front_end`` in ``out``, killed where ``PHASETUNE_TEST_KILL`` says (if it says)."""
    global OUT, RECORD
    OUT = Path(out).resolve()
    RECORD = os.environ.get("PHASETUNE_TEST_RECORD") == "1"
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    os.chdir(OUT)
    step = install_kill_hook(os.environ.get("PHASETUNE_TEST_KILL", ""))
    if front_end == "plain":
        train_plain(step)
    else:
        train_lightning(step, sharded=front_end == "modelparallel")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
