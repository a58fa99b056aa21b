"""Small training runs that tests/test_kill_harness.py (one process) and tests/test_kill_harness_distributed.py
(two processes) kill at chosen points and resume.

``python crash_train.py DIR plain|lightning|modelparallel|ddp|fsdp1|fsdp2`` (or :func:`main` in a forked child
process, as the harnesses do to skip the imports): trains a 3-phase schedule with Dropout, a shuffled DataLoader,
restore-best snapshots on disk (``snapshot_storage="disk"``) and a checkpoint after every epoch, resuming from
the latest complete checkpoint under DIR when there is one; writes the final parameters to DIR/final.pt.

- ``plain``: :class:`phasetune.FSDP2Strategy` and :class:`phasetune.ScheduledFinetuning`, ``save_ckpt`` to
  DIR/checkpoints (the two newest kept) and ``save_model`` (a full-weights export) to DIR/export every epoch.
- ``lightning``: FinetuningScheduler with FTSEarlyStopping and FTSCheckpoint (every epoch and ``last.ckpt``),
  resumed with ``ckpt_path="last"``; ``export_full_model`` to DIR/export every epoch.
- ``modelparallel``: the same under ModelParallelStrategy (FSDP2, one device): sharded checkpoint directories.
- ``ddp``, ``fsdp1``, ``fsdp2``: one rank of a 2-process Lightning job (gloo, CPU) started by an external launcher
  (the distributed variables and ``TORCHELASTIC_RUN_ID`` set, as torchrun sets them) under DDP, FSDPStrategy
  (FSDP1, full checkpoint files) or ModelParallelStrategy (FSDP2, sharded checkpoint directories); a shorter
  schedule (transitions at epochs 2 and 4, 5 epochs) and no export. Each rank writes the parameters it holds
  (FSDP1: its shards) to DIR/final<rank>.pt, its phase history to DIR/phases<rank>.txt and the warnings about
  snapshots, random state and a missing ``last.ckpt`` it saw, as they come, to DIR/warnings<rank>.txt.

``PHASETUNE_TEST_KILL`` makes the process SIGKILL itself at one point (the test's hook, not phasetune's):

- ``write:<text>:<n>``: during the n-th file write whose path (under DIR) contains <text> (``torch.save`` to a
  path or an open file, safetensors' ``save_file``, a local fsspec file: Lightning's full checkpoints, named by
  their final path, not the temporary file the transaction writes, and a file of a distributed checkpoint):
  half the bytes of the write are written and flushed, then the process dies.
- ``rename:<text>:<n>``: right before the n-th ``os.replace`` / ``shutil.move`` whose destination (under DIR)
  contains <text>: the file is complete under its temporary name, the rename never happens.
- ``move:<text>:<n>``: the same, except that a ``shutil.move`` happens as a move across filesystems does (a tmpfs
  ``/tmp``, checkpoints on disk): a copy, killed halfway, half the bytes under the destination's name. An
  ``os.replace`` never copies (it fails across filesystems): the process dies before it, as with ``rename:``.
- ``step:<n>``: right before optimizer step n (counted over the whole run, resumes included).

A rank of a 2-process job that kills itself writes what the hook matched to DIR/killed<rank>.txt first.

``PHASETUNE_TEST_RECORD=1`` writes the parameters after every epoch to DIR/params_epoch<e>.pt.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

OUT = Path(".")  # set by main()
RECORD = False
KILLED_AT = ""  # what the kill hook matched: a rank of a 2-process job says so in DIR/killed<rank>.txt


def die() -> None:
    if "RANK" in os.environ:  # the 2-process harness checks which rank killed itself where (the other one it kills)
        (OUT / f"killed{os.environ['RANK']}.txt").write_text(KILLED_AT)
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


class DyingStream:
    """A file of a distributed checkpoint whose first write stops halfway, killing the process."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, data: Any) -> int:
        write_half_and_die(self.stream, bytes(data))
        return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def patch_file_writes(hit: Callable[[Any], bool]) -> None:
    """Count (and kill in) the writes that do not go through ``torch.save`` to a path: Lightning writes a full
    checkpoint into a local fsspec file (a temporary one, renamed on commit), DCP each rank's shard file and its
    metadata through ``FileSystem.create_stream``; each file counts once, by the path it is written for."""
    from fsspec.implementations.local import LocalFileOpener
    from torch.distributed.checkpoint import filesystem as dcp_files

    real_write, real_create_stream = LocalFileOpener.write, dcp_files.FileSystem.create_stream
    counted: list[Any] = []  # the files seen (by identity: a file object's id can be reused once it is closed)

    def write(self: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
        if not any(f is self for f in counted):
            counted.append(self)
            if "w" in self.mode and hit(self.path):
                write_half_and_die(self.f, bytes(data))
        return real_write(self, data, *args, **kwargs)

    @contextlib.contextmanager
    def create_stream(self: Any, path: Any, mode: str) -> Iterator[Any]:
        with real_create_stream(self, path, mode) as stream:
            yield DyingStream(stream) if "w" in mode and hit(path) else stream

    LocalFileOpener.write = write  # type: ignore[method-assign]
    dcp_files.FileSystem.create_stream = create_stream  # type: ignore[method-assign]


def install_kill_hook(spec: str) -> int | None:
    """Patch the calls ``spec`` names to kill this process at its n-th match; returns the step of a ``step:`` spec."""
    if not spec:
        return None
    kind, *rest = spec.split(":")
    if kind == "step":
        global KILLED_AT
        KILLED_AT = spec
        return int(rest[0])
    text, n = rest[0], int(rest[1])
    seen = 0

    def hit(path: Any) -> bool:
        global KILLED_AT
        nonlocal seen
        # the path under DIR: the text of the spec never matches the name of the directory a test runs in
        if path is None or text not in str(path).removeprefix(f"{OUT}{os.sep}"):
            return False
        seen += 1
        KILLED_AT = f"{kind} {path}"
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
        patch_file_writes(hit)
    elif kind in ("rename", "move"):
        real_replace, real_move = os.replace, shutil.move

        def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if hit(dst):
                die()
            real_replace(src, dst, *args, **kwargs)

        def move(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            if hit(dst):
                if kind == "move" and Path(src).is_file():
                    write_half_and_die(dst, Path(src).read_bytes())
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

    from helpers import SCHEDULE_3, DropoutToyModule, dataset, trainer
    from phasetune import FinetuningScheduler, FTSCheckpoint, FTSEarlyStopping, export_full_model

    class Module(DropoutToyModule):
        def __init__(self) -> None:
            # phase 0 improves at epochs 0 and 1 (two snapshots), phase 1 at 4 and 5; transitions at 4 and 7
            super().__init__(val_losses=[1.0, 0.9, 0.95, 0.96, 0.8, 0.75, 0.86, 0.87, 0.5, 0.6, 0.7, 0.8])

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


# ---------------------------------------------------------------------------------------------- 2 processes
# tests/distributed/resume_scenarios.py's schedule: phase 0 ends after epoch 1, phase 1 after epoch 3; restore-best
# snapshots (rank<r>_phase<d>.pt) at epoch 0's check, at the transition to phase 1 and at epoch 2's check
from distributed.resume_scenarios import LOSSES as DIST_LOSSES  # noqa: E402
from distributed.resume_scenarios import SCHEDULE as DIST_SCHEDULE  # noqa: E402

# a collective left waiting by a rank that hangs fails after this, not after gloo's 30 minutes
GLOO_TIMEOUT_S = 60


def train_distributed(kind: str, kill_step: int | None) -> None:
    """One rank of a 2-process job under ``kind`` (``ddp``, ``fsdp1``, ``fsdp2``), configured as
    tests/distributed/resume_scenarios.py configures them."""
    import warnings
    from datetime import timedelta

    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from fsdp_cpu import CPUFSDPStrategy
    from helpers import Block, DropoutToyModule
    from phasetune import FinetuningScheduler, FTSCheckpoint

    class KillAtStep(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step + 1 == kill_step:
                die()

    rank = int(os.environ["RANK"])
    said = OUT / f"warnings{rank}.txt"

    def show(message: Any, *args: Any, **kwargs: Any) -> None:
        # written as they come: a killed rank's warnings are kept too. Lightning's "no last checkpoint": a resume
        # that found nothing to resume from (it trains from the start, bit-equal in the end)
        if any(s in str(message) for s in ("snapshot", "random", "no last checkpoint")):
            with said.open("a") as f:
                f.write(f"{message}\n")

    timeout = timedelta(seconds=GLOO_TIMEOUT_S)
    strategy: Any
    if kind == "ddp":
        strategy, cfg = DDPStrategy(timeout=timeout), None
    elif kind == "fsdp1":
        strategy = CPUFSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True, timeout=timeout)
        cfg = {"awp_overrides": ["model.head"]}
    else:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=timeout)
        cfg = {"fsdp_plan": {r"model\.layers\.\d+": {}, "model.head": {}}}
    pl.seed_everything(7)
    module = DropoutToyModule(val_losses=DIST_LOSSES, batch_size=8)  # under Lightning's DistributedSampler
    fts = FinetuningScheduler(ft_schedule=DIST_SCHEDULE, epoch_transitions_only=True, snapshot_storage="disk",
                              strategy_adapter_cfg=cfg)
    ck = FTSCheckpoint(monitor="val_loss", save_top_k=-1, save_last=True, dirpath=str(OUT / "ckpts"),
                       filename="{epoch}")
    t = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=len(DIST_LOSSES),
                   callbacks=[fts, ck, KillAtStep()], logger=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, deterministic=True, default_root_dir=str(OUT))
    resume = "last" if (OUT / "ckpts").is_dir() else None
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        t.fit(module, ckpt_path=resume)
    write_params(module, OUT / f"final{rank}.pt")  # a collective under FSDP2 (full tensors), this rank's shards under FSDP1
    (OUT / f"phases{rank}.txt").write_text(repr([(r.start_epoch, r.end_epoch, r.restored_best) for r in fts.history]))
    torch.distributed.destroy_process_group()


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
    elif front_end in ("ddp", "fsdp1", "fsdp2"):
        train_distributed(front_end, step)
    else:
        train_lightning(step, sharded=front_end == "modelparallel")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
