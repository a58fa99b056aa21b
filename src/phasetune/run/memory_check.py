"""The memory check at fit start: the run's memory plan (:mod:`phasetune.plan`), made before phase 0 (torch only).

``RunOptions.memory_check`` turns it on or off:

- ``None`` (the default): on when the run's device is a CUDA device (its size is read), off otherwise;
- ``False``: off; ``True``: on (a device that is not CUDA must be given its size);
- a number: the device's size in GiB (so the check also runs on CPU);
- a mapping of what the plan cannot learn from a built model, every key optional (:data:`KEYS`):
  ``{"device_gib": 80, "model": "path/to/config.json" or "pkg.mod:factory", "name_prefix": "model",
  "seq_len": 512, "micro_batch": 8}``.

A front end gathers what only it knows of the run in a :class:`RunShape` (strategy, world size, FSDP2 plan,
precision, micro-batch, accumulation, the training set) and calls :func:`check_memory` once, before any training
compute. Rank 0 plans: in this process when no process group is up, else in a fresh one (the plan plays its ranks
on a fake group of its own). Its verdict is broadcast, and every rank raises the same
:class:`~phasetune.errors.ConfigurationError` naming each phase that will not fit, or goes on.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from phasetune.core import recipes
from phasetune.errors import ConfigurationError, PhasetuneError

if TYPE_CHECKING:
    from phasetune.plan import MemoryPlan
    from phasetune.run.phase_run import PhaseRun

#: the keys a ``memory_check`` mapping takes, with what each gives the plan
KEYS = {
    "device_gib": "the device's size in GiB (default: read from a CUDA device)",
    "model": "what the plan rebuilds the model from: a Hugging Face config folder or config.json, or "
             "'package.module:factory' (default: the config of the run's Hugging Face model)",
    "name_prefix": "the attribute path the schedule's names start with (e.g. 'model' for a LightningModule's "
                   "self.model), with 'model'",
    "seq_len": "tokens per sample (default: from the first micro-batch of the training set)",
    "micro_batch": "samples per rank per forward (default: the front end's batch size)",
}
OFF_HINT = "memory_check=False switches the check off"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
STRATEGY_WORDS = {"single": "one device", "ddp": "DDP", "fsdp2": "FSDP2", "fsdp1": "FSDP1"}


def setting_problems(value: Any) -> list[str]:
    """What is wrong with a ``memory_check`` value (empty when nothing is), each naming it."""
    if value is None or isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [] if _positive(value) else [f"memory_check as a number is the device's size in GiB and must be > 0, "
                                            f"got {value!r}"]
    if not isinstance(value, Mapping):
        return [f"memory_check must be None (on for a CUDA device), False, True, the device's size in GiB or a mapping "
                f"with keys {', '.join(KEYS)}; got {type(value).__name__} {value!r}"]
    found = [recipes.unknown_option(k, list(KEYS), "memory_check key") for k in value if k not in KEYS]
    if "device_gib" in value and not _positive(value["device_gib"]):
        found.append(f"memory_check['device_gib'] must be the device's size in GiB (> 0), got {value['device_gib']!r}")
    for key in ("seq_len", "micro_batch"):
        v = value.get(key)
        if key in value and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            found.append(f"memory_check[{key!r}] must be an integer >= 1, got {v!r}")
    if "model" in value and not (isinstance(value["model"], (str, os.PathLike)) and str(value["model"])):
        found.append(f"memory_check['model'] must be a config path or 'package.module:factory', got {value['model']!r}")
    if "name_prefix" in value and (not isinstance(value["name_prefix"], str) or "model" not in value):
        found.append("memory_check['name_prefix'] goes with memory_check['model'] and is a dotted attribute path such "
                     f"as 'model', got {value['name_prefix']!r}" + ("" if "model" in value else " without 'model'"))
    return found


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass
class RunShape:
    """What a front end knows of the run the plan is for (the :class:`~phasetune.plan.PlanSetup` fields it fills)."""

    #: "single", "ddp", "fsdp2" or "fsdp1"
    strategy: str = "single"
    world_size: int = 1
    fsdp_plan: Mapping[str, Any] | None = None
    fsdp_default_kwargs: Mapping[str, Any] | None = None
    #: "bf16"/"fp16": FSDP2 gathers in that dtype (the plain strategy's bf16=True); single device and DDP autocast
    mixed_precision: str | None = None
    act_ckpt: bool = False
    #: gradients reduced on every micro-step (Lightning's ModelParallelStrategy), not once per accumulation cycle
    sync_every_micro_step: bool = False
    micro_batch: int | None = None
    accumulation: int = 1
    #: a map-style training set and the collate function of its loader (the sequence length comes from them)
    dataset: Any = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    device: torch.device | str | None = None


_NOTED: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def note_shape(model: nn.Module, **facts: Any) -> None:
    """What a strategy that prepared ``model`` knows of the run (:class:`RunShape` fields), for the front end that
    trains it to read with :func:`noted_shape` (``FSDP2Strategy.prepare_model`` notes its plan and batch sizes)."""
    unknown = set(facts) - {f.name for f in fields(RunShape)}
    if unknown:
        raise TypeError(f"note_shape: no RunShape field {sorted(unknown)}")
    _NOTED[model] = facts


def noted_shape(model: nn.Module) -> dict[str, Any]:
    """The facts :func:`note_shape` noted for ``model`` (empty when none were)."""
    return dict(_NOTED.get(model, {}))


def loader_shape(loader: Any) -> dict[str, Any]:
    """The :class:`RunShape` fields a ``DataLoader`` gives (its dataset, collate function and batch size); the first
    loader of a list or dict of them; empty for anything else."""
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()), None)
    elif isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if not isinstance(loader, torch.utils.data.DataLoader):
        return {}
    batch = loader.batch_size if loader.batch_size is not None else getattr(loader.batch_sampler, "batch_size", None)
    return {"dataset": loader.dataset, "collate_fn": loader.collate_fn,
            "micro_batch": batch if isinstance(batch, int) and batch > 0 else None}


# ---------------------------------------------------------------------------------------------- the check


@dataclass
class _Setting:
    explicit: bool
    device_gib: float
    model: Any = None
    name_prefix: str | None = None
    seq_len: int | None = None
    micro_batch: int | None = None


def _setting(value: Any, device: torch.device | str | None) -> _Setting | None:
    """The check asked for (None: off), or ConfigurationError when it is asked for without a device size."""
    if value is False:
        return None
    is_cuda = device is not None and torch.device(device).type == "cuda"
    if value is None and not is_cuda:
        return None  # the default off a CUDA device: nothing imported, nothing said
    given = dict(value) if isinstance(value, Mapping) else {}
    size = value if _positive(value) else given.get("device_gib")
    if size is None and is_cuda:
        from phasetune.plan.fit_check import device_gib

        size = device_gib(device)
    if size is None:
        if value is None:
            return None
        raise ConfigurationError(
            f"memory_check={value!r} needs the device's size, and the run's device ({device or 'unknown'}) is not a "
            "CUDA device: give it in GiB, memory_check=80 or memory_check={'device_gib': 80, ...}; or "
            + OFF_HINT)
    return _Setting(value is not None, float(size), given.get("model"), given.get("name_prefix"), given.get("seq_len"),
                    given.get("micro_batch"))


def check_memory(run: PhaseRun, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 shape: RunShape) -> MemoryPlan | None:
    """Plan ``run`` (``model`` as the front end holds it, trained by ``optimizer``, shaped as ``shape`` says) when
    ``run.options.memory_check`` asks for it, and raise :class:`~phasetune.errors.ConfigurationError` on every rank
    when a phase up to ``max_depth`` will not fit. A collective: every rank calls it. Returns the plan on rank 0
    when it ran, else None."""
    setting = _setting(run.options.memory_check, shape.device)
    if setting is None:
        return None
    env = run.env
    plan: MemoryPlan | None = None
    verdict: tuple[str, list[str]] | None = None
    if env.rank == 0:
        try:
            verdict, plan = _plan(run, model, optimizer, shape, setting)
        except Exception as e:  # never leave the other ranks waiting in the broadcast
            why = f"{type(e).__name__}: {e}" if not isinstance(e, PhasetuneError) else str(e)
            lines = getattr(e, "problems", None) if isinstance(e, ConfigurationError) else None
            verdict = (("error", [f"memory check: {p}" for p in lines or [why]] + [OFF_HINT]) if setting.explicit
                       else ("skip", [f"memory check skipped: the plan failed ({why.splitlines()[0][:300]}); give "
                                      f"memory_check a mapping or a size to make it an error; {OFF_HINT}"]))
    kind, lines = env.broadcast(verdict)  # type: ignore[misc]
    if kind in ("fail", "error"):
        run.close()  # the prefix cache's and the audit's hooks go with the run that will not start
        raise ConfigurationError(lines)
    (env.warn if kind == "skip" else env.info)(lines[0])
    return plan


def check_trainer_memory(run: PhaseRun, trainer: Any) -> MemoryPlan | None:
    """:func:`check_memory` for a ``transformers.Trainer`` run (read by attribute: no transformers import here): DDP
    over ``args.world_size`` processes (the Trainer's FSDP is refused earlier), ``bf16``/``fp16`` autocast,
    ``gradient_checkpointing`` on every block, the per-device batch, accumulation, the training set and collator."""
    args = trainer.args
    optimizer = trainer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer) and isinstance(getattr(optimizer, "optimizer", None),
                                                                        torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # Accelerate's AcceleratedOptimizer
    shape = RunShape("ddp" if args.world_size > 1 else "single", args.world_size,
                     mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else None,
                     act_ckpt=bool(args.gradient_checkpointing), micro_batch=args.per_device_train_batch_size,
                     accumulation=args.gradient_accumulation_steps, dataset=trainer.train_dataset,
                     collate_fn=trainer.data_collator, device=args.device)
    return check_memory(run, trainer.model, optimizer, shape)


def _plan(run: PhaseRun, model: nn.Module, optimizer: torch.optim.Optimizer | None, shape: RunShape,
          setting: _Setting) -> tuple[tuple[str, list[str]], MemoryPlan | None]:
    """Rank 0's verdict: ("ok" | "skip" | "fail" | "error", lines) and the plan when one was made."""
    from phasetune.plan.advice import size
    from phasetune.plan.fit_check import fit_problems, model_for_plan
    from phasetune.plan.planner import plan_memory, plan_memory_isolated
    from phasetune.plan.setup import optimizer_settings

    if setting.model is not None:
        source, prefix = str(setting.model), setting.name_prefix or ""
    else:
        try:
            source, prefix = model_for_plan(model)
        except ConfigurationError as e:
            ask = ("give memory_check={'model': 'path/to/config.json' or 'package.module:factory', 'name_prefix': ...} "
                   f"to check it; {OFF_HINT}")
            return (("error", [*e.problems, ask]) if setting.explicit
                    else ("skip", [f"memory check skipped: {e.problems[0]}; {ask}"])), None
    micro_batch = setting.micro_batch or shape.micro_batch
    seq_len, seq_from = ((setting.seq_len, "memory_check's seq_len") if setting.seq_len
                         else seq_len_of(shape.dataset, shape.collate_fn, micro_batch or 1))
    if seq_len is None or micro_batch is None:
        missing = " and ".join(w for w, v in (("micro-batch size", micro_batch), ("sequence length", seq_len)) if v is None)
        keys = ", ".join(f"'{k}': N" for k, v in (("micro_batch", micro_batch), ("seq_len", seq_len)) if v is None)
        return ("skip", [f"memory check skipped: the run's {missing} is unknown ({seq_from}); give memory_check="
                         f"{{{keys}}} (with 'device_gib' off CUDA); {OFF_HINT}"]), None
    world = shape.world_size if shape.strategy != "single" else 1
    kwargs: dict[str, Any] = {
        "world_size": world, "strategy": shape.strategy, "fsdp_plan": shape.fsdp_plan,
        "fsdp_default_kwargs": shape.fsdp_default_kwargs, "mixed_precision": shape.mixed_precision,
        "act_ckpt": shape.act_ckpt, "sync_every_micro_step": shape.sync_every_micro_step, "micro_batch": micro_batch,
        "seq_len": seq_len, "device_gib": setting.device_gib, "snapshot_storage": run.options.snapshot_storage,
        "search_micro_batch": False, "name_prefix": prefix, "param_dtype": _param_dtype(model),
    }
    if shape.accumulation > 1:
        kwargs["global_batch"] = micro_batch * world * shape.accumulation
    optimizer_note = ""
    if optimizer is not None:
        try:
            kwargs.update(optimizer_settings(optimizer, on_cuda=torch.device(shape.device or "cpu").type == "cuda"))
        except ValueError:
            optimizer_note = f"; {type(optimizer).__name__} planned as AdamW (the plan knows AdamW, Adam and SGD)"
    # the phases this run will reach, by exact name: a stand-in module's names match the run's
    schedule: dict[Any, Any] = {k: v for k, v in run.schedule.to_dict(resolved=True).items()
                                if isinstance(k, int) and k <= run.final_depth}
    if run.schedule.peft is not None:  # the plan's stand-in gets the run's adapters (its phases name them)
        schedule["peft"] = run.schedule.peft
    where = STRATEGY_WORDS.get(shape.strategy, shape.strategy) + (f" on {world} ranks" if world > 1 else "")
    what = (f"{where}, micro-batch {micro_batch} x {seq_len} tokens (sequence length from "
            f"{seq_from}), {setting.device_gib:g} GiB device{optimizer_note}")
    run.env.info(f"memory check: planning {run.final_depth + 1} phase(s) before phase 0 ({what}); seconds for a small model, "
                 "minutes for billions of parameters")
    isolated = torch.distributed.is_available() and torch.distributed.is_initialized()
    start = time.perf_counter()
    with _random_state_kept(), warnings.catch_warnings():  # fit start draws nothing: seeded runs stay as they were
        warnings.filterwarnings("ignore", "Module is None", UserWarning)  # torch's module tracker, on frozen blocks
        plan = (plan_memory_isolated if isolated else plan_memory)(schedule, source, **kwargs)
    took = time.perf_counter() - start
    problems = fit_problems(plan, f"(memory check before phase 0: {plan.model}, {what}; planned in {took:.1f} s; "
                                  f"`phasetune schedule plan` prints every phase and the largest micro-batch; "
                                  f"{OFF_HINT})")
    if problems:
        return ("fail", problems), plan
    top = max(plan.phases, key=lambda p: p.peak)
    return ("ok", [f"memory check: every phase fits on a {setting.device_gib:g} GiB device: peak phase {top.phase} "
                   f"{size(top.peak)} at {top.peak_at}, {size(top.headroom or 0)} headroom (planned in {took:.1f} s)"]), plan


def _param_dtype(model: nn.Module) -> str:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return DTYPE_NAMES.get(dtype, "float32")


def seq_len_of(dataset: Any, collate_fn: Callable[[list[Any]], Any] | None, micro_batch: int) -> tuple[int | None, str]:
    """Tokens per sample in one micro-batch built by index (``dataset[i]``, collated), and where it came from: the
    loader itself is never iterated (that would draw from the data order's random generator)."""
    if dataset is None:
        return None, "no training set given"
    if isinstance(dataset, torch.utils.data.IterableDataset) or not (hasattr(dataset, "__getitem__") and
                                                                     hasattr(dataset, "__len__")):
        return None, f"the training set is no map-style dataset ({type(dataset).__name__})"
    n = min(micro_batch, len(dataset))
    if n < 1:
        return None, "the training set is empty"
    with _random_state_kept():
        samples = [dataset[i] for i in range(n)]
        try:
            found = _tokens((collate_fn or torch.utils.data.default_collate)(samples))
        except Exception:  # a collator that wants the columns the Trainer removes first: read the samples instead
            found = None
    if found is not None:
        return found, f"the first {n} sample(s) of the training set, collated"
    lengths = [len(s["input_ids"]) for s in samples if isinstance(s, Mapping) and hasattr(s.get("input_ids"), "__len__")]
    if lengths:
        return max(lengths), f"the input_ids of the first {n} sample(s) of the training set"
    return None, "its first micro-batch holds no token ids (input_ids or a 2-D integer tensor)"


def _tokens(batch: Any) -> int | None:
    """The sequence length of a collated batch: its ``input_ids``, else its first 2-D integer tensor."""
    if isinstance(batch, Mapping):
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
            return int(ids.shape[-1])
        candidates = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        candidates = list(batch)
    else:
        candidates = [batch]
    for t in candidates:
        if isinstance(t, torch.Tensor) and t.dim() == 2 and not t.is_floating_point() and t.dtype != torch.bool:
            return int(t.shape[-1])
    return None


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """Python's, NumPy's (when imported) and torch's CPU random state as they were before."""
    py = random.getstate()
    np = sys.modules.get("numpy")
    np_state = np.random.get_state() if np is not None else None
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py)
        if np is not None:
            np.random.set_state(np_state)


__all__ = ["KEYS", "RunShape", "check_memory", "check_trainer_memory", "loader_shape", "note_shape", "noted_shape", "seq_len_of",
           "setting_problems"]
