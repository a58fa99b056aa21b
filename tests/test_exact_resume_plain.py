"""Exact resume in plain PyTorch, with randomness: the ScheduledFinetuning loop over a shuffled DataLoader (its own
generator too, given as ``train_loader``) and Dropout ends bit-equal resumed from every epoch, and not without the
random state; the plain strategy's checkpoint brings back Python's gauss cache, NumPy's and torch's generators. A
state saved by another number of processes is refused, or re-seeded when asked.
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import phasetune.features.random_state
from helpers import assert_bit_equal
from phasetune import ConfigurationError, FSDP2Strategy, ScheduledFinetuning
from plain_models import SCHEDULE as PLAIN_SCHEDULE
from plain_models import TinyLM, data

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
    assert_bit_equal(dict(model.named_parameters()), expected)  # exact: resume against the uninterrupted run


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

    assert_bit_equal(resumed(), expected)  # exact: resume against the uninterrupted run
    # without train_loader its generator starts again from its seed (epoch 0's order), and a warning says so
    with caplog.at_level("WARNING", logger="phasetune"):
        control = resumed(train_loader=None)
    assert any(not torch.equal(control[n], expected[n]) for n in expected)  # exact: the control differs
    assert "keep 0 random generator(s) of their own and the checkpoint saved 1" in caplog.text


def test_plain_loop_resume_without_the_random_state_differs(plain_reference, monkeypatch):
    expected, saved = plain_reference
    monkeypatch.setattr(phasetune.features.random_state, "restore_checkpoint_state", lambda *a, **k: None)
    model, ft = plain_resume(saved[2])
    plain_epochs(model, ft, range(3, len(VALUES)))
    assert any(not torch.equal(p, expected[n]) for n, p in model.named_parameters())  # exact: the control differs


# ---------------------------------------------------------------------------------------------- plain strategy
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
        assert draws() == expected  # exact: the same generator states draw the same numbers
        random.seed(5)
        st.load_ckpt(model, "ck", optimizer=opt)  # without a ScheduledFinetuning: the strategy's own copy
        assert draws() == expected  # exact: the same generator states draw the same numbers
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
    phasetune.features.random_state.reseed(state["rng"], 0)
    assert torch.equal(torch.rand(1), first)  # exact, deterministic: the same seed from the same saved state
