"""Exact resume with randomness: a shuffled DataLoader (no generator of its own), Dropout, and data that
draws from Python's ``random`` (gauss cache) and NumPy. Resumed from any epoch checkpoint, a run ends
bit-equal to the uninterrupted one, in Lightning (one device; DDP, FSDPStrategy and ModelParallelStrategy on 2
processes, one launch of tests/distributed/resume_scenarios.py) and in the plain loop; so is a resume from the
middle of an epoch with torchdata's StatefulDataLoader (one device and the same 2-process launch); without the
random state it is not. Kills mid-write are in tests/test_kill_harness.py, other numbers of processes in
tests/test_topology.py (and ModelParallel 2 -> 1 and 1 -> 2 here, from this launch's checkpoints)."""

from __future__ import annotations

import io
import os
import random
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

import phasetune.rng
from helpers import SCHEDULE_3, NoisyData, ToyModule, dataset, one_process_fixture, trainer
from launch import launch
from phasetune import (
    ConfigurationError,
    FinetuningScheduler,
    FSDP2Strategy,
    FTSCheckpoint,
    FTSEarlyStopping,
    ScheduledFinetuning,
)
from plain_models import SCHEDULE as PLAIN_SCHEDULE
from plain_models import TinyLM, data

LOSSES = [1.0, 0.9, 0.95, 0.96, 0.8, 0.85, 0.86, 0.87, 0.5, 0.6, 0.7, 0.8]  # transitions at epochs 4 and 7; ends at 11


class RandomModule(ToyModule):
    def __init__(self) -> None:
        super().__init__(val_losses=LOSSES, optimizer="adam", lr=0.01, scheduler="step")
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.drop(x))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(NoisyData(), batch_size=16, shuffle=True)


class OwnGeneratorModule(RandomModule):
    """A shuffling sampler with a generator of its own (seeded as the loader is built), advanced every epoch."""

    def train_dataloader(self) -> DataLoader:
        data = NoisyData()
        sampler = torch.utils.data.RandomSampler(data, generator=torch.Generator().manual_seed(3))
        return DataLoader(data, batch_size=16, sampler=sampler)


class Losses(pl.Callback):
    """Every optimizer step's loss, by step: the batches and dropout masks, also of epochs restore-best rolls back."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, *args) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def fit(root: Path, ckpt_path=None, module_cls=RandomModule, losses: Losses | None = None, **fts_kwargs):
    pl.seed_everything(7)
    module = module_cls()
    fts = FinetuningScheduler(ft_schedule=SCHEDULE_3, **fts_kwargs)
    ck = FTSCheckpoint(monitor="val_loss", save_top_k=-1, dirpath=str(root / "ckpts"), filename="{epoch}")
    t = trainer(root, [fts, FTSEarlyStopping(monitor="val_loss", patience=2), ck, *([losses] if losses else [])],
                max_epochs=30, enable_checkpointing=True, num_sanity_val_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module, ckpt_path=ckpt_path)
    return {n: p.detach().clone() for n, p in module.named_parameters()}, fts


def assert_equal_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for n in a:
        assert torch.equal(a[n], b[n]), n


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    params, fts = fit(root)
    assert [(r.start_epoch, r.end_epoch) for r in fts.history] == [(0, 4), (4, 7), (7, 11)]
    assert fts.restore_best and all(r.restored_best for r in fts.history[:2])
    return root, params


@pytest.mark.parametrize("epoch", range(11))
def test_lightning_resume_from_every_epoch_checkpoint_is_bit_equal_with_shuffling_and_dropout(tmp_path, reference, epoch):
    root, expected = reference
    params, _ = fit(tmp_path, ckpt_path=root / "ckpts" / f"epoch={epoch}.ckpt")
    assert_equal_params(params, expected)


def test_lightning_resume_without_the_random_state_differs(tmp_path, reference, monkeypatch):
    root, expected = reference
    monkeypatch.setattr(phasetune.rng, "restore_checkpoint_state", lambda *a, **k: None)
    params, _ = fit(tmp_path, ckpt_path=root / "ckpts" / "epoch=5.ckpt")
    assert any(not torch.equal(params[n], expected[n]) for n in expected)


def test_the_checkpoint_holds_every_generator_of_every_rank(reference):
    root, _ = reference
    state = torch.load(root / "ckpts" / "epoch=5.ckpt", weights_only=True)["callbacks"]["FinetuningScheduler"]["rng"]
    assert state["world_size"] == 1 and set(state["states"]) == {0}
    assert {"python", "numpy", "torch"} <= set(state["states"][0])


def test_a_resume_onto_another_number_of_processes_is_refused_naming_resume_rng(tmp_path, reference):
    root, _ = reference
    path = root / "ckpts" / "epoch=5.ckpt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["callbacks"]["FinetuningScheduler"]["rng"]["world_size"] = 2
    torch.save(ckpt, tmp_path / "two.ckpt")
    with pytest.raises(ConfigurationError, match=r"saved by 2 processes and this run has 1.*resume_rng='reseed'"):
        fit(tmp_path, ckpt_path=tmp_path / "two.ckpt")


def test_reseed_continues_a_resume_onto_another_number_of_processes_with_a_warning(tmp_path, reference, caplog):
    root, _ = reference
    ckpt = torch.load(root / "ckpts" / "epoch=5.ckpt", weights_only=True)
    ckpt["callbacks"]["FinetuningScheduler"]["rng"]["world_size"] = 2
    torch.save(ckpt, tmp_path / "two.ckpt")
    with pytest.warns(UserWarning, match="re-seeded"):
        pl.seed_everything(7)
        module = RandomModule()
        fts = FinetuningScheduler(ft_schedule=SCHEDULE_3, resume_rng="reseed")
        ck = FTSCheckpoint(monitor="val_loss", dirpath=str(tmp_path / "ckpts"))
        t = trainer(tmp_path, [fts, FTSEarlyStopping(monitor="val_loss", patience=2), ck], max_epochs=30,
                    enable_checkpointing=True)
        t.fit(module, ckpt_path=tmp_path / "two.ckpt")
    assert fts.history[-1].end_epoch == 11


def test_resume_rng_must_be_exact_or_reseed():
    with pytest.raises(ConfigurationError, match="resume_rng must be one of"):
        FinetuningScheduler(resume_rng="ignore")


# ---------------------------------------------------------------------------------------------- DDP, FSDP1, FSDP2
# tests/distributed/resume_scenarios.py: one 2-process launch; each strategy trains uninterrupted, then resumes
# from several epoch checkpoints (inside phase 0, the last epoch before a transition, the first after it, the
# last of phase 1) and, with a StatefulDataLoader over torchdata's StatefulDistributedSampler, from step checkpoints
# in the middle of an epoch (mid phase 0; after the first batch following a transition), with a shuffling
# distributed sampler, Dropout, noise from random/NumPy, restore_best
SHARDED = ("ddp", "fsdp1", "fsdp2", "fsdp2_full")
# FSDP1's full optimizer state was gathered with offload_to_cpu=True, which on CPU (torch 2.13) saved exp_avg_sq's
# values as exp_avg too; epoch resumes did not show it (a restore-best rollback followed each), a mid-epoch one did
@pytest.mark.parametrize("kind", ["ddp", "fsdp1", "fsdp2_full"])
def test_a_full_checkpoint_keeps_the_two_adam_moments_of_each_parameter_apart(sharded_ranks, kind):
    assert sharded_ranks[0][kind]["moments_apart"] is True


# FSDP and ModelParallel resume through the sharded adapter, which applies the scheduler's state before Lightning
# calls on_load_checkpoint: it must learn there that the checkpoint is mid-epoch, or the random state comes back
# before Lightning re-creates the StatefulDataLoader's iterator (which draws from torch's generator)
MID_EPOCH = ("ddp", "fsdp1", "fsdp2")


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_resume")
    # a ModelParallel checkpoint saved by one process, for the launch to continue on 2 (1 -> 2)
    one = fit_on_one_process(out / "fsdp2_one_device", None, "exact")
    assert one["phases"] == [[0, 2, True], [2, 4, True], [4, 5, False]]
    return launch("resume_scenarios.py", out, "lightning", str(out / "fsdp2_one_device" / "fit" / "epoch=2.ckpt")), out


@pytest.fixture(scope="module")
def sharded_ranks(sharded_run):
    return sharded_run[0]


def resumed_fits(rank: dict, kind: str, point: str = "epoch=") -> dict[str, dict]:
    return {k: v for k, v in rank[kind].items() if k.startswith(point)}


@pytest.mark.parametrize("kind", SHARDED)
def test_a_sharded_resume_from_each_epoch_checkpoint_is_bit_equal_with_shuffling_and_dropout(sharded_ranks, kind):
    assert sharded_ranks[0][kind]["reference"]["phases"] == [[0, 2, True], [2, 4, True], [4, 5, False]]  # rolled back
    assert len(resumed_fits(sharded_ranks[0], kind)) >= 2
    for rank in sharded_ranks:  # each rank's parameters (under FSDP1 its shards)
        reference = rank[kind]["reference"]
        for point, fit in resumed_fits(rank, kind).items():
            assert fit["phases"] == reference["phases"], point
            assert fit["final"] == reference["final"], point
            assert fit["warnings"] == [], point  # every snapshot and random state came back
    for fit in sharded_ranks[0][kind].values():
        if isinstance(fit, dict) and "final" in fit:  # saved atomically (nothing hidden left behind), the strategy given back unpatched
            assert fit["hidden_files"] == [] and fit["patches_left"] == []


@pytest.mark.parametrize("kind", MID_EPOCH)
def test_a_2_process_mid_epoch_resume_with_stateful_dataloader_and_sampler_is_bit_equal(sharded_ranks, kind):
    assert sharded_ranks[0][kind]["sds_reference"]["phases"] == [[0, 2, True], [2, 4, True], [4, 5, False]]
    # mid phase 0; phase 1's first step, after a rollback
    assert sorted(resumed_fits(sharded_ranks[0], kind, "sds_step=")) == ["sds_step=6", "sds_step=9"]
    for rank in sharded_ranks:
        reference = rank[kind]["sds_reference"]
        for point, fit in resumed_fits(rank, kind, "sds_step=").items():
            assert fit["phases"] == reference["phases"], point
            assert fit["final"] == reference["final"], point
            step = int(point.removeprefix("sds_step="))
            assert fit["losses"] == {k: v for k, v in reference["losses"].items() if int(k) > step}, point
            assert fit["warnings"] == [], point  # no "saved no position" warning, every snapshot and generator back
            assert fit["hidden_files"] == [] and fit["patches_left"] == [], point


# StatefulDataLoader(shuffle=True) under DDP: Lightning wraps torchdata's RandomSampler, which draws each epoch's
# order from a generator of its own, in its DistributedSamplerWrapper (not stateful). A mid-epoch resume needs that
# generator as the epoch started and the sampler's epoch before Lightning 2.6 creates the iterator (before
# set_epoch), and the fast-forward, which starts the sampler twice, to draw the same order both times
def test_a_2_process_resume_with_a_stateful_dataloader_over_lightnings_distributed_sampler_is_bit_equal(sharded_ranks):
    for rank in sharded_ranks:
        reference = rank["ddp"]["stateful_reference"]
        for point, first_step in (("step=6", 7), ("stateful_epoch=2", 13)):
            fit = rank["ddp"][point]
            assert fit["phases"] == reference["phases"], point
            assert fit["final"] == reference["final"], point
            # every step after the resume saw the same batch and dropout mask: the rest of epoch 1 too, which
            # restore-best rolls back (the final parameters alone would not show it)
            assert sorted(fit["losses"], key=int)[0] == str(first_step), point
            assert fit["losses"] == {k: v for k, v in reference["losses"].items() if int(k) >= first_step}, point
            assert fit["warnings"] == [] and fit["patches_left"] == [], point


def test_a_sharded_resume_without_the_random_state_differs(sharded_ranks):
    expected = sharded_ranks[0]["fsdp2"]["reference"]["final"]
    assert sharded_ranks[0]["fsdp2"]["without_random_state"]["final"] != expected


@pytest.mark.parametrize("kind", SHARDED)
def test_a_sharded_checkpoint_holds_the_random_state_of_every_rank(sharded_ranks, kind):
    assert sharded_ranks[0][kind]["saved_rng"] == {"world_size": 2, "ranks": [0, 1],
                                                   "generators": ["numpy", "python", "torch"]}


def _fit_on_one_process(out: str, ckpt: str | None, resume_rng: str) -> None:
    """Child: the scenarios' ModelParallel fit on one device (from ``ckpt``, if given); what it saw (or raised) to
    out/result.json."""
    import importlib.util
    import json

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("resume_scenarios", Path(__file__).parent / "distributed" / "resume_scenarios.py")
    scenarios = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scenarios)
    try:
        result = scenarios.lightning_fit()("fsdp2", Path(out), "fit", Path(ckpt) if ckpt else None, devices=1,
                                           resume_rng=resume_rng)
    except ConfigurationError as e:
        result = {"error": str(e)}
    Path(out, "result.json").write_text(json.dumps(result))


def fit_on_one_process(out: Path, ckpt: Path | None, resume_rng: str) -> dict:
    import json

    from test_kill_harness import run_in_child

    assert run_in_child(_fit_on_one_process, str(out), str(ckpt) if ckpt else None, resume_rng) == 0
    return json.loads((out / "result.json").read_text())


def test_a_2_process_model_parallel_checkpoint_on_1_is_refused_then_continues_re_seeded(sharded_run, tmp_path):
    ranks, out = sharded_run
    ckpt = out / "fsdp2_ref" / "epoch=2.ckpt"  # phase 1, sharded on 2 processes
    refused = fit_on_one_process(tmp_path / "exact", ckpt, "exact")["error"]
    assert "saved by 2 processes and this run has 1" in refused and "resume_rng='reseed'" in refused
    assert "\n" not in refused
    fit = fit_on_one_process(tmp_path / "reseed", ckpt, "reseed")
    # DCP resharded model and optimizer state, the phase state as saved: the schedule goes on where it was
    assert [p[:2] for p in fit["phases"]] == [[0, 2], [2, 4], [4, 5]]
    said = " ".join(fit["warnings"])
    assert "re-seeded" in said  # the random state
    assert "restore-best snapshot was taken on 2 ranks, this run has 1" in said  # each rank's shards: dropped


def test_a_1_process_model_parallel_checkpoint_continues_on_2_re_seeded(sharded_ranks):
    for rank in sharded_ranks:
        fit = rank["fsdp2"]["from_one_device"]
        assert [p[:2] for p in fit["phases"]] == [[0, 2], [2, 4], [4, 5]]  # resharded by DCP, the phase state as saved
        assert fit["hidden_files"] == [] and fit["patches_left"] == []
    said = " ".join(sharded_ranks[0]["fsdp2"]["from_one_device"]["warnings"])
    assert "re-seeded" in said
    assert "restore-best snapshot was taken on 1 rank" in said
    # both ranks trained the same model (DCP gathered from shards of one full state)
    assert sharded_ranks[0]["fsdp2"]["from_one_device"]["final"] == sharded_ranks[1]["fsdp2"]["from_one_device"]["final"]


# ---------------------------------------------------------------------------------------------- plain loop
VALUES = [1.0, 0.9, 0.95, 0.8, 0.85, 0.7]


def plain_build():
    torch.manual_seed(0)
    model = TinyLM(dropout=0.2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    return model, ScheduledFinetuning(PLAIN_SCHEDULE, model, opt, sched, restore_best=True, patience=1)


def plain_epochs(model, ft, epochs, save=None):
    ids, y = data(64, 0)
    loader = DataLoader(list(zip(ids, y)), batch_size=16, shuffle=True)
    for epoch in epochs:
        model.train()
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            ft.optimizer.zero_grad()
            loss.backward()
            ft.optimizer.step()
        ft.lr_scheduler.step()
        ft.step(epoch, metric=VALUES[epoch])
        if save is not None:
            buf = io.BytesIO()
            torch.save({"ft": ft.state_dict(), "model": model.state_dict(), "opt": ft.optimizer.state_dict(),
                        "sched": ft.lr_scheduler.state_dict()}, buf)
            save[epoch] = buf.getvalue()


def plain_resume(saved: bytes):
    state = torch.load(io.BytesIO(saved), weights_only=True)
    model, ft = plain_build()
    ft.load_state_dict(state["ft"])
    model.load_state_dict(state["model"])
    ft.optimizer.load_state_dict(state["opt"])
    ft.lr_scheduler.load_state_dict(state["sched"])
    return model, ft


@pytest.fixture(scope="module")
def plain_reference():
    model, ft = plain_build()
    saved: dict[int, bytes] = {}
    plain_epochs(model, ft, range(len(VALUES)), save=saved)
    assert ft.depth == 2 and ft.history[0].restored_best
    return {n: p.detach().clone() for n, p in model.named_parameters()}, saved


@pytest.mark.parametrize("epoch", range(len(VALUES) - 1))
def test_plain_loop_resume_from_every_epoch_is_bit_equal_with_shuffling_and_dropout(plain_reference, epoch):
    expected, saved = plain_reference
    model, ft = plain_resume(saved[epoch])
    plain_epochs(model, ft, range(epoch + 1, len(VALUES)))
    assert_equal_params(dict(model.named_parameters()), expected)


def test_plain_loop_resume_brings_back_the_loaders_own_generator(caplog):
    ids, y = data(64, 0)

    def build():
        torch.manual_seed(0)
        model = TinyLM(dropout=0.2)
        loader = DataLoader(list(zip(ids, y)), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, loader, ScheduledFinetuning(PLAIN_SCHEDULE, model, opt, patience=1, train_loader=loader)

    def epochs(model, loader, ft, first, last):
        for epoch in range(first, last):
            model.train()
            for xb, yb in loader:
                ft.optimizer.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                ft.optimizer.step()
            ft.step(epoch, metric=VALUES[epoch])

    model, loader, ft = build()
    epochs(model, loader, ft, 0, 2)
    buf = io.BytesIO()
    torch.save({"ft": ft.state_dict(), "model": model.state_dict(), "opt": ft.optimizer.state_dict()}, buf)
    assert len(torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["ft"]["rng"]["states"][0]["data"]) == 1
    epochs(model, loader, ft, 2, 5)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}

    def resumed(**kwargs):
        state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        model, loader, ft = build()
        if kwargs:
            ft = ScheduledFinetuning(PLAIN_SCHEDULE, model, torch.optim.AdamW(model.parameters(), lr=1e-2), patience=1,
                                     **kwargs)
        ft.load_state_dict(state["ft"])
        model.load_state_dict(state["model"])
        ft.optimizer.load_state_dict(state["opt"])
        epochs(model, loader, ft, 2, 5)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    assert_equal_params(resumed(), expected)
    # without train_loader its generator starts again from its seed (epoch 0's order), and a warning says so
    with caplog.at_level("WARNING", logger="phasetune"):
        control = resumed(train_loader=None)
    assert any(not torch.equal(control[n], expected[n]) for n in expected)
    assert "keep 0 random generator(s) of their own and the checkpoint saved 1" in caplog.text


def test_plain_loop_resume_without_the_random_state_differs(plain_reference, monkeypatch):
    expected, saved = plain_reference
    monkeypatch.setattr(phasetune.rng, "restore_checkpoint_state", lambda *a, **k: None)
    model, ft = plain_resume(saved[2])
    plain_epochs(model, ft, range(3, len(VALUES)))
    assert any(not torch.equal(p, expected[n]) for n, p in model.named_parameters())


def test_a_sampler_generator_of_its_own_comes_back_with_the_checkpoint(tmp_path, monkeypatch):
    expected = Losses()
    fit(tmp_path / "ref", module_cls=OwnGeneratorModule, losses=expected)
    ckpt = tmp_path / "ref" / "ckpts" / "epoch=5.ckpt"
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["FinetuningScheduler"]["rng"]["states"][0]
    assert len(saved["data"]) == 1  # the sampler's generator, as it was after epoch 5's order was drawn
    resumed = Losses()
    fit(tmp_path / "resumed", ckpt, module_cls=OwnGeneratorModule, losses=resumed)
    assert min(resumed.losses) == 25  # 4 steps an epoch: epoch 6 on
    assert resumed.losses == {k: v for k, v in expected.losses.items() if k >= 25}
    # the control: without it the resumed sampler starts from its seed and repeats epoch 0's order
    monkeypatch.setattr(phasetune.rng, "loader_generators", lambda loaders: [])
    control = Losses()
    fit(tmp_path / "control", ckpt, module_cls=OwnGeneratorModule, losses=control)
    assert control.losses[25] != expected.losses[25]


def test_loader_generators_finds_the_samplers_own_through_wrappers_and_never_the_datasets():
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from torchdata.stateful_dataloader import StatefulDataLoader

    class DataWithGenerator(torch.utils.data.TensorDataset):  # the user's augmentation generator: not the sampler's
        generator = torch.Generator()

    data = DataWithGenerator(torch.arange(8.0))
    own = torch.Generator()
    assert phasetune.rng.loader_generators(DataLoader(data, shuffle=True)) == []  # draws from torch's generator
    assert phasetune.rng.loader_generators(DataLoader(data, shuffle=True, generator=own)) == [own]
    stateful = StatefulDataLoader(data, shuffle=True)
    inner = stateful.sampler.generator
    assert phasetune.rng.loader_generators(stateful) == [inner]
    # Lightning's wrapper around it in a batch sampler, the loaders in a dict (CombinedLoader's iterables)
    batches = torch.utils.data.BatchSampler(DistributedSamplerWrapper(stateful.sampler, num_replicas=2, rank=0), 2, False)
    wrapped = DataLoader(data, batch_sampler=batches, generator=own)
    assert phasetune.rng.loader_generators({"a": wrapped, "b": wrapped}) == [own, inner]


def test_saved_generator_states_come_back_and_a_different_count_is_said():
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    saved = phasetune.rng.checkpoint_state(rank=0, world_size=1, gather=False, epoch_start=phasetune.rng.capture(gens),
                                           generators=gens)
    expected = [torch.rand(2, generator=g) for g in gens]
    assert phasetune.rng.rank_state(saved, "states", rank=0, world_size=2) is None  # another number of ranks
    state = phasetune.rng.rank_state(saved, "epoch_start", rank=0, world_size=1)
    said: list[str] = []
    phasetune.rng.restore_generators(state, gens, said.append, " from x.ckpt")
    assert all(torch.equal(torch.rand(2, generator=g), e) for g, e in zip(gens, expected)) and said == []
    phasetune.rng.restore_generators(state, gens[:1], said.append, " from x.ckpt")
    assert said == ["the training data loader's samplers keep 1 random generator(s) of their own and the checkpoint "
                    "from x.ckpt saved 2: the data order after this resume differs from an uninterrupted run's; "
                    "resume with the same data loader setup"]


def test_python_gauss_cache_and_numpy_state_come_back():
    random.seed(1)
    np.random.seed(1)
    random.gauss(0, 1)  # leaves the second value of the pair cached
    state = phasetune.rng.capture()
    expected = (random.gauss(0, 1), float(np.random.normal()), torch.rand(1))
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    phasetune.rng.restore(state)
    assert (random.gauss(0, 1), float(np.random.normal())) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


# ---------------------------------------------------------------------------------------------- plain strategy
@pytest.fixture
def one_process(monkeypatch, tmp_path):
    yield from one_process_fixture(monkeypatch, tmp_path)


def draws() -> tuple:
    return random.gauss(0, 1), float(np.random.normal()), torch.rand(3).tolist()


def test_the_plain_strategy_restores_the_gauss_cache_numpy_and_torch(one_process):
    st = FSDP2Strategy(seed=0, micro_batch_size=4, global_batch_size=4)
    try:
        with st.init_model_context():
            model = TinyLM()
        model = st.prepare_model(model)
        opt = st.create_optimizer(model)
        ft = ScheduledFinetuning(PLAIN_SCHEDULE, model, opt)
        random.gauss(0, 1)  # leaves a cached gauss value, which the checkpoint must keep
        st.save_ckpt(model, "ck", "a", finetuning=ft)
        expected = draws()
        random.seed(5)
        np.random.seed(5)
        torch.manual_seed(5)
        st.load_ckpt(model, "ck", finetuning=ScheduledFinetuning(PLAIN_SCHEDULE, model, st.create_optimizer(model)))
        assert draws() == expected
        random.seed(5)
        st.load_ckpt(model, "ck", optimizer=opt)  # without a ScheduledFinetuning: the strategy's own copy
        assert draws() == expected
    finally:
        st.teardown()  # destroys the process group the strategy created: later tests start without one


def test_optimizer_steps_run_while_a_checkpoint_is_saved_or_loaded_are_marked_as_no_training_steps(one_process):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from phasetune.sharding.optim_state import in_placeholder_step

    st = FSDP2Strategy(seed=0, micro_batch_size=4, global_batch_size=4)
    marks: list[bool] = []
    handle = register_optimizer_step_post_hook(lambda *_: marks.append(in_placeholder_step()))  # every optimizer
    try:
        model = st.prepare_model(TinyLM())
        ft = ScheduledFinetuning(PLAIN_SCHEDULE, model, st.create_optimizer(model))
        st.save_ckpt(model, "ck", "a", finetuning=ft)  # torch gives a never-stepped optimizer a fake step
        st.load_ckpt(model, "ck", finetuning=ScheduledFinetuning(PLAIN_SCHEDULE, model, st.create_optimizer(model)))
        assert marks and all(marks)  # step hooks watching training (phasetune's audit) can leave them alone
        ids, y = data(4, 0)
        st.backward(nn.functional.cross_entropy(model(ids), y), model)
        st.optimizer_step(ft.optimizer, model)
        assert marks[-1] is False
    finally:
        handle.remove()
        st.teardown()


# ---------------------------------------------------------------------------------------------- mid-epoch
def fit_with_step_checkpoints(root: Path, loader_cls, ckpt_path=None):
    class Module(RandomModule):
        def train_dataloader(self):
            return loader_cls(dataset(64, 0), batch_size=16, shuffle=True)

    pl.seed_everything(7)
    module = Module()
    fts = FinetuningScheduler(ft_schedule=SCHEDULE_3)
    steps = ModelCheckpoint(every_n_train_steps=3, save_top_k=-1, dirpath=str(root / "steps"), filename="{step}")
    t = trainer(root, [fts, FTSEarlyStopping(monitor="val_loss", patience=2), steps], max_epochs=30,
                enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(module, ckpt_path=ckpt_path)
    said = [str(w.message) for w in caught if "StatefulDataLoader" in str(w.message)]
    return {n: p.detach().clone() for n, p in module.named_parameters()}, said


@pytest.fixture(scope="module")
def stateful_reference(tmp_path_factory):
    loader = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader
    root = tmp_path_factory.mktemp("stateful")
    return root, loader, fit_with_step_checkpoints(root, loader)[0]


# 4 batches an epoch: step 6 is mid epoch 1 (phase 0), 18 mid epoch 4 (first of phase 1), 30 mid epoch 7
@pytest.mark.parametrize("step", [6, 18, 30])
def test_a_mid_epoch_resume_with_stateful_dataloader_is_bit_equal(tmp_path, stateful_reference, step):
    root, loader, expected = stateful_reference
    params, said = fit_with_step_checkpoints(tmp_path, loader, root / "steps" / f"step={step}.ckpt")
    assert_equal_params(params, expected)
    assert said == []


def test_a_mid_epoch_resume_of_a_plain_dataloader_warns_once_naming_stateful_dataloader(tmp_path):
    fit_with_step_checkpoints(tmp_path / "ref", DataLoader)
    _, said = fit_with_step_checkpoints(tmp_path, DataLoader, tmp_path / "ref" / "steps" / "step=6.ckpt")
    assert len(said) == 1 and "middle of an epoch (after 2 batches)" in said[0]
    assert "torchdata.stateful_dataloader.StatefulDataLoader" in said[0]


# ---------------------------------------------------------------------------------------------- topology
def test_the_plain_loop_refuses_another_number_of_processes_unless_asked_to_reseed(plain_reference, caplog):
    _, saved = plain_reference
    state = torch.load(io.BytesIO(saved[2]), weights_only=True)["ft"]
    state["rng"]["world_size"] = 2
    with pytest.raises(ConfigurationError, match=r"saved by 2 processes and this run has 1.*resume_rng='reseed'"):
        plain_build()[1].load_state_dict(state)
    torch.manual_seed(0)
    model = TinyLM(dropout=0.2)
    ft = ScheduledFinetuning(PLAIN_SCHEDULE, model, torch.optim.AdamW(model.parameters()), resume_rng="reseed")
    with caplog.at_level("WARNING", logger="phasetune"):
        ft.load_state_dict(state)
    assert ft.depth == 2 and "re-seeded" in caplog.text
    first = torch.rand(1)
    ft.run.restore_random_state()  # nothing left: restored once
    phasetune.rng.reseed(state["rng"], 0)
    assert torch.equal(torch.rand(1), first)  # deterministic: the same seed from the same saved state
