"""``phasetune fit --baseline also``: the peak-memory ratio scheduled / full fine-tuning, measured and planned.

*Measured*: each run's peak (:class:`~phasetune.features.peak_memory.PeakMemory`: on CPU the process's peak RSS,
which counts the interpreter, libraries, data and weights too; on CUDA ``max_memory_allocated``) and what each fit
added above what the process held when it started (read at ``on_fit_start``, right after the run reset its
``PeakMemory``): the figure comparable to tensor bytes.

*Planned*: :func:`phasetune.plan.plan_memory` for the same model rebuilt from its config
(:func:`~phasetune.plan.model_for_plan`), the scheduled run's resolved schedule and, for full fine-tuning, one phase
training every parameter the baseline's optimizer holds; the runs' strategy, precision and optimizer settings, the
loader's batch size as micro-batch and as sequence length the datamodule's ``max_length`` (else what the memory
check reads from one micro-batch built by index: the loader is never iterated, so the data order is untouched).
"""

from __future__ import annotations

import ctypes
import gc
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from phasetune.errors import ConfigurationError
from phasetune.features.peak_memory import CUDA, RSS, held_now
from phasetune.lightning.memory_facts import PRECISIONS, strategy_kind
from phasetune.run.memory_check import DTYPE_NAMES, STRATEGY_WORDS, loader_shape, seq_len_of
from phasetune.util.text import fmt_bytes, format_table

if TYPE_CHECKING:
    from phasetune.plan import MemoryPlan


def release_freed_memory() -> bool:
    """Return to the system the heap memory earlier work freed but the C allocator kept (``gc.collect()``, then
    glibc's ``malloc_trim(0)``), so a fit's resident memory at its start and its peak count what it holds: without
    it the baseline reuses the pages the scheduled run freed, and its growth above its start goes unseen. False
    where there is no glibc (nothing is trimmed there)."""
    gc.collect()
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


@dataclass
class FitFacts:
    """What one fit of ``phasetune fit`` was, as the plan needs it (read at its start, never from the loader)."""

    start: int | None = None  # :func:`held_now` at on_fit_start
    module: LightningModule | None = None
    schedule: dict[int, Any] | None = None  # the scheduled run's resolved phases (those it reaches)
    trained: list[str] = field(default_factory=list)  # the parameters its optimizers hold at the first step
    optimizer: torch.optim.Optimizer | None = None
    loader: dict[str, Any] = field(default_factory=dict)  # loader_shape: dataset, collate_fn, micro_batch
    max_length: int | None = None  # the datamodule's, when it has one
    strategy: str = "single"
    world_size: int = 1
    fsdp: dict[str, Any] = field(default_factory=dict)
    mixed_precision: str | None = None
    accumulation: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class FitFactsRecorder(Callback):
    """Records a fit's :class:`FitFacts`: add it after the callback that resets the run's peak memory, so its
    ``on_fit_start`` reads the starting memory at that moment. ``scheduler``: the scheduled run's
    FinetuningScheduler (its resolved schedule), None for the baseline."""

    def __init__(self, scheduler: Any = None) -> None:
        self.scheduler = scheduler
        self.facts = FitFacts()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # before any on_fit_start, so before the run resets its peak
            release_freed_memory()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.facts.start = held_now(pl_module.device)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        f = self.facts
        f.module, f.device = pl_module, pl_module.device
        names = {id(p): n for n, p in pl_module.named_parameters()}
        held = [p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]]
        f.trained = [names[id(p)] for p in held if id(p) in names]
        f.optimizer = trainer.optimizers[0] if len(trainer.optimizers) == 1 else None
        f.loader = loader_shape(trainer.train_dataloader)  # attributes only: the loader is not iterated
        length = getattr(trainer.datamodule, "max_length", None)
        f.max_length = length if isinstance(length, int) and not isinstance(length, bool) and length > 0 else None
        f.strategy, f.world_size = strategy_kind(trainer.strategy), int(trainer.world_size)
        f.mixed_precision = None if f.strategy == "fsdp2" else PRECISIONS.get(str(trainer.precision))
        f.accumulation = int(trainer.accumulate_grad_batches)
        run = getattr(self.scheduler, "run", None)
        if run is not None:
            f.schedule = {k: v for k, v in run.schedule.to_dict(resolved=True).items()
                          if isinstance(k, int) and k <= run.final_depth}
            if f.strategy == "fsdp2":
                f.fsdp = dict(getattr(self.scheduler, "strategy_adapter_cfg", None) or {})


@dataclass
class Planned:
    """The two plans (scheduled, full fine-tuning), what they were planned for, and how long planning took."""

    scheduled: MemoryPlan
    full: MemoryPlan
    seconds: float
    what: str


def plan_kwargs(facts: FitFacts, prefix: str) -> tuple[dict[str, Any], str]:
    """:func:`~phasetune.plan.plan_memory`'s settings for the fit ``facts`` describes, and a phrase saying them;
    raises ValueError when the micro-batch or sequence length is unknown."""
    from phasetune.plan.setup import optimizer_settings

    micro_batch = facts.loader.get("micro_batch")
    if facts.max_length is not None:
        seq_len, seq_from = facts.max_length, "the datamodule's max_length"
    else:
        seq_len, seq_from = seq_len_of(facts.loader.get("dataset"), facts.loader.get("collate_fn"), micro_batch or 1)
    if micro_batch is None or seq_len is None:
        raise ValueError(f"the training loader's batch size or sequence length is unknown ({seq_from})")
    world = facts.world_size if facts.strategy != "single" else 1
    dtype = next((p.dtype for p in facts.module.parameters() if p.is_floating_point()), torch.float32)  # type: ignore[union-attr]
    kwargs: dict[str, Any] = {
        "strategy": facts.strategy, "world_size": world, "fsdp_plan": facts.fsdp.get("fsdp_plan"),
        "fsdp_default_kwargs": facts.fsdp.get("fsdp_default_kwargs"), "mixed_precision": facts.mixed_precision,
        "sync_every_micro_step": facts.strategy == "fsdp2", "micro_batch": micro_batch, "seq_len": seq_len,
        "param_dtype": DTYPE_NAMES.get(dtype, "float32"), "search_micro_batch": False, "name_prefix": prefix,
    }
    if facts.accumulation > 1:
        kwargs["global_batch"] = micro_batch * world * facts.accumulation
    optimizer = "AdamW (the optimizer is not one the plan knows)"
    if facts.optimizer is not None:
        try:
            kwargs.update(optimizer_settings(facts.optimizer, on_cuda=facts.device.type == "cuda"))
            optimizer = f"{type(facts.optimizer).__name__} ({kwargs['optimizer_impl'].replace('_', '-')})"
        except ValueError:
            optimizer = f"{type(facts.optimizer).__name__} planned as AdamW"
    where = STRATEGY_WORDS.get(facts.strategy, facts.strategy) + (f" on {world} ranks (rank 0)" if world > 1 else "")
    return kwargs, (f"{where}, micro-batch {micro_batch} x {seq_len} tokens (sequence length: {seq_from}), "
                    f"{kwargs['param_dtype']} parameters, {optimizer}")


def plan_both(scheduled: FitFacts, baseline: FitFacts) -> Planned:
    """Plan the scheduled run's schedule and full fine-tuning (one phase of every parameter the baseline trains)
    for the scheduled run's model; raises ConfigurationError when the model cannot be rebuilt from a config."""
    from phasetune.plan import model_for_plan
    from phasetune.plan.planner import plan_memory, plan_memory_isolated

    try:
        config, prefix = model_for_plan(scheduled.module)  # type: ignore[arg-type]
    except ConfigurationError:
        name = type(scheduled.module).__name__
        raise ConfigurationError(
            f"{name} is no Hugging Face model, nor holds exactly one and nothing else, so phasetune.plan cannot "
            "rebuild it from a config; `phasetune schedule plan --model package.module:factory` plans a model a "
            "factory builds") from None
    isolated = torch.distributed.is_available() and torch.distributed.is_initialized()
    plan = plan_memory_isolated if isolated else plan_memory  # a run's process group: plan in a fresh process
    kwargs, what = plan_kwargs(scheduled, prefix)
    full_kwargs, _ = plan_kwargs(baseline, prefix)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Module is None", UserWarning)  # torch's module tracker, on frozen blocks
        s = plan(scheduled.schedule, config, **kwargs)
        f = plan(full_schedule(baseline.trained), config, **full_kwargs)
    return Planned(s, f, time.perf_counter() - start, what)


def full_schedule(trained: list[str]) -> dict[int, Any]:
    """Full fine-tuning as a one-phase schedule: every parameter the baseline trains, by exact name."""
    return {0: {"params": list(trained)}}


def planned_peak(plan: MemoryPlan) -> tuple[int, int]:
    """The plan's largest peak over its phases and that phase's resident parameter bytes."""
    top = max(plan.phases, key=lambda p: p.peak)
    return top.peak, top.params


def ratio(a: int | None, b: int | None) -> str:
    """``a / b`` as printed (3 decimals), ``-`` when either is missing."""
    return "-" if a is None or not b else f"{a / b:.3f}x"


def print_memory_ratios(scheduled: Any, baseline: Any, plan: Any = plan_both) -> None:
    """After the comparison table: peak memory scheduled / full fine-tuning, measured beside planned (or one line
    saying why it could not be planned). ``scheduled``/``baseline``: the runs' results (``peak_memory``,
    ``peak_memory_kind``, ``facts``)."""
    kind = scheduled.peak_memory_kind if scheduled.peak_memory_kind == baseline.peak_memory_kind else None
    s_peak, b_peak = scheduled.peak_memory, baseline.peak_memory
    s_facts, b_facts = scheduled.facts, baseline.facts
    rows: list[list[Any]] = [["measured peak", fmt_bytes(s_peak), fmt_bytes(b_peak), ratio(s_peak, b_peak)]]
    measured = {CUDA: "measured peak: CUDA memory allocated, per run",
                RSS: "measured peak: the process's peak resident memory (VmHWM, reset per run), everything it holds"}
    notes = [measured.get(kind or "", f"measured peak: {kind or 'not measured alike in both runs'}")]
    if kind in (CUDA, RSS) and None not in (s_peak, b_peak, s_facts.start, b_facts.start):
        s_add, b_add = s_peak - s_facts.start, b_peak - b_facts.start
        rows.append(["measured, added in the fit", fmt_bytes(s_add), fmt_bytes(b_add), ratio(s_add, b_add)])
        held = "allocated" if kind == CUDA else "resident (VmRSS)"
        notes.append(f"added in the fit: the peak less what the process held {held} when the fit started "
                     f"({fmt_bytes(s_facts.start)} and {fmt_bytes(b_facts.start)}: interpreter, libraries, data, "
                     "the weights loaded, what the runs before it keep; freed heap memory returned to the system "
                     "first, by malloc_trim); the measured figure comparable to tensor bytes")
    skipped = None
    try:
        planned = plan(s_facts, b_facts)
    except Exception as e:  # the measured ratios are still printed; one line says why no plan follows
        skipped = str(getattr(e, "problems", [e])[0]).splitlines()[0][:300]
    else:
        (sp, s_params), (fp, f_params) = planned_peak(planned.scheduled), planned_peak(planned.full)
        rows.append(["planned peak", fmt_bytes(sp), fmt_bytes(fp), ratio(sp, fp)])
        rows.append(["planned, above the weights", fmt_bytes(sp - s_params), fmt_bytes(fp - f_params),
                     ratio(sp - s_params, fp - f_params)])
        notes.append(f"planned (phasetune.plan, {planned.scheduled.model}): tensor bytes at the peak (parameters, "
                     f"gradients, optimizer state, activations), the scheduled run's {len(planned.scheduled.phases)} "
                     f"phase(s) as resolved vs. one phase of the {len(b_facts.trained)} parameter tensors the "
                     f"baseline trains; {planned.what}; planned in {planned.seconds:.1f} s")
        notes.append("above the weights: the planned peak less the parameters, which the process held before the "
                     "fit started")
    print("phasetune: peak memory, scheduled / full fine-tuning: measured and planned", flush=True)
    print(format_table(["peak memory", "scheduled", "full fine-tuning", "ratio"], rows, align="lrrr"))
    for note in notes:
        print(note)
    if skipped is not None:
        print(f"phasetune: planned peak memory ratio skipped: {skipped}")
    print(flush=True)


__all__ = ["FitFacts", "FitFactsRecorder", "Planned", "full_schedule", "plan_both", "plan_kwargs",
           "planned_peak", "print_memory_ratios", "ratio",
           "release_freed_memory"]
