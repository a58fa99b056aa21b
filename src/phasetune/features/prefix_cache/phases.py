"""The frozen-prefix cache as a per-phase schedule option (torch only).

A phase's ``prefix_cache`` key (or a front end's ``prefix_cache={phase: value}`` argument) asks for a
:class:`~phasetune.features.prefix_cache.cache.PrefixCache` during that phase. :class:`PrefixCachePhases` checks every phase's
setting against the model before training and gives front ends four calls::

    caches = PrefixCachePhases(run.schedule, model, spill_dir=log_dir, dataset=train_set)
    caches.enter(run.depth)                 # fit start / resume, and after each transition
    batch = caches.before_batch(batch)      # before each training forward
    line = caches.leave()                   # before a transition (and at the end): drops the cache
    caches.close()                          # end of the run

``before_batch`` takes the sample index out of a dict batch in place (after telling the cache about it), so a
``training_step`` that calls ``self.model(**batch)`` never hands ``sample_index`` to the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from phasetune.core.schedule import Schedule
from phasetune.core.schedule_validation import parse_prefix_cache
from phasetune.features.compile_support import is_compiled
from phasetune.features.prefix_cache.cache import (
    EVAL_NOTE,
    INDEX_KEY,
    PrefixCache,
    PrefixCacheError,
    check_deterministic,
    find_prefix_end,
    strip_indices,
)
from phasetune.features.prefix_cache.store import size_text

DEFAULT_LIMIT_MB = 1024


class PrefixCachePhases:
    """Builds, serves and drops the prefix cache of each phase whose setting asks for one.

    Args:
        schedule: the resolved schedule (its phases' ``prefix_cache``).
        model: the module the front end trains, whose parameter names the schedule uses (a LightningModule,
            a Hugging Face model, the loop's module); ``prefix_end`` names are relative to it.
        spill_dir: where entries beyond a phase's ``limit_mb`` go (a fresh folder per phase, deleted at
            :meth:`leave`); default: the system temp dir.
        dataset: the training dataset, checked for random transforms unless ``deterministic_inputs``.
        overrides: phase -> ``prefix_cache`` value (``True``, ``False`` or a mapping), replacing the schedule's;
            checked as the schedule key is.
        sharded: the sharding strategy the front end runs under (e.g. ``"FSDP2"``), refused with a cache on.
        compiled: the front end compiles the model (``torch.compile`` is also detected on the model itself).
        mask_key: the batch's padding-mask key (see :class:`~phasetune.features.prefix_cache.cache.PrefixCache`).
        chunk_bytes: size of each spill file.
        info: where the phase lines go.
    """

    def __init__(self, schedule: Schedule, model: nn.Module, *, spill_dir: str | os.PathLike[str] | None = None,
                 dataset: Any = None, overrides: Mapping[Any, Any] | None = None, sharded: str | None = None,
                 compiled: bool = False, mask_key: str | None = "attention_mask", chunk_bytes: int = 64 << 20,
                 info: Callable[[str], None] = print) -> None:
        self.model, self.spill_dir, self.dataset, self.mask_key, self.info = model, spill_dir, dataset, mask_key, info
        self.chunk_bytes = chunk_bytes
        self.settings: dict[int, dict[str, Any] | None] = {p.index: p.prefix_cache for p in schedule}
        names = [n for n, _ in model.named_parameters()]
        problems: list[str] = []
        for key, value in (overrides or {}).items():
            if isinstance(key, bool) or not isinstance(key, int) or key not in self.settings:
                problems.append(f"prefix_cache argument: {key!r} is not a phase of the schedule (phases 0.."
                                f"{len(schedule) - 1}); give {{phase index: true | false | {{prefix_end: ...}}}}")
                continue
            self.settings[key] = parse_prefix_cache(value, f"phase {key} (prefix_cache argument)", names,
                                                    set(schedule.params_through(key)), problems)
        on = sorted(k for k, v in self.settings.items() if v is not None)
        where = f"prefix_cache is on in phase{'s' if len(on) > 1 else ''} {', '.join(map(str, on))}"
        sharded = sharded or (_sharding(model) if on else None)
        if on and sharded:
            problems.append(f"{where}, but the model is sharded ({sharded}): the cache replaces prefix modules' "
                            "forward, which sharded units gather parameters in; turn prefix_cache off (schedule key "
                            "or prefix_cache argument) or train without sharding")
        if on and (compiled or is_compiled(model)):
            problems.append(f"{where}, but the model runs through torch.compile: the cache replaces prefix "
                            "modules' forward at run time, which a compiled graph would not see; turn prefix_cache "
                            "off (schedule key or prefix_cache argument) or train the model uncompiled")
        modules = dict(model.named_modules())
        #: phase -> the module its cached prefix ends at (given, or found from the phase's trainable names)
        self.prefix_ends: dict[int, str] = {}
        for k in on:
            end = self.settings[k].get("prefix_end")  # type: ignore[union-attr]
            if end is None:
                try:
                    end = find_prefix_end(model, schedule.params_through(k))
                except PrefixCacheError as e:
                    problems.append(f"phase {k}, key 'prefix_cache': {e}")
                    continue
            elif end not in modules:
                problems.append(f"phase {k}, key 'prefix_cache', 'prefix_end': {end!r} is not a submodule of "
                                f"{type(model).__name__}; give a name from model.named_modules()")
                continue
            self.prefix_ends[k] = end
            if dataset is not None and not self.settings[k].get("deterministic_inputs", False):  # type: ignore[union-attr]
                try:
                    check_deterministic(dataset)
                except PrefixCacheError as e:
                    problems.append(f"phase {k}, key 'prefix_cache': {e}")
        if problems:
            raise PrefixCacheError(problems)
        self.cache: PrefixCache | None = None
        self.depth: int | None = None
        # without a cache, a model called as model(**batch) (the Hugging Face Trainer) must not get the index
        self._strip = model.register_forward_pre_hook(self._strip_index, with_kwargs=True) if on else None

    # ------------------------------------------------------------------ front-end calls
    def enter(self, depth: int, *, dataset: Any = None) -> None:
        """Start phase ``depth`` (at fit start, on resume, after each transition): activate its cache, if any.
        ``dataset``: the training dataset, when the front end gets it only now (checked as the constructor's)."""
        self.leave()
        self.depth = depth
        if dataset is not None:
            self.dataset = dataset
        setting = self.settings.get(depth)
        if setting is None:
            return
        limit = setting.get("limit_mb", DEFAULT_LIMIT_MB) << 20
        self.cache = PrefixCache(self.model, self.prefix_ends[depth], limit_bytes=limit, spill_dir=self.spill_dir,
                                 mask_key=self.mask_key, dataset=self.dataset,
                                 deterministic_inputs=setting.get("deterministic_inputs", False),
                                 chunk_bytes=self.chunk_bytes).activate()
        self.info(f"phase {depth}: prefix cache up to {self.prefix_ends[depth]} ({EVAL_NOTE}); up to {size_text(limit)} "
                  f"in RAM, the rest under {self.spill_dir or 'the temp dir'}")

    def before_batch(self, batch: Any) -> Any:
        """Tell the active cache which samples the next training forward holds; returns the batch without its
        index (in every phase once any phase caches: the dataset then carries indices throughout). A dict batch
        loses ``sample_index`` in place, so a Lightning ``training_step`` gets it without; an ``(item, indices)``
        batch is returned as ``item``. Without any cached phase the batch is returned untouched."""
        if self._strip is None:
            return batch
        if self.cache is not None:
            self.cache.next_batch(batch)
        if isinstance(batch, dict):
            batch.pop(INDEX_KEY, None)
            return batch
        return strip_indices(batch)

    def leave(self, history: list[Any] | None = None) -> str | None:
        """End the current phase's cache (before a transition thaws any of the prefix, and at the end): remove
        its hooks, free its entries, delete its spill files. Returns its one-line description, also put into the
        current phase's record (the last of ``history``, a run's :class:`~phasetune.run.PhaseRecord` list)."""
        cache, self.cache = self.cache, None
        if cache is None:
            return None
        line = f"phase {self.depth}: {cache.describe()}"
        used = cache.batches_served + cache.batches_computed > 0
        cache.close()
        if used:  # not a cache replaced before any batch (a loop's constructor, then a resume)
            self.info(line)
        if history:
            history[-1].prefix_cache = line
        return line

    def close(self) -> None:
        """End of the run: drop the active cache and the index-stripping hook."""
        self.leave()
        if self._strip is not None:
            self._strip.remove()
            self._strip = None

    @property
    def enabled(self) -> bool:
        """Whether any phase caches (the training set must then carry sample indices)."""
        return bool(self.prefix_ends)

    @property
    def active(self) -> bool:
        """Whether the current phase's cache is in use."""
        return self.cache is not None

    def _strip_index(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.cache is None and INDEX_KEY in kwargs:
            return args, {k: v for k, v in kwargs.items() if k != INDEX_KEY}
        return None


def _sharding(model: nn.Module) -> str | None:
    """``"FSDP2"`` or ``"FSDP1"`` when a module of ``model`` is sharded that way, else None."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    for m in model.modules():
        if isinstance(m, FSDPModule):
            return "FSDP2 (fully_shard)"
        if isinstance(m, FullyShardedDataParallel):
            return "FSDP1 (FullyShardedDataParallel)"
    return None
