"""Whether a run can continue from a checkpoint's state, and what to do when it cannot (torch only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from phasetune.features import random_state as rng
from phasetune.run.host import RunEnv


def state_problem(state: Mapping[str, Any], where: Any, *, monitor: str | None, mode: str, env: RunEnv,
                  resume_rng: str, state_format: int) -> str | None:
    """Why a run cannot continue from checkpoint ``state`` (at ``where``), naming what differs and what to do;
    None when it can (see :meth:`phasetune.run.PhaseRun.check_state`)."""
    src = f" {where}" if where is not None else ""
    if state.get("format") not in (1, state_format):
        return (f"the fine-tuning state of checkpoint{src} has format {state.get('format')!r}; this phasetune reads "
                f"formats 1 and {state_format}: resume it with the phasetune version that wrote it")
    saved = state.get("monitor")
    has_best = any(r.get("best_value") is not None for r in state.get("history", []))
    if saved is not None and monitor is not None and saved != monitor and has_best:
        return (f"checkpoint{src} was saved monitoring {saved!r}, this run monitors {monitor!r}: its best values "
                f"and restore-best snapshot are of {saved!r}. Resume with monitor={saved!r} (FTSEarlyStopping/"
                "FTSCheckpoint monitor, or the metric you pass), or start a new fit from its weights")
    saved_mode = state.get("mode")
    if saved_mode is not None and saved_mode != mode and has_best:
        return (f"checkpoint{src} was saved with mode={saved_mode!r} for {saved!r}, this run uses mode={mode!r}; "
                f"resume with mode={saved_mode!r}")
    if state.get("rng") is not None:
        return rng.problem(state["rng"], rank=env.rank, world_size=env.world_size, mode=resume_rng,
                           where=f" from checkpoint{src}") or None
    return None


def implicit_resume_hint(saved: Mapping[str, Any]) -> str:
    """What to do when a generated schedule differs from the checkpoint's: it was generated from the run."""
    phases = saved.get("phases") or [{}]
    budget = phases[-1].get("max_transition_step", -1)
    said = f" (its budget: {budget} optimizer steps)" if budget and budget > 0 else ""
    return ("\nno schedule was given, so it was generated from this run's step budget and optimizer lr: resume with "
            f"the run length and lr the checkpoint was trained with{said}, or pass that budget as "
            "schedule_options={'total_steps': N}")


__all__ = ["implicit_resume_hint", "state_problem"]
