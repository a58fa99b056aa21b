"""Phase lengths in optimizer steps (max_transition_step): validation, the per-step hook of the run core,
step watches, the front ends, and resuming at and between step transitions."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import ToyModule, dataset, float32_drift, trainer
from launch import launch
from loop_runs import RESTARTS, STEP_VAL_LOSSES, STEPS, step_loop_run, trajectory_point
from phasetune import FinetuningScheduler, FTSEarlyStopping, ScheduleError
from phasetune.core.engine import PhaseEngine
from phasetune.core.schedule import resolve_schedule
from phasetune.loop import ScheduledFinetuning
from phasetune.run.step_events import StepEvents

NAMES = ["model.head.weight", "model.head.bias", "model.embed.weight"]


def rounded_lrs(expected):
    """Numerical: lrs that trajectory_point rounded to 12 decimals (within 5e-13) against decimal literals."""
    return pytest.approx(expected, abs=1e-12)


def problems(raw, epoch_only=False):
    with pytest.raises(ScheduleError) as e:
        resolve_schedule(raw, NAMES, epoch_transitions_only=epoch_only)
    return e.value.problems


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("value, expected", [
    ("5", "'max_transition_step': '5' is not an integer >= -1"),
    (True, "'max_transition_step': True is not an integer >= -1"),
    (-2, "'max_transition_step': -2 is not an integer >= -1"),
    (0, "'max_transition_step': 0 would end the phase before it trains"),
])
def test_a_bad_max_transition_step_names_phase_and_key(value, expected):
    found = problems({0: {"params": ["model.head.*"], "max_transition_step": value}})
    assert len(found) == 1 and found[0].startswith("phase 0, key") and expected in found[0], found


def test_max_transition_steps_are_absolute_and_must_increase_across_the_phases_that_set_them():
    found = problems({0: {"params": ["model.head.*"], "max_transition_step": 40},
                      1: {"params": ["model.embed.*"], "max_transition_epoch": 2},
                      2: {"params": ["model.head.bias"], "max_transition_step": 40}})
    assert found == ["phase 2, key 'params': parameter 'model.head.bias' (matched by 'model.head.bias') already in "
                     "phase 0 (matched by 'model.head.*'); a parameter may belong to one phase only",
                     "phase 2, key 'max_transition_step': 40 is not after phase 0's 40; optimizer step counts are "
                     "absolute (since the start of the fit), so each capped phase must end later than the last"]


def test_a_phase_may_set_both_caps_and_a_step_cap_is_a_fixed_length_for_epoch_transitions_only():
    raw = {0: {"params": ["model.head.*"], "max_transition_epoch": 3, "max_transition_step": 50},
           1: {"params": ["model.embed.*"], "max_transition_step": 90}}
    s = resolve_schedule(raw, NAMES, epoch_transitions_only=True)
    assert [(p.max_transition_epoch, p.max_transition_step) for p in s] == [(3, 50), (-1, 90)]
    assert s.to_dict(resolved=False)[0] == {"params": ["model.head.*"], "max_transition_epoch": 3,
                                            "max_transition_step": 50}
    assert s.fingerprint()["phases"][1]["max_transition_step"] == 90


# ---------------------------------------------------------------------------------------------- the loop


def test_a_step_cap_ends_the_phase_between_two_optimizer_steps(caplog):
    caplog.set_level(logging.INFO, logger="phasetune")
    _, ft, trajectory, _ = step_loop_run()
    depths = [len({g[0] for g in groups}) - 1 for _, groups in trajectory]
    assert depths == [0] * 6 + [1] * 5 + [2] * 5  # steps 1-6 phase 0, 7-11 phase 1, 12-16 phase 2
    rows = [(r.depth, r.start_epoch, r.start_step, r.end_epoch, r.end_step, r.end_reason) for r in ft.history]
    assert rows[:2] == [(0, 0, 0, 1, 6, "max_transition_step reached"), (1, 1, 6, 2, 11, "max_transition_step reached")]
    assert rows[2][:3] == (2, 2, 11)
    lines = [r.getMessage() for r in caplog.records if "phase 0 -> 1" in r.getMessage()]
    assert "at step 6 (epoch 1) (max_transition_step reached)" in lines[0]
    # restore-best took the best state of the phase's last validation (epoch 0's, after step 4)
    assert ft.history[0].restored_best and ft.history[1].restored_best


def test_each_phase_restarts_its_warmup_from_the_lr_the_schedule_gives_its_groups():
    _, _, trajectory, _ = step_loop_run()
    lrs = [{g[0]: g[2] for g in groups} for _, groups in trajectory]
    # phase 1: warm-up of 1 step then linear decay over 5, for the head (created at 0.1) and phase 1 (0.05)
    # numerical, the lrs of this module: trajectory_point rounds them to 12 decimals (rounded_lrs)
    assert [d[1] for d in lrs[6:11]] == rounded_lrs([0.025, 0.05, 0.0375, 0.025, 0.0125])
    assert [d[0] for d in lrs[6:11]] == rounded_lrs([0.05, 0.1, 0.075, 0.05, 0.025])
    # phase 2 restarts every group's shape at its creation lr, not at the decayed one
    assert [lrs[11][k] for k in (0, 1, 2)] == rounded_lrs([0.05, 0.025, 0.01])
    assert [lrs[12][k] for k in (0, 1, 2)] == rounded_lrs([0.1, 0.05, 0.02])


def test_step_watches_fire_once_after_the_first_step_of_every_phase_and_nothing_runs_in_between(monkeypatch):
    calls = {"due": 0, "advance": 0}
    due, advance = StepEvents.due, PhaseEngine.advance

    def counting_due(self, step):
        calls["due"] += 1
        return due(self, step)

    def counting_advance(self, *a, **k):
        calls["advance"] += 1
        return advance(self, *a, **k)

    monkeypatch.setattr(StepEvents, "due", counting_due)
    monkeypatch.setattr(PhaseEngine, "advance", counting_advance)
    seen = []
    step_loop_run(watch=lambda run, step: seen.append((run.depth, step, run.history[-1].start_step)))
    assert seen == [(0, 1, 0), (1, 7, 6), (2, 12, 11)]
    # 16 steps: the watch steps (1, 7, 12) and the caps (6, 11) did work; the 11 others one compare each
    assert calls == {"due": 5, "advance": 2}


def test_the_final_phases_step_cap_does_not_end_the_run():
    schedule = {0: {"params": ["model.head.*"], "max_transition_step": 3},
                1: {"params": ["model.embed.*"], "max_transition_step": 5}}
    _, ft, trajectory, _ = step_loop_run(schedule, steps=8)
    assert not ft.done and len(trajectory) == 8 and ft.depth == 1 and ft.history[-1].end_step is None


@pytest.mark.parametrize("save_at", [6, 9])  # right at phase 0's cap (after its transition), and mid phase 1
def test_a_loop_resumed_at_or_between_step_transitions_ends_bit_equal(save_at):
    module, ft, trajectory, saved = step_loop_run(save_at=save_at)
    module2, ft2, trajectory2, _ = step_loop_run(resume=saved)
    assert trajectory2 == trajectory[save_at:]
    assert [(r.start_step, r.end_step) for r in ft2.history] == [(r.start_step, r.end_step) for r in ft.history]
    for (n, a), b in zip(module.named_parameters(), module2.parameters()):
        assert torch.equal(a, b), n  # exact: resume against the uninterrupted run


def test_a_state_saved_at_a_step_cap_before_its_transition_transitions_on_resume():
    """A checkpoint of a run whose step count reached the cap but whose transition had not happened yet (the
    front end saved before reporting the step): the resumed run transitions before its first step."""
    _, ft, _, _ = step_loop_run(steps=6)
    assert ft.depth == 1
    module, ft_ref, trajectory, _ = step_loop_run()
    _, early, _, _ = step_loop_run(steps=5)
    early.global_step = 6  # as if step 6 had been taken and the state saved before step_end saw it
    state = early.state_dict()
    module2 = ToyModule(lr=0.1)
    ft2 = ScheduledFinetuning(STEPS, module2, torch.optim.SGD(module2.parameters(), lr=0.1, momentum=0.9))
    ft2.load_state_dict(state)
    assert ft2.depth == 1 and ft2.history[0].end_step == 6 and ft2.history[1].start_step == 6


# ---------------------------------------------------------------------------------------------- Lightning


class StatefulToy(ToyModule):
    def train_dataloader(self):
        loader = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader
        return loader(dataset(64, 0), batch_size=self.batch_size, shuffle=False)


class SaveBeforeTheScheduler(pl.Callback):
    """Saves at one step in on_train_batch_end, placed before FinetuningScheduler: its step transition is pending."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.path.exists():
            trainer.save_checkpoint(self.path)


def lightning_fit(root: Path, ckpt_path=None, watch=None, **kw):
    torch.manual_seed(0)
    module = StatefulToy(val_losses=STEP_VAL_LOSSES, lr=0.1)
    fts = FinetuningScheduler(ft_schedule=STEPS)
    steps = ModelCheckpoint(every_n_train_steps=1, save_top_k=-1, dirpath=str(root / "steps"), filename="{step}")
    callbacks = [SaveBeforeTheScheduler(6, root / "pending.ckpt"), fts,
                 FTSEarlyStopping(monitor="val_loss", patience=2), steps]
    t = trainer(root, callbacks, max_epochs=4, enable_checkpointing=True, **kw)
    if watch is not None:
        original = fts.on_fit_start

        def with_watch(trainer, pl_module):
            original(trainer, pl_module)
            fts.run.add_step_watch(watch)

        fts.on_fit_start = with_watch
    t.fit(module, ckpt_path=ckpt_path)
    return module, fts


@pytest.fixture(scope="module")
def lightning_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("steps_pl")
    return root, *lightning_fit(root)


@pytest.mark.numerical
def test_lightning_runs_the_step_capped_schedule_like_the_loop(lightning_reference):
    _, module, fts = lightning_reference
    loop_module, ft, _, _ = step_loop_run()
    rows = [[(r.depth, r.start_epoch, r.start_step, r.end_step, r.end_reason, r.restored_best) for r in h[:2]]
            for h in (fts.history, ft.history)]
    assert rows[0] == rows[1]
    reference = dict(loop_module.named_parameters())
    for n, p in module.named_parameters():
        # numerical: two front ends, the same losses and steps through other code (Lightning's closure and loops)
        # that may order a sum otherwise; 16 steps, sums of 16 terms (width, batch), weights below 1
        torch.testing.assert_close(p, reference[n], rtol=0, atol=float32_drift(16, 16), msg=n)


@pytest.mark.parametrize("checkpoint", ["steps/step=6.ckpt", "steps/step=9.ckpt", "pending.ckpt"])
def test_lightning_resumed_at_or_between_step_transitions_ends_bit_equal(lightning_reference, tmp_path, checkpoint):
    root, expected, fts = lightning_reference
    if checkpoint == "pending.ckpt":  # saved at phase 0's cap, before the transition: it happens on resume
        saved = torch.load(root / checkpoint, weights_only=False)
        assert saved["global_step"] == 6 and saved["callbacks"]["FinetuningScheduler"]["depth"] == 0
    module, resumed = lightning_fit(tmp_path, ckpt_path=root / checkpoint)
    assert [(r.start_step, r.end_step) for r in resumed.history] == [(r.start_step, r.end_step) for r in fts.history]
    for (n, a), b in zip(expected.named_parameters(), module.parameters()):
        assert torch.equal(a, b), n  # exact: resume against the uninterrupted run


def test_under_gradient_accumulation_step_events_happen_once_per_optimizer_step(tmp_path, monkeypatch):
    calls = {"due": 0}
    due = StepEvents.due

    def counting_due(self, step):
        calls["due"] += 1
        return due(self, step)

    monkeypatch.setattr(StepEvents, "due", counting_due)
    seen = []
    schedule = {0: {"params": ["model.head.*"], "max_transition_step": 3},
                1: {"params": [r"model\.layers\.3\..*"], "lr": 0.05, "max_transition_step": 5},
                2: {"params": ["model.embed.*"], "lr": 0.02}}
    torch.manual_seed(0)
    fts = FinetuningScheduler(ft_schedule=schedule, restore_best=False)
    t = trainer(tmp_path, [fts, FTSEarlyStopping(monitor="val_loss", patience=9)], max_epochs=4,
                accumulate_grad_batches=2, enable_checkpointing=False)
    original = fts.on_fit_start

    def with_watch(trainer, pl_module):
        original(trainer, pl_module)
        fts.run.add_step_watch(lambda run, step: seen.append((run.depth, step)))

    fts.on_fit_start = with_watch
    t.fit(ToyModule(val_losses=STEP_VAL_LOSSES, lr=0.1))
    assert t.global_step == 8  # 16 batches, 2 per optimizer step
    assert [(r.start_step, r.end_step) for r in fts.history[:2]] == [(0, 3), (3, 5)]
    assert seen == [(0, 1), (1, 4), (2, 6)]
    assert calls["due"] == 5  # steps 1, 3, 4, 5, 6; the other 11 batch ends compared one integer


# ---------------------------------------------------------------------------------------------- lr restarts

def lrs_by_phase(trajectory):
    return [tuple(g[2] for g in groups) for _, groups in trajectory]


def test_phase_0_may_bring_its_own_lr_scheduler_and_a_new_optimizer_restarts_groups_at_their_creation_lr():
    _, ft, trajectory, _ = step_loop_run(RESTARTS, steps=12, restore_best=False)
    lrs = lrs_by_phase(trajectory)
    third = rounded_lrs
    assert lrs[:4] == [third((0.05,)), third((0.1,)), third((0.1 * 2 / 3,)), third((0.1 / 3,))]  # phase 0's shape
    assert lrs[4:6] == [third((0.05, 0.025)), third((0.1, 0.05))]
    # phase 2 builds a new optimizer: the earlier groups restart from the lr they were created with, not from the
    # lr their decay had reached (0), which would have frozen them for the rest of the run
    assert lrs[8:10] == [third((0.05, 0.025, 0.01)), third((0.1, 0.05, 0.02))]


def test_lightning_installs_phase_0s_lr_scheduler_and_matches_the_loop(tmp_path):
    rec = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rec.append(trajectory_point(pl_module, trainer.optimizers[0]))

    torch.manual_seed(0)
    t = trainer(tmp_path, [FinetuningScheduler(ft_schedule=RESTARTS, restore_best=False), Record()], max_epochs=3,
                enable_checkpointing=False)
    t.fit(ToyModule(val_losses=STEP_VAL_LOSSES, lr=0.1))
    assert rec == step_loop_run(RESTARTS, steps=12, restore_best=False)[2]


# ---------------------------------------------------------------------------------------------- DDP


@pytest.mark.numerical
@pytest.mark.launched
def test_ddp_ranks_run_the_step_capped_schedule_like_one_process_and_resume_mid_phase_bit_equal(tmp_path):
    ranks = launch("step_scenarios.py", tmp_path)
    loop_module, ft, _, _ = step_loop_run()
    expected = [[r.depth, r.start_epoch, r.start_step, r.end_step, r.end_reason, r.restored_best]
                for r in ft.history[:2]]
    for report in ranks:
        assert report["run"]["global_step"] == 16 and report["run"]["phases"][:2] == expected
        assert report["resumed"]["phases"] == report["run"]["phases"]  # phase 1 still ended at its step cap
        assert report["resumed"]["params"] == report["run"]["params"]  # exact: resume against the uninterrupted run
    assert ranks[0]["run"]["params"] == ranks[1]["run"]["params"]  # exact: rank against rank
    for n, p in loop_module.named_parameters():
        # numerical: 2 ranks' half batches (and Lightning) against the loop's whole ones, gradients summed in
        # another order; 16 steps, sums of 16 terms (width, batch), weights below 1
        torch.testing.assert_close(torch.tensor(ranks[0]["run"]["params"][n], dtype=torch.float64),
                                   p.detach().double().flatten(), rtol=0, atol=float32_drift(16, 16), msg=n)
