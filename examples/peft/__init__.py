"""LoRA schedules on the demo's model and task: progressive adapters, a merge at a transition, exact resume."""
