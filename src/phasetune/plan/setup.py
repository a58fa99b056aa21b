"""The run a memory plan is for: strategy, world size, precision, optimizer, batch shape, device size.

:class:`PlanSetup` holds the settings; :meth:`PlanSetup.problems` lists every invalid one (named, with what to
write instead) so :func:`phasetune.plan.plan_memory` can refuse once, before building anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

STRATEGIES = ("single", "ddp", "fsdp2", "fsdp1")
OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
#: how the optimizer's step runs: torch's ``foreach`` (the CUDA default), ``single_tensor`` (a loop), ``fused``
IMPLS = {"foreach": {"foreach": True}, "single_tensor": {"foreach": False}, "fused": {"fused": True}}
PRECISIONS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GiB = 1 << 30


@dataclass(frozen=True)
class PlanSetup:
    """The run to plan. Sizes are per rank; ``global_batch`` is samples per optimizer step over all ranks.

    ``mixed_precision`` ``"bf16"``/``"fp16"``: FSDP2 gathers parameters in that dtype and reduces gradients in
    float32 (the plain strategy's ``bf16=True``); single-device and DDP runs use autocast. ``act_ckpt``
    checkpoints every transformer block (FSDP2: adds ``act_ckpt: composable`` to the block entries).
    ``reserve_gib`` (CUDA context, NCCL buffers) and ``fragmentation`` (allocator slack, a fraction of the
    peak) are the margin between the planned peak and ``device_gib``.
    """

    world_size: int = 1
    strategy: str = "fsdp2"
    fsdp_plan: Mapping[str, Any] | None = None
    fsdp_default_kwargs: Mapping[str, Any] | None = None
    block_classes: tuple[str, ...] | None = None
    mixed_precision: str | None = None
    param_dtype: str = "float32"
    act_ckpt: bool = False
    cpu_offload: bool = False
    optimizer: str = "adamw"
    optimizer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    optimizer_impl: str = "foreach"
    micro_batch: int = 1
    seq_len: int = 512
    global_batch: int | None = None
    sync_every_micro_step: bool = False
    device_gib: float | None = None
    reserve_gib: float = 1.0
    fragmentation: float = 0.05
    dataset_size: int | None = None
    snapshot_storage: str = "memory"
    search_micro_batch: bool = True
    max_micro_batch: int = 4096
    name_prefix: str = ""
    tensors: str = "fake"

    # ------------------------------------------------------------------------------------------ derived
    @property
    def compute_dtype(self) -> torch.dtype | None:
        return PRECISIONS.get(self.mixed_precision)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.param_dtype]

    @property
    def accumulation(self) -> int:
        """Micro-steps per optimizer step."""
        return 1 if self.global_batch is None else self.global_batch // (self.micro_batch * self.world_size)

    @property
    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        return OPTIMIZERS[self.optimizer]

    def optimizer_args(self) -> dict[str, Any]:
        """Keyword arguments of the optimizer: ``optimizer_kwargs`` plus the implementation switch."""
        kw = {"lr": 1e-4, **dict(self.optimizer_kwargs)}
        kw.update(IMPLS[self.optimizer_impl])
        return kw

    @property
    def budget(self) -> int | None:
        """Bytes a peak may reach on the device: ``device_gib`` less the reserve, over ``1 + fragmentation``."""
        if self.device_gib is None:
            return None
        return int((self.device_gib - self.reserve_gib) * GiB / (1 + self.fragmentation))

    @property
    def sharded(self) -> bool:
        return self.strategy in ("fsdp2", "fsdp1")

    # ------------------------------------------------------------------------------------------ checks
    def problems(self) -> list[str]:
        """Every invalid setting, each saying what to write instead."""
        out: list[str] = []
        for name in ("world_size", "micro_batch", "seq_len", "max_micro_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                out.append(f"{name} must be an integer >= 1, got {v!r}")
        if self.strategy not in STRATEGIES:
            out.append(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        elif self.strategy == "single" and self.world_size != 1:
            out.append(f"strategy 'single' runs on one device; world_size must be 1 (got {self.world_size}); use 'ddp' "
                       "or 'fsdp2' for several ranks")
        if self.mixed_precision not in PRECISIONS:
            out.append(f"mixed_precision {self.mixed_precision!r} is not one of None, 'bf16', 'fp16'")
        if self.param_dtype not in DTYPES:
            out.append(f"param_dtype {self.param_dtype!r} is not one of {', '.join(DTYPES)}")
        if self.optimizer not in OPTIMIZERS:
            out.append(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.optimizer_impl not in IMPLS:
            out.append(f"optimizer_impl {self.optimizer_impl!r} is not one of {', '.join(IMPLS)}")
        elif self.optimizer == "sgd" and self.optimizer_impl == "fused":
            out.append("optimizer_impl 'fused' is not available for sgd in this planner; use 'foreach' or 'single_tensor'")
        if not isinstance(self.optimizer_kwargs, Mapping):
            out.append(f"optimizer_kwargs must be a dict, got {type(self.optimizer_kwargs).__name__}")
        elif {"foreach", "fused"} & set(self.optimizer_kwargs):
            out.append("give foreach/fused through optimizer_impl ('foreach', 'single_tensor' or 'fused'), not optimizer_kwargs")
        if (self.fsdp_plan is not None or self.fsdp_default_kwargs is not None) and self.strategy != "fsdp2":
            out.append(f"fsdp_plan/fsdp_default_kwargs are FSDP2 settings; strategy is {self.strategy!r}: use strategy='fsdp2'")
        if self.cpu_offload and self.strategy != "fsdp2":
            out.append(f"cpu_offload is planned for FSDP2 only (CPUOffloadPolicy); strategy is {self.strategy!r}")
        if self.global_batch is not None and not any("world_size" in o or "micro_batch" in o for o in out):
            per_step = self.micro_batch * self.world_size
            if isinstance(self.global_batch, bool) or not isinstance(self.global_batch, int) or self.global_batch < 1:
                out.append(f"global_batch must be an integer >= 1, got {self.global_batch!r}")
            elif self.global_batch % per_step:
                out.append(f"global_batch={self.global_batch} is not a multiple of micro_batch * world_size = {per_step}; "
                           f"use {max(per_step, self.global_batch // per_step * per_step)}")
        if self.device_gib is not None:
            if not isinstance(self.device_gib, (int, float)) or not math.isfinite(self.device_gib) or self.device_gib <= 0:
                out.append(f"device_gib must be a positive number of GiB, got {self.device_gib!r}")
            elif self.device_gib <= self.reserve_gib:
                out.append(f"device_gib={self.device_gib} leaves nothing after reserve_gib={self.reserve_gib}; lower "
                           "reserve_gib or check device_gib")
        if not (0 <= self.fragmentation < 1):
            out.append(f"fragmentation must be a fraction in [0, 1), got {self.fragmentation!r}")
        if self.reserve_gib < 0:
            out.append(f"reserve_gib must be >= 0, got {self.reserve_gib!r}")
        if self.snapshot_storage not in ("memory", "disk"):
            out.append(f"snapshot_storage must be 'memory' or 'disk', got {self.snapshot_storage!r}")
        if self.tensors not in ("fake", "real"):
            out.append(f"tensors must be 'fake' (the plan) or 'real' (a check on small models), got {self.tensors!r}")
        if self.dataset_size is not None and (not isinstance(self.dataset_size, int) or self.dataset_size < 1):
            out.append(f"dataset_size must be a number of samples >= 1, got {self.dataset_size!r}")
        return out


def optimizer_settings(optimizer: torch.optim.Optimizer, on_cuda: bool = True) -> dict[str, Any]:
    """The :class:`PlanSetup` optimizer fields of a built optimizer (for a front end planning its own run).

    The implementation follows torch's choice: ``fused`` or ``foreach`` as set, else foreach on CUDA and a
    single-tensor loop elsewhere. Only settings that change memory are kept (AMSGrad's extra state, momentum
    buffers, Adam's weight-decay temporaries).
    """
    name = next((k for k, cls in OPTIMIZERS.items() if type(optimizer) is cls), None)
    if name is None:
        raise ValueError(f"the memory plan knows {', '.join(c.__name__ for c in OPTIMIZERS.values())}, not "
                         f"{type(optimizer).__name__}")
    d = optimizer.defaults
    impl = "fused" if d.get("fused") else "foreach" if d.get("foreach") or (d.get("foreach") is None and on_cuda) \
        else "single_tensor"
    kwargs = {k: d[k] for k in ("amsgrad", "momentum", "nesterov", "weight_decay", "maximize") if k in d}
    return {"optimizer": name, "optimizer_impl": impl, "optimizer_kwargs": kwargs}


__all__ = ["DTYPES", "IMPLS", "OPTIMIZERS", "PRECISIONS", "STRATEGIES", "GiB", "PlanSetup", "optimizer_settings"]
