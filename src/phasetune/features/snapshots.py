"""Best-state snapshots of what can change during a phase.

Frozen parameters never change, so restoring the best state of a phase only needs the trainable
parameters, their optimizer state, the optimizer's group hyperparameters, the lr schedulers' state and
the module buffers (BatchNorm statistics move even when frozen). A snapshot holds exactly that, keyed by
parameter name, so its size follows the trainable part of the model, not the model.
"""

from __future__ import annotations

import copy as _copy_mod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim import Optimizer

from phasetune.sharding.dtensor import dtensor_like, is_dtensor, local_shard
from phasetune.util.files import atomic_torch_save

SNAPSHOT_FORMAT = 1
#: group keys an lr scheduler moves: a restore that keeps the lr schedule leaves them as they are
_LR_SCHEDULE_KEYS = ("lr", "initial_lr")


def _copy(t: torch.Tensor, device: str | torch.device | None) -> torch.Tensor:
    t = local_shard(t).detach()  # sharded tensors: each rank keeps its own shard
    return t.to(device, copy=True) if device is not None else t.clone()


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        local = local_shard(obj)
        return local.numel() * local.element_size()
    if isinstance(obj, Mapping):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


@dataclass
class Snapshot:
    """The restorable state of one moment of a phase (see the module docstring)."""

    depth: int
    epoch: int
    step: int
    value: float
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer_state: dict[str, dict[str, Any]] = field(default_factory=dict)
    optimizer_devices: dict[str, dict[str, str]] = field(default_factory=dict)
    optimizer_dtensors: dict[str, list[str]] = field(default_factory=dict)  # state keys that were DTensors
    group_hparams: list[dict[str, Any]] = field(default_factory=list)
    schedulers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held (what a write of this snapshot costs, roughly)."""
        return _nbytes(self.params) + _nbytes(self.buffers) + _nbytes(self.optimizer_state)

    def to_state(self) -> dict[str, Any]:
        """Plain containers of tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "format": SNAPSHOT_FORMAT,
            "depth": self.depth,
            "epoch": self.epoch,
            "step": self.step,
            "value": self.value,
            "params": self.params,
            "buffers": self.buffers,
            "optimizer_state": self.optimizer_state,
            "optimizer_devices": self.optimizer_devices,
            "optimizer_dtensors": self.optimizer_dtensors,
            "group_hparams": self.group_hparams,
            "schedulers": self.schedulers,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Snapshot:
        if state.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"unsupported snapshot format {state.get('format')!r} (expected {SNAPSHOT_FORMAT})")
        return cls(**{k: v for k, v in state.items() if k != "format"})


def take_snapshot(
    *,
    depth: int,
    epoch: int,
    step: int,
    value: float,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    optimizer: Optimizer | None,
    schedulers: Sequence[Any] = (),
    device: str | torch.device | None = "cpu",
) -> Snapshot:
    """Copy the trainable ``params`` (name -> tensor), ``buffers`` and optimizer/scheduler state.

    ``device=None`` keeps copies where the tensors live (fastest, costs accelerator memory); the default
    ``"cpu"`` keeps accelerator memory free.
    """
    snap = Snapshot(depth=depth, epoch=epoch, step=step, value=float(value))
    with torch.no_grad():
        snap.params = {n: _copy(p, device) for n, p in params.items()}
        snap.buffers = {n: _copy(b, device) for n, b in buffers.items()}
        if optimizer is not None:
            by_id = {id(p): n for n, p in params.items()}
            for p, st in optimizer.state.items():
                name = by_id.get(id(p))
                if name is None:
                    continue
                snap.optimizer_state[name] = {
                    k: _copy(v, device) if isinstance(v, torch.Tensor) else v for k, v in st.items()
                }
                snap.optimizer_devices[name] = {
                    k: str(v.device) for k, v in st.items() if isinstance(v, torch.Tensor)
                }
                dtensors = [k for k, v in st.items() if is_dtensor(v)]
                if dtensors:
                    snap.optimizer_dtensors[name] = dtensors
            snap.group_hparams = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        snap.schedulers = [_copy_mod.deepcopy(s.state_dict()) for s in schedulers]
    return snap


def restore_snapshot(
    snap: Snapshot,
    *,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    optimizer: Optimizer | None,
    schedulers: Sequence[Any] = (),
    copy_into: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    keep_lr_schedule: bool = False,
) -> list[str]:
    """Write ``snap`` back into the live tensors; returns a list of problems (empty when exact).

    ``params`` must be the parameters trainable now; a snapshot from the same phase has the same names.
    Sharded (DTensor) parameters and optimizer state get back this rank's shard. With ``keep_lr_schedule``
    the groups' lrs and the lr schedulers stay where they are (a restore goes back in weights, not in time).
    """
    problems = []
    if set(snap.params) != set(params):
        missing = sorted(set(params) - set(snap.params))
        extra = sorted(set(snap.params) - set(params))
        problems.append(f"trainable parameters differ from the snapshot's (missing {missing[:3]}, extra {extra[:3]})")
        return problems
    copy = copy_into or (lambda dst, src: local_shard(dst).copy_(src))
    with torch.no_grad():
        for n, p in params.items():
            copy(p.data, snap.params[n])
        for n, b in buffers.items():
            if n in snap.buffers:
                copy(b, snap.buffers[n])
        if optimizer is not None:
            if len(snap.group_hparams) != len(optimizer.param_groups):
                problems.append(
                    f"optimizer has {len(optimizer.param_groups)} param groups, snapshot has {len(snap.group_hparams)}"
                )
            else:
                for g, hp in zip(optimizer.param_groups, snap.group_hparams):
                    g.update({k: v for k, v in hp.items() if not (keep_lr_schedule and k in _LR_SCHEDULE_KEYS)})
            for n, p in params.items():
                saved = snap.optimizer_state.get(n)
                if saved is None:
                    optimizer.state.pop(p, None)
                    continue
                devices = snap.optimizer_devices.get(n, {})
                state = {
                    k: v.to(devices.get(k, v.device), copy=True) if isinstance(v, torch.Tensor) else v
                    for k, v in saved.items()
                }
                for k in snap.optimizer_dtensors.get(n, ()):
                    state[k] = dtensor_like(state[k], p)
                optimizer.state[p] = state
    if keep_lr_schedule:
        return problems
    for s, st in zip(schedulers, snap.schedulers):
        s.load_state_dict(_copy_mod.deepcopy(st))
    if len(snap.schedulers) != len(schedulers):
        problems.append(f"{len(schedulers)} lr schedulers now, {len(snap.schedulers)} in the snapshot")
    return problems


def save_snapshot_file(snap: Snapshot, root: Path, tag: str, rank: int, world_size: int) -> dict[str, Any]:
    """Write this rank's ``snap`` atomically to ``root/rank<rank>_<tag>.pt``; return the reference a checkpoint
    keeps (a path template with ``{rank}``, so one reference serves every rank)."""
    template = str(Path(root) / f"rank{{rank}}_{tag}.pt")
    path = Path(template.format(rank=rank))
    if path.parent.is_dir():  # temporary files of this rank's writes that died (a killed process) go first
        for stale in path.parent.glob(f".rank{rank}_*.pt.*.tmp"):
            stale.unlink(missing_ok=True)
    atomic_torch_save(snap.to_state(), path)
    return {"path": template, "step": snap.step, "depth": snap.depth, "world_size": world_size}


def load_snapshot_file(
    ref: Mapping[str, Any], rank: int, world_size: int, same_world_needed: bool
) -> tuple[Snapshot | None, str | None]:
    """This rank's snapshot from a :func:`save_snapshot_file` reference, or None and why it cannot be used."""
    saved_world = int(ref.get("world_size", world_size))
    if same_world_needed and saved_world != world_size:
        ranks = "rank" if saved_world == 1 else "ranks"
        return None, f"the restore-best snapshot was taken on {saved_world} {ranks}, this run has {world_size}"
    path = Path(str(ref["path"]).format(rank=rank))
    if not path.exists():
        return None, f"restore-best snapshot {path} is gone"
    snap = Snapshot.from_state(torch.load(path, map_location="cpu", weights_only=True))
    if snap.step != ref.get("step"):
        return None, (f"restore-best snapshot {path} was overwritten after this checkpoint (step {snap.step}, "
                      f"checkpoint expects {ref.get('step')})")
    return snap, None
