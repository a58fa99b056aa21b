"""phasetune.features.random_state: which generators a data loader draws from, and the random state that comes back."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader

import phasetune.features.random_state


def test_loader_generators_finds_the_samplers_own_through_wrappers_and_never_the_datasets():
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from torchdata.stateful_dataloader import StatefulDataLoader

    class DataWithGenerator(torch.utils.data.TensorDataset):  # the user's augmentation generator: not the sampler's
        generator = torch.Generator()

    data = DataWithGenerator(torch.arange(8.0))
    own = torch.Generator()
    assert phasetune.features.random_state.loader_generators(DataLoader(data, shuffle=True)) == []  # draws from torch's generator
    assert phasetune.features.random_state.loader_generators(DataLoader(data, shuffle=True, generator=own)) == [own]
    stateful = StatefulDataLoader(data, shuffle=True)
    inner = stateful.sampler.generator
    assert phasetune.features.random_state.loader_generators(stateful) == [inner]
    # Lightning's wrapper around it in a batch sampler, the loaders in a dict (CombinedLoader's iterables)
    batches = torch.utils.data.BatchSampler(DistributedSamplerWrapper(stateful.sampler, num_replicas=2, rank=0), 2, False)
    wrapped = DataLoader(data, batch_sampler=batches, generator=own)
    assert phasetune.features.random_state.loader_generators({"a": wrapped, "b": wrapped}) == [own, inner]


def test_saved_generator_states_come_back_and_a_different_count_is_said():
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    saved = phasetune.features.random_state.checkpoint_state(rank=0, world_size=1, gather=False, epoch_start=phasetune.features.random_state.capture(gens),
                                           generators=gens)
    expected = [torch.rand(2, generator=g) for g in gens]
    assert phasetune.features.random_state.rank_state(saved, "states", rank=0, world_size=2) is None  # another number of ranks
    state = phasetune.features.random_state.rank_state(saved, "epoch_start", rank=0, world_size=1)
    said: list[str] = []
    phasetune.features.random_state.restore_generators(state, gens, said.append, " from x.ckpt")
    # exact, here and below: the same generator states draw the same numbers
    assert all(torch.equal(torch.rand(2, generator=g), e) for g, e in zip(gens, expected)) and said == []
    phasetune.features.random_state.restore_generators(state, gens[:1], said.append, " from x.ckpt")
    assert said == ["the training data loader's samplers keep 1 random generator(s) of their own and the checkpoint "
                    "from x.ckpt saved 2: the data order after this resume differs from an uninterrupted run's; "
                    "resume with the same data loader setup"]


def test_python_gauss_cache_and_numpy_state_come_back():
    random.seed(1)
    np.random.seed(1)
    random.gauss(0, 1)  # leaves the second value of the pair cached
    state = phasetune.features.random_state.capture()
    expected = (random.gauss(0, 1), float(np.random.normal()), torch.rand(1))
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    phasetune.features.random_state.restore(state)
    assert (random.gauss(0, 1), float(np.random.normal())) == expected[:2]  # exact, as below: the same states
    assert torch.equal(torch.rand(1), expected[2])
