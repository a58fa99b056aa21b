"""What :meth:`FSDP2Strategy.save_ckpt <phasetune.loop.strategy.FSDP2Strategy.save_ckpt>` and ``load_ckpt`` write
and read: the model and optimizer through DCP, lr schedulers, step counters, the fine-tuning loop's state,
RNG states and the caller's ``client_state``.

The directory they live in (atomic writes, finding the latest complete one, rotation) is
:mod:`phasetune.loop.strategy.checkpoint_dirs`'s; optimizer state covering only some parameters is
:mod:`phasetune.sharding.optim_state`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer

from phasetune.errors import ConfigurationError
from phasetune.features import random_state as rng
from phasetune.loop.strategy import checkpoint_dirs as ckpt
from phasetune.loop.strategy.distributed import DistEnv
from phasetune.sharding import optim_state
from phasetune.sharding.names import logical_name
from phasetune.util.dist import barrier

log = logging.getLogger("phasetune")


class Loaded(NamedTuple):
    """What :func:`load` read: the checkpoint directory (None: there was none), the saved ``client_state`` and
    the step counters (``global_step``, ``micro_step``, ``skipped_steps``) as saved."""

    path: Path | None
    client_state: dict[str, Any]
    counters: dict[str, int]


def resolve_optim(optimizer: Optimizer | None, scheduler: Any, finetuning: Any) -> tuple[Optimizer | None, list[Any]]:
    """The optimizer and lr schedulers to save or load: those given, else ``finetuning``'s current ones."""
    if optimizer is None and finetuning is not None:
        optimizer = finetuning.optimizer
    if scheduler is None:
        schedulers = list(finetuning.schedulers) if finetuning is not None else []
    elif isinstance(scheduler, (list, tuple)):
        schedulers = list(scheduler)
    else:
        schedulers = [scheduler]
    return optimizer, schedulers


def save(
    model: nn.Module,
    save_dir: str | os.PathLike[str],
    tag: str,
    *,
    env: DistEnv,
    optimizer: Optimizer | None,
    schedulers: list[Any],
    finetuning: Any,
    client_state: Mapping[str, Any] | None,
    counters: dict[str, int],
    max_num: int,
    max_mem: float,
) -> Path:
    """Write one checkpoint ``save_dir/tag`` (collective: every rank calls it) and rotate old ones."""
    started = time.perf_counter()
    app_state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        with optim_state.no_placeholder_state(optimizer):
            app_state["optim"] = get_optimizer_state_dict(model, optimizer)
    shared = {
        "schedulers": [s.state_dict() for s in schedulers],
        "client": dict(client_state or {}),
        "counters": dict(counters),
    }
    rank_state = {"rng": rng.capture(), "finetuning": finetuning.state_dict() if finetuning is not None else None}
    meta = {"world_size": env.world_size, "global_step": counters["global_step"], "has_optimizer": optimizer is not None,
            "depth": getattr(finetuning, "depth", None),
            "num_schedulers": len(schedulers)}
    path = ckpt.save(save_dir, tag, app_state, rank_state, shared, meta, max_num, max_mem)
    if env.is_main:
        log.info("phasetune: saved checkpoint %s in %.2fs", path, time.perf_counter() - started)
    return path


def load(
    model: nn.Module,
    load_dir: str | os.PathLike[str],
    *,
    env: DistEnv,
    optimizer: Optimizer | None,
    scheduler: Any,
    finetuning: Any,
    tag: str | None,
    load_module_strict: bool,
    load_optimizer_states: bool,
    load_lr_scheduler_states: bool,
) -> Loaded:
    """Load the checkpoint :func:`~phasetune.loop.strategy.checkpoint_dirs.resolve` picks into ``model``, the
    optimizer and schedulers (``finetuning``'s, after it replayed its saved phase) and this process's RNGs."""
    path = ckpt.resolve(load_dir, tag)
    if path is None:
        if env.is_main:
            log.info("phasetune: no complete checkpoint under %s; starting from scratch", load_dir)
        return Loaded(None, {}, {})
    meta = ckpt.read_meta(path)
    own = ckpt.rank_file(path, env.rank)
    rank_state = torch.load(own if own.exists() else ckpt.rank_file(path, 0), map_location="cpu",
                            weights_only=True)
    if meta.get("depth") is not None and finetuning is None and meta["depth"] > 0:
        raise ConfigurationError(
            f"{path} was saved in phase {meta['depth']} of a ScheduledFinetuning; pass finetuning= (a new "
            "ScheduledFinetuning over this model and optimizer) to load_ckpt so that phase's parameter groups "
            "exist before the optimizer state is loaded"
        )
    if finetuning is not None and rank_state.get("finetuning") is not None:
        finetuning.load_state_dict(rank_state["finetuning"])
    optimizer, schedulers = resolve_optim(optimizer, scheduler, finetuning)
    saved_scheds = meta.get("num_schedulers", 0)
    if load_lr_scheduler_states and saved_scheds != len(schedulers):
        raise ConfigurationError(f"{path} holds the state of {saved_scheds} lr scheduler(s), but {len(schedulers)} "
                                 "were given; pass the same schedulers as when saving (or "
                                 "load_lr_scheduler_states=False)")
    app_state: dict[str, Any] = {"model": get_model_state_dict(model)}
    load_optim = optimizer is not None and load_optimizer_states and meta.get("has_optimizer", False)
    shaped: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if load_optim:  # while it loads, the optimizer holds state for exactly what the checkpoint has state for
        assert optimizer is not None
        params = {logical_name(n): p for n, p in model.named_parameters()}
        saved = optim_state.saved_state_names(path, "optim")
        shaped = optim_state.shaped_like_checkpoint(optimizer, saved, params)
    with shaped:
        if load_optim:
            app_state["optim"] = get_optimizer_state_dict(model, optimizer)
        ckpt.load_app_state(path, app_state)
        set_model_state_dict(model, app_state["model"], options=StateDictOptions(strict=load_module_strict))
        if load_optim:
            set_optimizer_state_dict(model, optimizer, app_state["optim"])
    shared = torch.load(path / ckpt.SHARED_FILE, map_location="cpu", weights_only=True)
    if load_lr_scheduler_states:
        for s, st in zip(schedulers, shared["schedulers"]):
            s.load_state_dict(st)
    if meta.get("world_size") == env.world_size:
        rng.restore(rank_state["rng"])
    elif env.is_main and finetuning is None:  # a ScheduledFinetuning refused this, or re-seeded as asked
        log.warning("phasetune: %s was saved by %s processes, loading with %d: RNG states not restored",
                    path, meta.get("world_size"), env.world_size)
    barrier()
    counters = dict(shared["counters"])
    if env.is_main:
        log.info("phasetune: loaded checkpoint %s (step %d%s)", path, counters["global_step"],
                 f", phase {meta['depth']}" if meta.get("depth") is not None else "")
    return Loaded(path, dict(shared["client"]), counters)
