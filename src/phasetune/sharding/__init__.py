"""Sharding helpers shared by the Lightning adapters and the plain-PyTorch strategy (torch only).

- :mod:`~phasetune.sharding.names`: logical (schedule) names of parameters under wrappers, every sharded
  path's view of the model.
- :mod:`~phasetune.sharding.dtensor`: recognise DTensors, take a rank's shard, rebuild a DTensor.
- :mod:`~phasetune.sharding.plan`: FSDP2 ``fsdp_plan`` -- validate, match module names, apply
  ``fully_shard`` with activation checkpointing and CPU offload aliases, shard the root last.
- :mod:`~phasetune.sharding.groups`: split optimizer groups so each holds one dtype and one mesh (or plain
  tensors).
- :mod:`~phasetune.sharding.optim_state`: saving and loading optimizer state that covers only some parameters
  through DCP (pytorch #192202).
- :mod:`~phasetune.sharding.clip`: one global gradient norm across meshes and plain tensors, then clip.
- :mod:`~phasetune.sharding.export`: gather the full state dict on rank 0; ``save_pretrained`` for HF models.
"""

from phasetune.sharding.clip import clip_grad_norm_, grad_norm
from phasetune.sharding.export import full_state_dict, save_full_model
from phasetune.sharding.groups import describe_mix, split_groups, split_optimizer_groups
from phasetune.sharding.names import is_sharded, logical_name, param_units, root_name
from phasetune.sharding.plan import ActCkpt, PlanEntry, PlanReport, apply_plan, match_plan, parse_plan

__all__ = [
    "ActCkpt",
    "PlanEntry",
    "PlanReport",
    "apply_plan",
    "clip_grad_norm_",
    "describe_mix",
    "full_state_dict",
    "grad_norm",
    "is_sharded",
    "logical_name",
    "match_plan",
    "param_units",
    "parse_plan",
    "root_name",
    "save_full_model",
    "split_groups",
    "split_optimizer_groups",
]
