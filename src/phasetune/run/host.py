"""What a front end does for its :class:`~phasetune.run.PhaseRun`: the :class:`Host` protocol.

The run holds the whole sequence of a fit (start, transitions, the end of each evaluation, the end) once; a
front end implements only what its framework alone can do: hand over the optimizer and lr schedulers it trains
with, install what a phase changes (a new optimizer or lr scheduler, a DDP wrapper rebuilt over the newly
trainable parameters), and hand over the model as trained (a DDP or compiled wrapper) for the thaw audit.
Messages and the collective the run needs go through the :class:`~phasetune.run.RunEnv` the front end builds the
run with (``warn``, ``info``, ``broadcast``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.optim import Optimizer

from phasetune.sharding.names import logical_name
from phasetune.util import dist as _dist

log = logging.getLogger("phasetune")


class Host(Protocol):
    """A front end, as the run drives it."""

    def optimizer_and_schedulers(self) -> tuple[Optimizer, list[Any]]:
        """The torch optimizer being trained (unwrapped) and its lr schedulers."""
        ...

    def install(self, *, optimizer: Optimizer | None, scheduler: Any, scheduler_cfg: Mapping[str, Any] | None,
                thawed: bool) -> None:
        """Put a phase's changes in place: ``optimizer`` and ``scheduler`` (its Lightning config fields
        ``scheduler_cfg``) replace the current ones unless None; ``thawed``: parameters became trainable (rebuild
        what registers trainable parameters when built, e.g. DDP; refresh FSDP2 units)."""
        ...

    def trained_model(self) -> nn.Module | None:
        """The model as it is trained (a DDP or compiled wrapper included), for the thaw audit."""
        ...


def _rank_zero_log(level: int) -> Callable[[str], None]:
    def emit(message: str) -> None:
        if _dist.rank() == 0:  # a message that names phasetune first already says whose it is
            log.log(level, "%s", message if message.startswith("phasetune") else f"phasetune: {message}")

    return emit


@dataclass
class RunEnv:
    """Where a run happens, as its front end knows it."""

    #: rank 0's value on every rank; a collective that every rank calls (identity on one process)
    broadcast: Callable[[Any], Any] = _dist.broadcast_object
    #: a warning / an informational line, shown once (on rank 0)
    warn: Callable[[str], None] = field(default_factory=lambda: _rank_zero_log(logging.WARNING))
    info: Callable[[str], None] = field(default_factory=lambda: _rank_zero_log(logging.INFO))
    #: the model's buffers by name (restore-best restores them: BatchNorm statistics move when frozen)
    named_buffers: Callable[[], Mapping[str, torch.Tensor]] = dict
    #: how a snapshot tensor is written back into a live one (FSDP1 FlatParameter views need their own)
    copy_into: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    #: snapshots hold this rank's own shards (sharded strategies), so each rank keeps its own
    rank_local_snapshots: bool = False
    #: every rank's :meth:`PhaseRun.state_dict` is saved (plain strategy), not only rank 0's (Lightning)
    state_saved_per_rank: bool = False
    #: where snapshot files go ("disk" storage, and rank-local snapshots of checkpoints saved by rank 0)
    snapshot_dir: str | None = None
    #: the device whose peak memory each phase records
    device: torch.device | str | None = None
    #: what the optimizer the run is given is called in messages
    optimizer_source: str = "the optimizer"

    @classmethod
    def of_model(cls, model: nn.Module, **fields: Any) -> RunEnv:
        """The environment of a run over a plain ``model``: its buffers, and its first parameter's device unless
        ``fields`` say otherwise."""
        fields.setdefault("device", next((p.device for p in model.parameters()), None))
        return cls(named_buffers=lambda: dict(model.named_buffers()), **fields)

    @property
    def rank(self) -> int:
        return _dist.rank()

    @property
    def world_size(self) -> int:
        return _dist.world_size()


def model_params(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """``model``'s parameters by the names schedules use (without DDP or ``torch.compile`` wrappers' segments),
    and their shapes: the first two arguments of :class:`~phasetune.run.PhaseRun` for a plain model."""
    params = {logical_name(n): p for n, p in model.named_parameters()}
    return params, {n: tuple(p.shape) for n, p in params.items()}


__all__ = ["Host", "RunEnv", "model_params"]
