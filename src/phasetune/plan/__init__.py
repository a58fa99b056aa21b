"""Know before launch: the per-phase memory of a scheduled run, for any model at any number of ranks.

:func:`plan_memory` builds the model from a Hugging Face config (or a factory) under fake tensors, shards it
with the code a run uses on a fake process group where one process plays rank 0 of N, and walks the
schedule: per phase, parameters, gradients, optimizer state, activations, collective buffers, the peak and
the module where it happens, headroom against ``device_gib``, the largest micro-batch that fits, and host
RAM (CPU offload, restore-best snapshots, prefix cache). ``docs/memory_plan.md`` says how and what it
leaves out. Torch only; transformers is imported when a config is given.

    from phasetune.plan import plan_memory
    plan = plan_memory("schedule.yaml", "llama-3-8b/config.json", world_size=8, mixed_precision="bf16",
                       seq_len=2048, device_gib=80)
    print(plan.table())
"""

from phasetune.plan.advice import best_pair
from phasetune.plan.fit_check import check_fit, model_for_plan
from phasetune.plan.model_source import ModelSource, model_source
from phasetune.plan.planner import plan_memory, plan_memory_isolated
from phasetune.plan.result import HostMemory, MemoryPlan, PhaseMemory
from phasetune.plan.setup import PlanSetup, optimizer_settings
from phasetune.plan.step import Shard, StepMemory, step_memory

__all__ = [
    "HostMemory",
    "MemoryPlan",
    "ModelSource",
    "PhaseMemory",
    "PlanSetup",
    "Shard",
    "StepMemory",
    "best_pair",
    "check_fit",
    "model_for_plan",
    "model_source",
    "optimizer_settings",
    "plan_memory",
    "plan_memory_isolated",
    "step_memory",
]
