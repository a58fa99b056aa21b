"""The run: one scheduled fine-tuning run and the sequence that drives it, whichever front end hosts it (torch only).

- :class:`PhaseRun` (:mod:`~phasetune.run.phase_run`): the schedule, engine, history, restore-best, clocks; the
  run-level sequence (:mod:`~phasetune.run.sequence`) and checkpoint state (:mod:`~phasetune.run.checkpoint`);
- :class:`RunOptions` (:mod:`~phasetune.run.options`): the knobs every front end shares;
- :class:`Host` and :class:`RunEnv` (:mod:`~phasetune.run.host`): what a front end does for the run, and where it runs;
- :class:`Patience` (:mod:`~phasetune.run.patience`): early stopping for front ends without their own;
- :class:`PhaseRecord`, :class:`Decision` (:mod:`~phasetune.run.records`): what the run reports;
- :class:`RunView` (:mod:`~phasetune.run.view`): the read-only properties every front end shows;
- :data:`STATE_FILE` and its readers and writers (:mod:`~phasetune.run.files`): the run's files in checkpoint folders;
- :func:`inject_adapters` (:mod:`~phasetune.lora.from_schedule`, wired by :mod:`~phasetune.run.lora_glue`): a schedule's LoRA
  adapters, injected before sharding;
  :func:`base_weights_state` / :func:`load_base_weights` for checkpoints that keep only the adapters.
"""

from phasetune.run.checkpoint import STATE_FORMAT
from phasetune.run.files import STATE_FILE, read_state_file, save_state_file, write_implicit_schedule
from phasetune.run.host import Host, RunEnv, model_params
from phasetune.run.lora_glue import base_weights_state, inject_adapters, load_base_weights
from phasetune.run.options import RunOptions, prefix_cache_problems
from phasetune.run.patience import NON_FINITE, Patience
from phasetune.run.phase_run import PhaseRun, log
from phasetune.run.records import Decision, PhaseRecord, phase_of
from phasetune.run.sequence import ALREADY_COMPLETE, metric_missing
from phasetune.run.state_checks import implicit_resume_hint, state_problem
from phasetune.run.view import RunView

__all__ = [
    "ALREADY_COMPLETE", "NON_FINITE", "STATE_FILE", "STATE_FORMAT", "Decision", "Host", "Patience", "PhaseRecord",
    "PhaseRun", "RunEnv", "RunOptions", "RunView", "base_weights_state", "implicit_resume_hint", "inject_adapters",
    "load_base_weights", "log", "metric_missing", "model_params",
    "phase_of", "prefix_cache_problems", "read_state_file", "save_state_file", "state_problem",
    "write_implicit_schedule",
]
