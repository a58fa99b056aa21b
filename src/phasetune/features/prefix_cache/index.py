"""Sample indices for the frozen-prefix cache (:mod:`phasetune.features.prefix_cache.cache`): datasets and collation that attach
each sample's index to it, reading and dropping them from a batch, and the check that a dataset's inputs are
deterministic (no random augmentation), without which a stored prefix output could differ from a fresh one."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from phasetune.errors import ConfigurationError

INDEX_KEY = "sample_index"  # the key (dict batches) under which IndexedDataset puts each sample's index
_RANDOM_TRANSFORMS = ("ColorJitter", "AutoAugment", "RandAugment", "TrivialAugmentWide", "AugMix", "GaussianBlur",
                      "GaussianNoise", "ElasticTransform", "RandomErasing", "MixUp", "CutMix")


class PrefixCacheError(ConfigurationError):
    """The prefix cache cannot serve this model, batch or dataset exactly; the message says why and what to do."""


# ---------------------------------------------------------------------------------------- sample indices
class IndexedDataset(torch.utils.data.Dataset):
    """``dataset`` whose items carry their index: a dict item gains ``"sample_index": i``, any other item
    becomes ``(item, i)``. Default collation then gives ``batch["sample_index"]`` or ``(batch, indices)``;
    wrap a custom ``collate_fn`` in :class:`IndexedCollate` to get the same from it."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        if isinstance(item, Mapping):
            if INDEX_KEY in item:
                raise PrefixCacheError(f"{type(self.dataset).__name__}[{i}] already has a key {INDEX_KEY!r}; "
                                       "rename it, IndexedDataset stores the sample index there")
            return {**item, INDEX_KEY: i}
        return item, i


class IndexedCollate:
    """Wraps a ``collate_fn`` written for the plain items: collates them, then attaches the indices the same
    way default collation of :class:`IndexedDataset` items does (a key of a dict batch, else ``(batch, idx)``)."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[Any]) -> Any:
        if items and isinstance(items[0], Mapping):
            index = [it[INDEX_KEY] for it in items]
            batch = self.collate_fn([{k: v for k, v in it.items() if k != INDEX_KEY} for it in items])
        else:
            index = [i for _, i in items]
            batch = self.collate_fn([it for it, _ in items])
        ids = torch.tensor(index, dtype=torch.long)
        return {**batch, INDEX_KEY: ids} if isinstance(batch, Mapping) else (batch, ids)


def batch_indices(batch: Any) -> torch.Tensor:
    """The sample indices of a batch built from an :class:`IndexedDataset` (1-D integer tensor)."""
    if isinstance(batch, Mapping) and INDEX_KEY in batch:
        return torch.as_tensor(batch[INDEX_KEY])
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and _is_index(batch[1]):
        return batch[1]
    raise PrefixCacheError(
        f"the batch ({type(batch).__name__}) carries no sample indices: wrap the training dataset in "
        f"phasetune.features.prefix_cache.cache.IndexedDataset (and a custom collate_fn in IndexedCollate) so each batch has "
        f"'{INDEX_KEY}' (dict batches) or is (batch, indices)"
    )


def strip_indices(batch: Any) -> Any:
    """The batch without the indices :class:`IndexedDataset` added (for a model that rejects extra keys)."""
    if isinstance(batch, Mapping) and INDEX_KEY in batch:
        return {k: v for k, v in batch.items() if k != INDEX_KEY}
    batch_indices(batch)  # raises when there are none
    return batch[0]


def _is_index(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 1 and not x.is_floating_point() and not x.is_complex()


def check_deterministic(dataset: Any) -> None:
    """Refuse a dataset with a random transform (``transform``/``transforms`` attributes, through
    ``IndexedDataset``/``Subset`` wrappers): its prefix output would differ every time a sample is read."""
    seen, todo, found = set(), [dataset], []
    while todo:
        obj = todo.pop()
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        name = type(obj).__name__
        if name.startswith("Random") or name in _RANDOM_TRANSFORMS:
            found.append(name)
        if isinstance(obj, (list, tuple)):
            todo.extend(obj)
        for attr in ("dataset", "transform", "transforms", "target_transform"):
            if hasattr(obj, attr) and not isinstance(obj, torch.Tensor):
                todo.append(getattr(obj, attr))
    if found:
        raise PrefixCacheError(
            f"the training dataset ({type(dataset).__name__}) applies random transforms ({', '.join(found)}): a "
            "cached prefix output would freeze one random draw per sample. Drop the augmentation for the cached "
            "phase, turn the prefix cache off, or pass deterministic_inputs=True if the transforms are seeded per "
            "sample index"
        )


__all__ = ["INDEX_KEY", "IndexedCollate", "IndexedDataset", "PrefixCacheError", "batch_indices", "check_deterministic",
           "strip_indices"]
