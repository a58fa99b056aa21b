"""Frozen-prefix output cache: run the frozen bottom of a network once per sample during a phase.

When every parameter up to a module (``prefix_end``) is frozen and the prefix runs deterministically, its
output for a sample cannot change during the phase. :class:`PrefixCache` stores that output per sample (keyed
by the index :class:`IndexedDataset` attaches) the first time the sample is seen, and on later sightings
makes the prefix modules return the stored output (and cheap placeholders) so only the trainable suffix runs.

It is exact or it refuses: the prefix runs in eval mode (dropout off, BatchNorm statistics frozen); a prefix
holding a trainable parameter, a batch without indices, a dataset with random augmentation, a boundary
output it cannot key by sample, and a stored output that differs from a fresh one are errors. Entries live
in RAM up to ``limit_bytes``, beyond that in memory-mapped files, deleted at :meth:`PrefixCache.close`. Only
training-mode forwards use the cache; evaluation passes through. Each process caches what it sees (DDP).
Per phase, from a schedule's ``prefix_cache`` key: :mod:`phasetune.features.prefix_cache.phases`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from phasetune.core.generate import find_blocks
from phasetune.features.prefix_cache.index import (  # re-exported: the cache's public names live here too
    INDEX_KEY,
    IndexedCollate,
    IndexedDataset,
    PrefixCacheError,
    batch_indices,
    check_deterministic,
    strip_indices,
)
from phasetune.features.prefix_cache.store import (
    StandIn,
    Store,
    batch_dims,
    build_tree,
    mask_widths,
    size_text,
    tensors_in,
)

EVAL_NOTE = "prefix in eval mode: dropout off, BatchNorm statistics frozen"


# ---------------------------------------------------------------------------------------- where the prefix ends
def find_prefix_end(model: nn.Module, trainable: Iterable[str] | None = None) -> str:
    """The deepest module, among the repeated blocks of the generated block order
    (:func:`phasetune.core.generate.find_blocks`) and the model's direct children (a stem), whose parameters are all
    registered before the first trainable one (``trainable``: names; default: those with ``requires_grad``)."""
    names = [n for n, _ in model.named_parameters()]
    train = set(trainable) if trainable is not None else {n for n, p in model.named_parameters() if p.requires_grad}
    if not train:
        raise PrefixCacheError(f"{type(model).__name__} has no trainable parameter: there is no suffix to train")
    first = min(i for i, n in enumerate(names) if n in train)
    last: dict[str, int] = {}
    for module in [*find_blocks(model), *(n for n, _ in model.named_children())]:
        idx = [i for i, n in enumerate(names) if n.startswith(module + ".")]
        if idx and max(idx) < first:
            last[module] = max(idx)
    if not last:
        raise PrefixCacheError(
            f"no frozen block lies below the first trainable parameter {names[first]!r} of {type(model).__name__}: "
            "nothing to cache in this phase; name prefix_end yourself or turn the prefix cache off"
        )
    return max(last, key=last.__getitem__)


# ---------------------------------------------------------------------------------------- output trees
def _flatten(obj: Any, leaves: list[torch.Tensor], where: str) -> Any:
    """A spec of ``obj``'s structure (rebuilt by :func:`phasetune.features.prefix_cache.store.build_tree`); its tensors are
    appended to ``leaves``."""
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
        return ("T", len(leaves) - 1)
    if isinstance(obj, (tuple, list)):
        return (type(obj), [_flatten(o, leaves, where) for o in obj])
    if isinstance(obj, Mapping):
        return (type(obj), {k: _flatten(v, leaves, where) for k, v in obj.items()})
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return ("C", obj)
    raise PrefixCacheError(f"module {where!r} returns a {type(obj).__name__}, which the prefix cache cannot rebuild "
                           "(tensors, tuples, lists, dicts and model outputs only); end the prefix elsewhere")


# ---------------------------------------------------------------------------------------- the cache
class PrefixCache:
    """Caches the output of ``model``'s frozen prefix (every module that runs before and including
    ``prefix_end``) per sample during one phase; later sightings of a sample run only the suffix.

    Args:
        model: the module whose training forward receives the batch (a LightningModule, an HF model, ...).
        prefix_end: name of the last prefix module (as in ``model.named_modules()``); ``None``: the deepest frozen
            block below every parameter in ``trainable`` (:func:`find_prefix_end`).
        trainable: names of the phase's trainable parameters (for ``prefix_end=None``); default: ``requires_grad``.
        limit_bytes: entries kept in RAM; the rest go to memory-mapped files under ``spill_dir``.
        spill_dir: parent directory of the spill files (default: the system temp dir); a fresh subdirectory
            per cache (and rank) is removed by :meth:`close`.
        mask_key: the batch's padding mask (``[batch, width]``, right padding): boundary tensors
            ``[batch, width, ...]`` are stored without their padded positions and re-padded with zeros to the
            width of a later batch (exact for models that mask padding, as every HF encoder does).
        dataset: the training dataset, checked for random transforms unless ``deterministic_inputs``.
        deterministic_inputs: the user asserts each index always gives the same input (skips the check).
        chunk_bytes: size of each spill file.
        rtol, atol: tolerance of the one-time check that a stored output equals a freshly computed one.
    """

    def __init__(self, model: nn.Module, prefix_end: str | None = None, *, trainable: Iterable[str] | None = None,
                 limit_bytes: int = 1 << 30, spill_dir: str | os.PathLike[str] | None = None,
                 mask_key: str | None = "attention_mask", dataset: Any = None, deterministic_inputs: bool = False,
                 chunk_bytes: int = 64 << 20, rtol: float = 1e-4, atol: float = 1e-5) -> None:
        self.model = model
        self.prefix_end = prefix_end if prefix_end is not None else find_prefix_end(model, trainable)
        self._modules = dict(model.named_modules())
        if not self.prefix_end or self.prefix_end not in self._modules:
            near = difflib.get_close_matches(self.prefix_end, [n for n in self._modules if n], n=3, cutoff=0.5)
            raise PrefixCacheError(f"prefix_end {self.prefix_end!r} is not a submodule of {type(model).__name__}"
                                   + (f"; did you mean {', '.join(map(repr, near))}?" if near else
                                      "; give a name from model.named_modules()"))
        if dataset is not None and not deterministic_inputs:
            check_deterministic(dataset)
        self.mask_key, self.rtol, self.atol = mask_key, rtol, atol
        self.batches_served = self.batches_computed = 0
        self._store = Store(limit_bytes, spill_dir, chunk_bytes)
        self._check_frozen(self._modules[self.prefix_end].named_parameters(prefix=self.prefix_end))
        self._handles: list[Any] = []
        self._replaced: dict[str, Any] = {}  # modules whose forward the cache replaced: their own instance forward
        self._record: list[Any] = []  # hooks of the first forward, which finds the prefix
        self._batch: tuple[list[int], int | None, list[int] | None] = ([], None, None)  # indices, width, lengths
        #: outermost prefix modules in forward order, known after the first training forward
        self.prefix: list[str] = []
        self._templates: dict[str, StandIn] = {}
        self._boundary: tuple[Any, list[bool], list[tuple[int, ...]], list[torch.device]] | None = None
        self._prefix_modules: list[nn.Module] = []
        self._prefix_params: list[tuple[str, torch.Tensor]] = []
        self._verified = self._nan_checked = False
        self._root: str | None = None  # the module whose forward is the training step in flight
        self._reentries = 0  # calls of that module made inside its own call, still running
        self._mode = "off"  # per forward: off (pass through), fill (run the prefix, store), serve (from cache)
        self._served: Any = None
        self._pending: tuple[list[int], Any] | None = None

    # ------------------------------------------------------------------ lifecycle
    def activate(self) -> PrefixCache:
        """Install the hooks; the next training forward records the prefix and starts filling the cache."""
        if not self._handles:  # on the model and every module between it and prefix_end (see _before)
            parts = self.prefix_end.split(".")
            for name in (".".join(parts[:k]) for k in range(len(parts))):
                m = self._modules[name]
                self._handles += [
                    m.register_forward_pre_hook(lambda m, a, kw, n=name: self._before(n, m, a, kw), with_kwargs=True),
                    m.register_forward_hook(lambda m, a, kw, o, n=name: self._after(n, m, o), with_kwargs=True)]
            self._wrap(self.prefix_end, end=True)
        return self

    def close(self) -> None:
        """Remove every hook, put the prefix back in the model's mode, free the entries, delete the spill files."""
        for h in self._handles + self._record:
            h.remove()
        self._handles, self._record = [], []
        for name, before in self._replaced.items():  # an instance-level forward set by others comes back
            module = self._modules[name]
            if before is None:
                del module.forward
            else:
                module.forward = before
            module.train(self.model.training)
        self._replaced = {}
        self._store.clear()
        self._forget()

    def _forget(self) -> None:
        """Back to the state of a new cache: the next activation finds the prefix again."""
        self.prefix, self._templates, self._boundary = [], {}, None
        self._prefix_modules, self._prefix_params = [], []
        self._verified = self._nan_checked = False
        self._mode, self._served, self._pending, self._root, self._reentries = "off", None, None, None, 0

    def __enter__(self) -> PrefixCache:
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def next_batch(self, batch: Any) -> None:
        """Say which samples the next training forward holds (front ends call it when the model's forward
        does not receive the batch itself); reads the indices and, for dict batches, ``mask_key``."""
        mask = batch.get(self.mask_key) if isinstance(batch, Mapping) and self.mask_key else None
        self._pending = (batch_indices(batch).tolist(), mask)
        self._root, self._reentries = None, 0

    def describe(self) -> str:
        """One line for the phase log: where the prefix ends, that it runs in eval mode, what the cache holds."""
        s = self._store
        return (f"prefix cache up to {self.prefix_end} ({EVAL_NOTE}): {len(s)} samples, "
                f"{size_text(s.ram_bytes + s.pending_bytes)} in RAM, {size_text(s.disk_bytes)} on disk; "
                f"{self.batches_served} batches served from it, {self.batches_computed} computed")

    def memory(self) -> dict[str, int]:
        """Samples held, bytes in RAM (spilled entries waiting for their chunk included) and bytes on disk."""
        s = self._store
        return {"entries": len(s), "ram_bytes": s.ram_bytes + s.pending_bytes, "disk_bytes": s.disk_bytes}

    def spill_files(self) -> list[Path]:
        """The finished spill files (none before the RAM limit is passed, none after :meth:`close`)."""
        return self._store.files()

    # ------------------------------------------------------------------ hooks
    def _before(self, name: str, root: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # The step's root is the outermost module around prefix_end whose forward runs: the model itself, or an
        # inner one when a training_step calls self.model(**batch) without going through the model's forward.
        # The root may be called again inside its own call: Lightning's DDP and DeepSpeed strategies call the
        # LightningModule with its forward redirected to training_step, which then calls self(x). That inner call
        # belongs to the step in flight; taken for a new step, it would find the batch's indices already used.
        if self._root is not None and (name == self._root or
                                       name.count(".") + bool(name) > self._root.count(".") + bool(self._root)):
            self._reentries += name == self._root
            if INDEX_KEY in kwargs:  # an inner module of a step in flight: only the index is taken out
                kwargs = {k: v for k, v in kwargs.items() if k != INDEX_KEY}
            return args, kwargs
        self._root, self._reentries = name, 0
        pending, self._pending = self._pending, None
        found = None
        if INDEX_KEY in kwargs:  # model(..., sample_index=idx): taken out before the model sees it
            kwargs = dict(kwargs)
            found = (torch.as_tensor(kwargs.pop(INDEX_KEY)).tolist(), kwargs.get(self.mask_key or ""))
        else:
            for v in (*args, *kwargs.values()):
                if isinstance(v, Mapping) and INDEX_KEY in v:
                    found = (torch.as_tensor(v[INDEX_KEY]).tolist(), v.get(self.mask_key) if self.mask_key else None)
                    break
        self._mode = "off"
        if not root.training:
            return args, kwargs
        got = pending or found
        if got is None:
            raise PrefixCacheError(
                f"a training forward of {type(root).__name__} came without sample indices, which the prefix cache "
                f"keys its entries by: build the training dataset with IndexedDataset and pass the batch to the "
                f"model (or call cache.next_batch(batch) before the forward, or pass {INDEX_KEY}=... to the model); "
                f"under the Hugging Face Trainer set remove_unused_columns=False, which otherwise drops {INDEX_KEY!r}")
        indices, mask = [int(i) for i in got[0]], got[1]
        self._batch = (indices, *mask_widths(mask, len(indices)))
        if not self._prefix_modules:  # the first training forward (or one after a refused one): find the prefix
            self._start_recording()
            self._mode = "fill"
            return args, kwargs
        self._check_frozen(self._prefix_params)
        for m in self._prefix_modules:  # front ends call model.train() each epoch: put the prefix back in eval
            if m.training:
                m.training = False
        hits = all(i in self._store for i in indices)
        self._served = self._assemble() if hits and self._verified else None
        self._mode = "serve" if self._served is not None else "fill"
        return args, kwargs

    def _after(self, name: str, root: nn.Module, output: Any) -> None:
        if name != self._root:
            return
        if self._reentries:  # the end of an inner call of the root: the step goes on
            self._reentries -= 1
            return
        self._root = None
        if self._record:
            self._finish_recording()
        if self._mode == "serve":
            self.batches_served += 1
            if not self._nan_checked:
                self._nan_checked = True
                if any(t.is_floating_point() and bool(torch.isnan(t).any()) for t in tensors_in(output)):
                    skipped = [n for n in self.prefix if n != self.prefix_end]
                    raise PrefixCacheError(
                        f"the first forward served from the prefix cache gave NaN: a module after {self.prefix_end!r} "
                        f"seems to read the output of a skipped prefix module ({', '.join(skipped)}) directly, which "
                        "the cache replaces by NaN stand-ins; end the prefix after that module or turn the cache off")
        elif self._mode == "fill":
            self.batches_computed += 1
        self._mode, self._served = "off", None

    def _wrap(self, name: str, end: bool = False) -> None:
        module = self._modules[name]
        original = module.forward
        self._replaced[name] = module.__dict__.get("forward")

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._mode == "serve":
                return self._served if end else self._templates[name].build(len(self._batch[0]), self._batch[1])
            out = original(*args, **kwargs)
            if end and self._mode == "fill":
                self._take(out)
            return out

        module.forward = forward

    # ------------------------------------------------------------------ the first forward: which modules are the prefix
    def _start_recording(self) -> None:
        for h in self._record:
            h.remove()
        self._record, self.prefix, self._templates = [], [], {}
        end = self.prefix_end
        ancestors = {".".join(end.split(".")[:k]) for k in range(len(end.split(".")))}
        state = {"done": False, "seen": []}

        def pre(module: nn.Module, args: Any, name: str) -> None:
            if name in ancestors:
                return
            if state["done"]:
                if name in state["seen"]:
                    raise PrefixCacheError(f"module {name!r} runs before prefix_end {end!r} and again after it; the "
                                           "prefix cache cannot skip it: end the prefix elsewhere")
                return
            self._check_frozen(module.named_parameters(prefix=name, recurse=False))
            module.training = False  # the prefix runs in eval mode (its children get their own call)
            state["seen"].append(name)

        def post(module: nn.Module, args: Any, out: Any, name: str) -> None:
            if name == end:
                state["done"] = True
            if (state["done"] and name != end) or name in ancestors:
                return
            if not any(name.startswith(s + ".") for s in state["seen"]):  # outermost: a module to skip
                self.prefix.append(name)
                if name != end:
                    leaves: list[torch.Tensor] = []
                    spec = _flatten(out, leaves, name)
                    batch, width = len(self._batch[0]), self._batch[1]
                    self._templates[name] = StandIn(spec, [(batch_dims(t, batch, width), t.dtype, t.device) for t in leaves])

        for name, m in self._modules.items():
            if name:
                self._record.append(m.register_forward_pre_hook(lambda m, a, n=name: pre(m, a, n)))
                self._record.append(m.register_forward_hook(lambda m, a, o, n=name: post(m, a, o, n)))
        self._state = state

    def _finish_recording(self) -> None:
        for h in self._record:
            h.remove()
        self._record = []
        if not self._state["done"]:
            self.prefix = []
            raise PrefixCacheError(f"prefix_end {self.prefix_end!r} did not run in the training forward of "
                                   f"{type(self.model).__name__}; name a module that runs on every batch")
        for name in self.prefix:
            if name != self.prefix_end:
                self._wrap(name)
        self._prefix_modules = [m for n in self.prefix for m in self._modules[n].modules()]
        self._prefix_params = [p for n in self.prefix for p in self._modules[n].named_parameters(prefix=n)]
        for m in self._prefix_modules:
            m.training = False

    # ------------------------------------------------------------------ storing and serving
    def _take(self, out: Any) -> None:
        indices, width, lengths = self._batch
        leaves: list[torch.Tensor] = []
        spec = _flatten(out, leaves, self.prefix_end)
        for k, t in enumerate(leaves):
            if t.dim() == 0 or t.shape[0] != len(indices):
                raise PrefixCacheError(f"output {k} of prefix_end {self.prefix_end!r} has shape {tuple(t.shape)}, "
                                       f"without the batch dimension ({len(indices)}) first: it cannot be stored per "
                                       "sample; end the prefix at a module whose outputs are batched")
        trimmed = [lengths is not None and t.dim() >= 3 and t.shape[1] == width for t in leaves]
        shapes = [tuple(t.shape[2:] if cut else t.shape[1:]) for t, cut in zip(leaves, trimmed)]
        if self._boundary is None:
            self._boundary = (spec, trimmed, shapes, [t.device for t in leaves])
        elif self._boundary[2] != shapes or self._boundary[1] != trimmed:
            raise PrefixCacheError(
                f"the output of prefix_end {self.prefix_end!r} changes shape between batches ({self._boundary[2]} "
                f"per sample, now {shapes}); give the batch's right-padded padding mask under mask_key (now "
                f"{self.mask_key!r}) or pad every batch to the same length")
        check = not self._verified and any(i in self._store for i in indices)
        for r, i in enumerate(indices):
            row = tuple(t[r, : lengths[r]] if cut else t[r] for t, cut in zip(leaves, trimmed))
            if i not in self._store:
                self._store.put(i, row)
            elif check:
                self._compare(i, row)
        self._verified = self._verified or check

    def _compare(self, i: int, fresh: tuple[torch.Tensor, ...]) -> None:
        for k, (a, b) in enumerate(zip(self._store.get(i), fresh)):
            b = b.detach().to("cpu")
            if a.shape != b.shape or not torch.allclose(a, b, rtol=self.rtol, atol=self.atol):
                diff = (a - b).abs().max().item() if a.shape == b.shape else f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
                raise PrefixCacheError(
                    f"sample {i}: the output of prefix_end {self.prefix_end!r} (part {k}) differs from the one stored "
                    f"when the sample was first seen (max difference {diff}): the inputs or the prefix are not "
                    "deterministic (random augmentation or crops in the dataset?); make them deterministic for the "
                    "cached phase or turn the prefix cache off")

    def _assemble(self) -> Any:
        """The boundary output for the current batch from the stored entries; ``None`` if they do not fit it."""
        indices, width, _ = self._batch
        assert self._boundary is not None
        spec, trimmed, shapes, devices = self._boundary
        rows = [self._store.get(i) for i in indices]
        leaves = []
        for k, (cut, shape, device) in enumerate(zip(trimmed, shapes, devices)):
            if cut:
                if width is None or any(r[k].shape[0] > width for r in rows):
                    return None
                t = torch.zeros((len(rows), width, *shape), dtype=rows[0][k].dtype)
                for j, r in enumerate(rows):
                    t[j, : r[k].shape[0]] = r[k]
            else:
                t = torch.stack([r[k] for r in rows])
            leaves.append(t.to(device, non_blocking=True))
        return build_tree(spec, leaves)

    def _check_frozen(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        bad = [n for n, p in named if p.requires_grad]
        if bad:
            raise PrefixCacheError(
                f"the prefix up to {self.prefix_end!r} holds trainable parameters ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}): its output would change as they train. End the prefix below "
                "them (prefix_end) or drop the cache at the transition that thaws them")


__all__ = ["EVAL_NOTE", "INDEX_KEY", "IndexedCollate", "IndexedDataset", "PrefixCache", "PrefixCacheError",
           "batch_indices", "check_deterministic", "find_prefix_end", "strip_indices"]
