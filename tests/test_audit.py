"""The thaw audit: each phase took effect, or the failure names the parameters and the probable cause.

A fault matrix on one process (a plain loop around PhaseEngine, and ScheduledFinetuning for resumes), then DDP,
FSDP1 and FSDP2 on 2 processes (one torchrun launch shared by the tests at the end).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phasetune import PhaseEngine, resolve_schedule
from phasetune.features.audit.phase_audit import AuditError, AuditOptions, PhaseAudit, group_names
from phasetune.loop import ScheduledFinetuning
from plain_models import SCHEDULE, TinyLM, data

# TinyLM: embed (1 tensor), 4 blocks of 4 tensors, head (2): phase 1 thaws layers.2-3 (8 tensors)
PHASE1_NEW, PHASE1_TRAINABLE, PHASE1_FROZEN = 8, 10, 9


class Loop:
    """A plain training loop around PhaseEngine with the audit armed at the start and at each transition."""

    def __init__(self, lr: float = 0.1, options: AuditOptions | None = None, scheduler=None, **engine_kw) -> None:
        torch.manual_seed(0)
        self.model = TinyLM()
        params = dict(self.model.named_parameters())
        self.engine = PhaseEngine(resolve_schedule(SCHEDULE, {n: tuple(p.shape) for n, p in params.items()}),
                                  params, **engine_kw)
        self.engine.start()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.engine.prepare_optimizer(self.optimizer)
        self.schedulers: list = [scheduler(self.optimizer)] if scheduler else []
        self.infos: list[str] = []
        self.warnings: list[str] = []
        self.audit = PhaseAudit(self.engine, options=options, info=self.infos.append, warn=self.warnings.append)
        self.audit.check_phase(self.optimizer, self.schedulers, stage="start")
        self.ids, self.labels = data(16)
        self.set_to_none = True

    def step(self) -> None:
        loss = F.cross_entropy(self.model(self.ids), self.labels)
        self.optimizer.zero_grad(set_to_none=self.set_to_none)
        loss.backward()
        self.optimizer.step()
        for s in self.schedulers:
            s.step()

    def advance(self, audit: bool = True):
        t = self.engine.advance(self.optimizer, self.schedulers)
        self.optimizer = t.optimizer
        if audit:
            self.audit.check_phase(self.optimizer, self.schedulers, thawed=t.thawed)
        return t


def phase1(**kw) -> Loop:
    loop = Loop(**kw)
    loop.step()
    return loop


# ------------------------------------------------------------------------------------------------ passing


def test_a_phase_that_took_effect_passes_with_counts_and_one_line():
    loop = phase1()
    loop.advance()
    assert loop.audit.pending
    loop.step()
    result = loop.audit.results[-1]
    assert result.passed and (result.depth, result.stage) == (1, "first step")
    assert (result.newly_thawed, result.checked, result.groups, result.frozen_checked) == (
        PHASE1_NEW, PHASE1_TRAINABLE, 2, PHASE1_FROZEN)
    assert loop.infos[-1] == "audit phase 1: 8 tensors thawed, all trained; 2 groups at the scheduled lrs; 9 frozen unchanged"
    assert not loop.audit.pending  # ordinary steps run without hooks


def test_the_audit_looks_once_per_phase_and_not_on_ordinary_steps():
    loop = phase1()
    loop.advance()
    loop.step()
    for p in loop.model.layers[3].parameters():  # a fault after the first step goes unseen: no per-step work
        p.requires_grad_(False)
    loop.step()
    assert len(loop.audit.results) == 2 and all(r.passed for r in loop.audit.results)


def test_an_lr_of_zero_the_optimizer_was_given_is_reported_not_failed():
    loop = Loop(lr=0.0)
    loop.step()
    result = loop.audit.results[-1]
    assert result.passed
    assert any("lr 0 as configured" in n for n in result.notes)
    assert "note: group 0 (phase 0" in loop.infos[-1]


def test_a_warmup_from_lr_zero_at_the_start_of_training_is_reported_not_failed():
    loop = Loop(scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / 10))
    loop.step()
    result = loop.audit.results[-1]
    assert result.passed and any("at lr 0, their lr scheduler's value" in n for n in result.notes)


def test_a_sequential_scheduler_extended_by_a_transition_does_not_fail_the_lr_check():
    def sequential(opt):
        return torch.optim.lr_scheduler.SequentialLR(opt, [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2),
            torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)], milestones=[2])

    loop = Loop(scheduler=sequential)
    loop.step()
    loop.advance()
    for _ in range(3):  # past the milestone: phase 1's lr decays away from the phase's lr
        loop.step()
    loop.advance()  # phase 2: its group is added to the SequentialLR and the schedulers inside it
    loop.step()
    assert [r.passed for r in loop.audit.results] == [True, True, True], loop.audit.results[-1].message()


def test_a_checkpoints_state_creating_step_is_not_taken_for_the_phases_first_step():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    loop = phase1()
    loop.advance()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.optimizer.state.clear()  # as an optimizer that has not stepped yet (a phase's new_optimizer)
    # a checkpoint saved right after the transition: DCP steps a stateless optimizer once, at lr 0 over zero grads
    get_optimizer_state_dict(loop.model, loop.optimizer)
    assert loop.audit.pending and len(loop.audit.results) == 1
    loop.step()
    assert loop.audit.results[-1].passed and loop.audit.results[-1].depth == 1


def test_group_names_give_phase_and_block():
    loop = phase1()
    loop.advance()
    assert group_names(loop.optimizer, loop.engine) == ["phase0/head", "phase1/layers.2-3"]
    loop = phase1(no_decay=["bias"])  # each phase's groups split into decayed and weight-decay-free twins
    loop.advance()
    assert group_names(loop.optimizer, loop.engine) == ["phase0/head", "phase1/layers.2-3",
                                                        "phase1/layers.2-3/no_decay"]


# ------------------------------------------------------------------------------------------------ fault matrix


def test_a_layer_refrozen_after_the_thaw_is_named():
    loop = phase1()
    loop.advance()
    for p in loop.model.layers[3].parameters():  # a user hook freezing a layer again after the transition
        p.requires_grad_(False)
    with pytest.raises(AuditError) as err:
        loop.step()
    assert [f.cause for f in err.value.result.findings] == ["refrozen"]
    assert err.value.result.findings[0].params == [f"layers.3.{n}" for n in ("norm.weight", "norm.bias", "lin.weight",
                                                                               "lin.bias")]
    assert "re-frozen after the thaw: 'layers.3.norm.weight'" in str(err.value)
    assert "BaseFinetuning" in str(err.value)


def test_a_phase_missing_from_the_optimizer_fails_at_the_transition():
    loop = phase1()
    t = loop.engine.advance(loop.optimizer)
    loop.optimizer.param_groups.pop()  # the phase's group dropped (e.g. an optimizer rebuilt or resumed without it)
    with pytest.raises(AuditError) as err:
        loop.audit.check_phase(loop.optimizer, thawed=t.thawed)
    assert err.value.result.stage == "transition"
    assert err.value.result.findings[0].cause == "missing"
    assert len(err.value.result.findings[0].params) == PHASE1_NEW
    assert "missing from the optimizer: 'layers.2.norm.weight'" in str(err.value)


def test_a_parameter_in_two_groups_fails():
    loop = phase1()
    loop.engine.advance(loop.optimizer)
    loop.optimizer.param_groups[1]["params"].append(loop.model.head.weight)  # a user group repeating it
    with pytest.raises(AuditError) as err:
        loop.audit.check_phase(loop.optimizer)
    assert [(f.cause, f.params) for f in err.value.result.findings] == [("duplicate", ["head.weight"])]


def test_an_lr_of_zero_set_by_a_scheduler_on_the_new_group_fails():
    loop = phase1()
    t = loop.engine.advance(loop.optimizer)
    loop.schedulers = [torch.optim.lr_scheduler.LambdaLR(loop.optimizer, [lambda s: 1.0, lambda s: 0.0])]
    loop.audit.check_phase(loop.optimizer, loop.schedulers, thawed=t.thawed)
    with pytest.raises(AuditError) as err:
        loop.step()
    assert [f.cause for f in err.value.result.findings] == ["lr_zero"]
    assert len(err.value.result.findings[0].params) == PHASE1_NEW


def test_a_scheduled_lr_of_zero_is_reported_with_zero_lr_report():
    loop = phase1(options=AuditOptions(zero_lr="report"))
    t = loop.engine.advance(loop.optimizer)
    loop.schedulers = [torch.optim.lr_scheduler.LambdaLR(loop.optimizer, [lambda s: 1.0, lambda s: 0.0])]
    loop.audit.check_phase(loop.optimizer, loop.schedulers, thawed=t.thawed)
    loop.step()
    assert loop.audit.results[-1].passed
    assert any("lr 0" in n for n in loop.audit.results[-1].notes)


def test_an_lr_overwritten_after_the_schedule_set_it_fails():
    loop = phase1()
    loop.advance()
    loop.optimizer.param_groups[1]["lr"] = 1.0  # a callback setting its own lr
    with pytest.raises(AuditError) as err:
        loop.step()
    assert [f.cause for f in err.value.result.findings] == ["lr_mismatch"]


def test_a_hook_that_zeroes_a_gradient_is_named_as_no_gradient():
    loop = phase1()
    loop.advance()
    loop.model.layers[2].lin.weight.register_hook(torch.zeros_like)
    with pytest.raises(AuditError) as err:
        loop.step()
    assert [(f.cause, f.params) for f in err.value.result.findings] == [("no_gradient", ["layers.2.lin.weight"])]


def test_a_frozen_parameter_that_changed_fails():
    loop = phase1()
    loop.advance()
    w = loop.model.layers[0].lin.weight  # phase 2's: frozen now, but in a user group with weight decay
    w.grad = torch.zeros_like(w)  # a leftover gradient that zero_grad(set_to_none=False) keeps
    loop.set_to_none = False
    loop.optimizer.add_param_group({"params": [w], "lr": 0.1, "weight_decay": 0.5})
    with pytest.raises(AuditError) as err:
        loop.step()
    assert [(f.cause, f.params) for f in err.value.result.findings] == [("frozen_changed", ["layers.0.lin.weight"])]


def test_an_optimizer_rebuilt_after_the_transition_is_reported_by_check_stepped():
    loop = phase1()
    loop.advance()
    loop.optimizer = torch.optim.SGD([p for p in loop.model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        loop.step()
    loop.audit.check_stepped(3)
    assert "has not stepped in 3 optimizer steps of phase 1" in loop.warnings[-1]


def test_a_post_step_hook_registered_after_the_audit_keeps_working():
    loop = phase1()
    loop.advance()
    seen = []
    loop.optimizer.register_step_post_hook(lambda *a: seen.append(1))  # follows the audit's own post-step hook
    loop.step()  # the audit cannot remove its hook while torch iterates them: it goes inert until dropped
    loop.step()
    assert seen == [1, 1] and loop.audit.results[-1].passed and not loop.audit.pending
    loop.audit.drop_spent_hooks()
    assert len(loop.optimizer._optimizer_step_post_hooks) == 1  # only the user's hook is left


def test_every_result_reaches_on_result():
    loop = phase1()
    seen = []
    loop.audit.on_result = seen.append
    loop.advance()
    loop.step()
    assert [(r.depth, r.stage, r.passed) for r in seen] == [(1, "transition", True), (1, "first step", True)]


def test_on_failure_warn_warns_and_training_goes_on():
    loop = phase1(options=AuditOptions(on_failure="warn"))
    loop.advance()
    for p in loop.model.layers[3].parameters():
        p.requires_grad_(False)
    loop.step()
    assert not loop.audit.results[-1].passed
    assert "re-frozen after the thaw" in loop.warnings[-1]
    assert loop.audit.results[-1].record()["failures"]["refrozen"][0] == "layers.3.norm.weight"


# ------------------------------------------------------------------------------------------------ resumed


def resumed_loop() -> tuple[ScheduledFinetuning, PhaseAudit, tuple]:
    torch.manual_seed(0)
    model = TinyLM()
    ft = ScheduledFinetuning(SCHEDULE, model, torch.optim.SGD(model.parameters(), lr=0.1), restore_best=False,
                             audit="off")  # these tests audit with a PhaseAudit of their own
    ids, labels = data(16)
    F.cross_entropy(model(ids), labels).backward()
    ft.optimizer.step()
    assert ft.step(0) is not None  # phase 1 from epoch 1
    state = ft.state_dict()
    torch.manual_seed(1)
    fresh = TinyLM()
    fresh.load_state_dict(model.state_dict())
    ft2 = ScheduledFinetuning(SCHEDULE, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), restore_best=False,
                              audit="off")
    ft2.load_state_dict(state)
    audit = PhaseAudit(ft2.engine)
    return ft2, audit, (ids, labels)


def train_step(ft: ScheduledFinetuning, batch: tuple) -> None:
    ft.optimizer.zero_grad()
    F.cross_entropy(ft.model(batch[0]), batch[1]).backward()
    ft.optimizer.step()


def test_a_resumed_run_is_audited_after_loading_its_state():
    ft, audit, batch = resumed_loop()
    result = audit.check_phase(ft.optimizer, ft.schedulers, stage="resume")
    assert result.passed and (result.depth, result.checked) == (1, PHASE1_TRAINABLE)
    train_step(ft, batch)
    after = audit.results[-1]
    assert after.passed and after.stage == "first step after the resume"
    assert after.newly_thawed == PHASE1_TRAINABLE  # every trainable tensor is checked after a resume


def test_a_layer_refrozen_after_a_resume_is_named():
    ft, audit, batch = resumed_loop()
    audit.check_phase(ft.optimizer, ft.schedulers, stage="resume")
    ft.model.layers[2].lin.weight.requires_grad_(False)
    with pytest.raises(AuditError) as err:
        train_step(ft, batch)
    assert "re-frozen after the thaw: 'layers.2.lin.weight'" in str(err.value)


# ------------------------------------------------------------------------------------------------ 2 processes


@pytest.fixture(scope="module")
def distributed(audit_ranks) -> list[dict]:
    return audit_ranks  # the one launch of tests/distributed/audit_scenarios.py (conftest.py; test_compile.py reads it too)


def test_ddp_built_before_the_thaw_is_detected_as_not_in_the_reducer(distributed):
    for rank in distributed:
        assert rank["ddp_ok"] == {"transition": True, "first_step": True}
        assert rank["ddp_late"]["causes"] == ["not_in_reducer"]
        assert rank["ddp_late"]["params"] == ["1.weight", "1.bias"]


def test_ddp_gradients_that_differ_across_ranks_are_detected_after_the_first_step(distributed):
    for rank in distributed:
        assert rank["ddp_other"] == {"causes": ["not_synchronised"], "params": ["1.weight", "1.bias"],
                                     "stage": "first step"}


def test_ddp_reducer_missing_a_resumed_phase_is_detected(distributed):
    for rank in distributed:
        assert rank["ddp_late_resume"]["causes"] == ["not_in_reducer"]


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_sharded_phases_pass_and_a_refrozen_layer_is_named(distributed, kind):
    for rank in distributed:
        assert rank[f"{kind}_ok"] == {"transition": True, "first_step": True, "newly_thawed": 2}, rank[f"{kind}_ok"]
        assert rank[f"{kind}_refrozen"]["causes"] == ["refrozen"]
        assert rank[f"{kind}_refrozen"]["params"] == ["1.weight"]


@pytest.mark.parametrize("kind", ["fsdp1", "fsdp2"])
def test_resumed_sharded_phases_pass_and_a_refrozen_layer_is_named(distributed, kind):
    for rank in distributed:
        # after a resume every trainable tensor (phases 0 and 1: 4) is checked after the first step
        assert rank[f"{kind}_resumed"] == {"resume": True, "first_step": True, "newly_thawed": 4}
        assert rank[f"{kind}_resumed_refrozen"] == {"causes": ["refrozen"], "params": ["2.bias"], "stage":
                                                    "first step after the resume"}
