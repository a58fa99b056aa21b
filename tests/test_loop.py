"""ScheduledFinetuning: the schedule engine in a plain PyTorch loop (one process, no Lightning)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from torch import nn

from phasetune import ConfigurationError, RunOptions, ScheduleError
from phasetune.core.param_groups import PHASE_KEY
from phasetune.loop import ScheduledFinetuning
from plain_models import SCHEDULE, TinyLM, data

METRIC_SCHEDULE = {k: {kk: vv for kk, vv in v.items() if kk != "max_transition_epoch"} for k, v in SCHEDULE.items()}


def build(schedule=SCHEDULE, seed=0, optimizer="adamw", **kw):
    torch.manual_seed(seed)
    model = TinyLM()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    return model, ScheduledFinetuning(schedule, model, opt, sched, **kw)


def train_epoch(model, ft, seed):
    ids, y = data(32, seed)
    for i in range(0, 32, 8):
        loss = nn.functional.cross_entropy(model(ids[i:i + 8]), y[i:i + 8])
        loss.backward()
        ft.optimizer.step()
        ft.optimizer.zero_grad()
    ft.lr_scheduler.step()


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_the_model_is_frozen_to_phase_0_and_the_optimizer_fitted_to_it():
    model, ft = build()
    assert trainable(model) == {"head.weight", "head.bias"}
    held = {id(p) for g in ft.optimizer.param_groups for p in g["params"]}
    assert held == {id(model.head.weight), id(model.head.bias)}
    assert ft.depth == 0 and ft.final_depth == 2 and not ft.done


def test_schedules_are_validated_like_the_callbacks():
    with pytest.raises(ScheduleError, match="phase 1"):
        build({0: {"params": ["head.*"]}, 1: {"params": ["no_such_layer.*"]}})


def test_epoch_transitions_thaw_the_next_phase_and_add_groups_at_its_lr():
    model, ft = build()
    assert ft.step(0) is not None  # phase 0 ends at max_transition_epoch 1: epoch 0 was its last
    assert ft.depth == 1
    assert trainable(model) == set(ft.schedule.params_through(1))
    new = [g for g in ft.optimizer.param_groups if g[PHASE_KEY] == 1]
    assert {g["lr"] for g in new} == {5e-3}
    assert sum(len(g["params"]) for g in new) == 8
    assert ft.step(1) is not None and ft.depth == 2
    for epoch in range(2, 6):
        assert ft.step(epoch) is None
    assert not ft.done  # the final phase has no max_transition_epoch and no metric was passed: it runs on
    assert [(h.depth, h.start_epoch, h.end_epoch) for h in ft.history] == [(0, 0, 1), (1, 1, 2), (2, 2, None)]


def test_a_metric_that_stops_improving_ends_each_phase_and_finally_the_run():
    model, ft = build(METRIC_SCHEDULE, patience=2)
    values = [1.0, 0.9, 0.95, 0.96, 0.8, 0.85, 0.86, 0.5, 0.6, 0.7]
    transitions = {}
    for epoch, v in enumerate(values):
        if ft.step(epoch, metric=v) is not None:
            transitions[epoch] = ft.depth
        if ft.done:
            break
    assert transitions == {3: 1, 6: 2}
    assert ft.done and epoch == 9
    assert [(h.best_value, h.best_epoch) for h in ft.history] == [(0.9, 1), (0.8, 4), (0.5, 7)]
    assert ft.step(10, metric=0.1) is None  # nothing happens after the end


def test_a_metric_driven_phase_needs_the_metric():
    _, ft = build(METRIC_SCHEDULE)
    with pytest.raises(ConfigurationError, match="pass metric="):
        ft.step(0)


def test_restore_best_puts_back_the_state_of_the_phases_best_epoch_before_thawing():
    model, ft = build(METRIC_SCHEDULE, patience=1, restore_best=True)
    train_epoch(model, ft, seed=1)
    ft.step(0, metric=0.5)
    best = {n: p.detach().clone() for n, p in model.named_parameters()}
    best_state = {k: v.clone() for k, v in ft.optimizer.state[model.head.weight].items()}
    train_epoch(model, ft, seed=2)
    assert not torch.equal(model.head.weight, best["head.weight"])  # exact: it trained past the best epoch
    assert ft.step(1, metric=0.7) is not None  # worse: patience 1 ends phase 0
    assert ft.history[0].restored_best
    for n, p in model.named_parameters():  # exact, with the optimizer state: restored copies of the best epoch
        assert torch.equal(p, best[n]), n
    assert all(torch.equal(v, best_state[k]) for k, v in ft.optimizer.state[model.head.weight].items())


def test_the_restore_line_calls_an_unnamed_loop_metric_metric(caplog):
    model, ft = build(METRIC_SCHEDULE, patience=1, restore_best=True)
    train_epoch(model, ft, seed=1)
    ft.step(0, metric=0.5)
    train_epoch(model, ft, seed=2)
    with caplog.at_level("INFO", logger="phasetune"):
        ft.step(1, metric=0.7)
    text = caplog.text
    assert "restored the best state (metric=0.5 at epoch 0)" in text and "None=" not in text


def test_state_dict_resumes_the_schedule_exactly_in_a_later_phase():
    model, ft = build(METRIC_SCHEDULE, patience=1, restore_best=True, optimizer="sgd")
    values = [1.0, 0.8, 0.9, 0.7, 0.75, 0.6]
    saved = None
    for epoch, v in enumerate(values):
        train_epoch(model, ft, seed=epoch)
        ft.step(epoch, metric=v)
        if epoch == 2:  # just after the phase 0 -> 1 transition, with a snapshot-free new phase
            buf = io.BytesIO()
            torch.save({"ft": ft.state_dict(), "model": model.state_dict(), "opt": ft.optimizer.state_dict(),
                        "sched": ft.lr_scheduler.state_dict()}, buf)
            saved = buf.getvalue()
    assert ft.history[0].end_epoch == 3

    state = torch.load(io.BytesIO(saved), weights_only=True)
    model2, ft2 = build(METRIC_SCHEDULE, patience=1, restore_best=True, optimizer="sgd", seed=99)
    ft2.load_state_dict(state["ft"])
    model2.load_state_dict(state["model"])
    ft2.optimizer.load_state_dict(state["opt"])
    ft2.lr_scheduler.load_state_dict(state["sched"])
    assert ft2.depth == 1 and trainable(model2) == trainable(model) - set(ft.schedule[2].params)
    for epoch, v in list(enumerate(values))[3:]:
        train_epoch(model2, ft2, seed=epoch)
        ft2.step(epoch, metric=v)
    assert ft2.depth == ft.depth and [h.end_epoch for h in ft2.history] == [h.end_epoch for h in ft.history]
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n  # exact: resume against the uninterrupted run


def test_loading_state_of_another_schedule_is_refused_with_the_differences():
    _, ft = build()
    state = ft.state_dict()
    _, other = build({0: {"params": ["head.*", r"layers\.3\..*"]}, 1: {"params": [r"layers\.[012]\..*", "embed.*"]}})
    with pytest.raises(ConfigurationError, match="phase 0 trains different parameters"):
        other.load_state_dict(state)


def test_phase_groups_are_split_so_each_holds_one_dtype():
    torch.manual_seed(0)
    model = TinyLM()
    model.layers[0].to(torch.float64)  # a block of another dtype, thawed in phase 2
    opt = torch.optim.AdamW([{"params": [model.head.weight], "weight_decay": 0.01},  # over phase 0 only
                             {"params": [model.head.bias], "weight_decay": 0.0}], lr=1e-2)
    ft = ScheduledFinetuning(SCHEDULE, model, opt)
    ft.step(0)
    ft.step(1)
    for i, g in enumerate(ft.optimizer.param_groups):
        assert len({p.dtype for p in g["params"]}) <= 1, f"group {i} mixes dtypes"
    assert {p.dtype for g in ft.optimizer.param_groups for p in g["params"]} == {torch.float32, torch.float64}
    phase2 = [g for g in ft.optimizer.param_groups if g[PHASE_KEY] == 2]
    assert [g["weight_decay"] for g in phase2] == [0.01, 0.01]  # hyperparameters of the template group


def test_importing_the_plain_pytorch_modules_does_not_import_lightning():
    code = ("import sys, phasetune, phasetune.loop, phasetune.loop.strategy, phasetune.sharding; "
            "from phasetune import FSDP2Strategy, ScheduledFinetuning; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schedules_name_parameters_without_the_segments_wrappers_insert():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    model = TinyLM()
    model.layers[0] = checkpoint_wrapper(model.layers[0])  # activation checkpointing renames its parameters
    ft = ScheduledFinetuning(SCHEDULE, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert "layers.0.lin.weight" in ft.schedule[2].params
    implicit = ScheduledFinetuning(None, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert "layers.0.lin.weight" in implicit.schedule.params_through(implicit.final_depth)


def test_the_shared_options_come_as_one_runoptions_or_as_keywords_and_a_misspelt_one_is_named():
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ft = ScheduledFinetuning(SCHEDULE, model, opt, options=RunOptions(restore_best=False), max_depth=1)
    assert (ft.run.options.restore_best, ft.run.options.max_depth) == (False, 1)  # the keyword overrides options
    with pytest.raises(ConfigurationError, match="unknown ScheduledFinetuning argument 'patiense'; did you mean "
                                                 "'patience'"):
        ScheduledFinetuning(SCHEDULE, TinyLM(), opt, patiense=2)
    with pytest.raises(ConfigurationError, match=r"options=\.\.\.\) takes a phasetune.RunOptions, got dict"):
        ScheduledFinetuning(SCHEDULE, TinyLM(), opt, options={"restore_best": False})


def test_bad_arguments_are_reported_together_before_anything_changes():
    model = TinyLM()
    with pytest.raises(ConfigurationError) as e:
        ScheduledFinetuning(SCHEDULE, model, torch.optim.SGD(model.parameters(), lr=0.1), max_depth=-2,
                            mode="maximum", patience=0)
    assert len(e.value.problems) == 3
    assert all(p.requires_grad for p in model.parameters())
