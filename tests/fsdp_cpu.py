"""Lightning's FSDPStrategy on CPU, and the FSDP1 configuration docs/fsdp.md shows, for tests.

FSDP1 runs on CPU with gloo when given ``device_id=cpu``. Lightning refuses ``FSDPStrategy`` with ``accelerator="cpu"`` (the check is on the exact class, so a
subclass passes) and hands FSDP ``device_id=root_device.index``, which is ``None`` on CPU; FSDP then looks
for a GPU. This subclass passes ``device_id=torch.device("cpu")``. It also gathers the full model state dict
without ``offload_to_cpu``: for tensors already on CPU, FSDP's offload frees the gathered parameter before
it is read (torch 2.13).
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import enable_wrap

CPU = torch.device("cpu")

# docs/fsdp.md shows this configuration; tests/distributed/fsdp_scenarios.py runs it (test_fsdp.py checks both agree)
SCHEDULE = {
    0: {"params": ["model.head.*"], "max_transition_epoch": 2},
    1: {"params": [r"model\.layers\.[4-7]\..*"], "lr": 0.05, "max_transition_epoch": 4},
    2: {"params": [r"model\.layers\.[0-3]\..*", "model.embed.*"], "lr": 0.02, "max_transition_epoch": 6},
}
OVERRIDES = {"awp_overrides": ["model.head"]}


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if not any(isinstance(m, FSDP) for m in model.modules()):
            model = FSDP(
                model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=CPU,
                **self.kwargs,
            )
        elif "auto_wrap_policy" in self.kwargs:  # wrapped in configure_model: FSDP applies no policy
            del self.kwargs["auto_wrap_policy"]
        if self._activation_checkpointing_kwargs:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                apply_activation_checkpointing,
                checkpoint_wrapper,
            )

            apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper, **self._activation_checkpointing_kwargs)
        return model

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        with enable_wrap(
            wrapper_cls=FSDP, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=CPU, **self.kwargs,
        ):
            yield

    def lightning_module_state_dict(self) -> dict[str, Any]:
        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, cfg):
            return self.model.state_dict()
