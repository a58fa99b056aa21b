"""AcceleratedFinetuning: the schedule in a loop that Hugging Face Accelerate runs (one process, and 2 DDP processes on
CPU under torchrun), against the plain loop's trajectory (tests/loop_runs.py), with exact resume through
``accelerator.save_state`` / ``load_state``."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.state import AcceleratorState, GradientState

import accelerate_runs
from helpers import ToyModule, assert_bit_equal, dataset, float32_drift
from launch import launch
from loop_runs import RESTARTS, STEPS, epoch_loop_run, step_loop_run
from phasetune import ConfigurationError
from phasetune.loop.accelerated import STATE_FILE, AcceleratedFinetuning
from phasetune.run import Host

pytestmark = pytest.mark.usefixtures("plain_process")
ROOT = Path(__file__).resolve().parents[1]


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def steps_of(ft) -> list[tuple]:
    return [(r.depth, r.start_epoch, r.start_step, r.end_epoch, r.end_step, r.end_reason, r.restored_best)
            for r in ft.history]


# ------------------------------------------------------------------------------------------------ one process
@pytest.mark.parametrize("schedule", [STEPS, RESTARTS], ids=["step_caps", "new_optimizer"])
def test_step_capped_phases_follow_the_loops_trajectory_with_bit_equal_weights(schedule):
    loop_module, loop_ft, loop_trajectory, _ = step_loop_run(schedule)
    module, ft, trajectory = accelerate_runs.step_run(schedule)
    assert trajectory == loop_trajectory  # thawed names, and each group's (phase, size, lr) before every step
    assert steps_of(ft) == steps_of(loop_ft) and ft.depth == 2
    # exact: same machine, same ops, same batches (one process: Accelerate adds no wrapper and no reduction)
    assert_bit_equal(params(module), params(loop_module))


def test_epoch_transitions_and_early_stopping_follow_the_loop_with_bit_equal_weights():
    loop_module, loop_ft, loop_epochs = epoch_loop_run()
    module, ft, epochs = accelerate_runs.epoch_run()
    assert epochs == loop_epochs
    epochs_of = [(r.depth, r.start_epoch, r.end_epoch, r.end_reason, r.restored_best) for r in ft.history]
    assert epochs_of == [(r.depth, r.start_epoch, r.end_epoch, r.end_reason, r.restored_best) for r in loop_ft.history]
    # the loop was given no step_end calls; step_end counted 4 optimizer steps an epoch
    assert [(r.start_step, r.end_step) for r in ft.history] == [(4 * r.start_epoch, 4 * r.end_epoch) for r in ft.history]
    assert [r.end_reason for r in ft.history][:2] == ["early stopping", "max_transition_epoch reached"] and ft.done
    assert_bit_equal(params(module), params(loop_module))  # exact: same machine, same ops, same batches


@pytest.mark.parametrize(("schedule", "at"), [(STEPS, 6), (STEPS, 8), (RESTARTS, 9)],
                         ids=["at_the_transition_step", "inside_phase_1", "after_a_new_optimizer"])
def test_resume_from_save_state_is_bit_equal_to_the_uninterrupted_run(tmp_path, schedule, at):
    module, ft, trajectory = accelerate_runs.step_run(schedule, save_at=at, save_dir=tmp_path)
    assert (tmp_path / STATE_FILE).is_file()
    # load_state rebuilds the saved phase (its groups, a phase's new optimizer) before Accelerate loads the
    # optimizer state, which it could not load into phase 0's groups
    resumed_module, resumed, resumed_trajectory = accelerate_runs.step_run(schedule, resume=tmp_path)
    assert resumed_trajectory == trajectory[at:]
    assert steps_of(resumed) == steps_of(ft)
    assert_bit_equal(params(resumed_module), params(module))  # exact: resume against the uninterrupted run


def test_a_new_optimizer_and_scheduler_replace_the_prepared_ones_in_save_state(tmp_path):
    _, ft, _ = accelerate_runs.step_run(RESTARTS)
    optimizer, schedulers = ft.optimizer_and_schedulers()
    assert isinstance(ft.optimizer, AcceleratedOptimizer) and isinstance(ft.lr_scheduler, AcceleratedScheduler)
    assert schedulers[0].optimizer is optimizer  # phase 2's lr scheduler drives phase 2's optimizer
    assert [len(g["params"]) for g in ft.optimizer.param_groups] == [2, 4, 2]  # phase 2's optimizer holds all
    ft.accelerator.save_state(str(tmp_path))
    saved = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".bin", ".safetensors"))
    assert saved == ["model.safetensors", "optimizer.bin", "scheduler.bin"]  # one of each: replaced, not added
    state = torch.load(tmp_path / "optimizer.bin", weights_only=True)
    assert len(state["param_groups"]) == 3


def test_load_state_of_a_folder_saved_without_phasetune_names_the_file(tmp_path):
    Accelerator(cpu=True).save_state(str(tmp_path / "plain"))  # nothing prepared: a valid folder without our file
    _, ft = accelerate_runs.build(STEPS)
    with pytest.raises(ConfigurationError, match=f"holds no {STATE_FILE}.*AcceleratedFinetuning"):
        ft.accelerator.load_state(str(tmp_path / "plain"))
    assert ft.depth == 0 and ft.global_step is None  # nothing was loaded


def test_loading_into_a_run_that_already_transitioned_names_the_accelerate_class(tmp_path):
    _, ft, _ = accelerate_runs.step_run(STEPS, save_at=6, save_dir=tmp_path)  # ran past its first transition
    with pytest.raises(ConfigurationError, match=r"needs a fresh AcceleratedFinetuning \(one that has not transitioned"):
        ft.accelerator.load_state(str(tmp_path))


def test_bad_input_is_named_with_its_fix_all_at_once_before_training():
    accelerator = Accelerator(cpu=True)
    module = ToyModule(lr=0.1)
    model, optimizer = accelerator.prepare(module, torch.optim.SGD(module.parameters(), lr=0.1))
    with pytest.raises(ConfigurationError) as e:
        AcceleratedFinetuning(STEPS, accelerator, model, optimizer, patience=0)
    text = str(e.value)
    assert "model was already prepared by Accelerate; pass it before accelerator.prepare" in text
    assert "optimizer was already prepared by Accelerate" in text and "patience must be an integer >= 1" in text
    with pytest.raises(ConfigurationError) as e:
        AcceleratedFinetuning(STEPS, "cpu", fresh := ToyModule(lr=0.1), "sgd", total_steps=10)
    text = str(e.value)
    assert "total_steps sets the budget of an implicit schedule" in text
    assert "accelerator must be an accelerate.Accelerator" in text
    assert "optimizer must be a torch.optim.Optimizer, got str" in text and "model" not in text
    assert all(p.requires_grad for p in fresh.parameters())  # nothing was frozen


def test_optimizer_steps_count_once_per_gradient_accumulation_cycle():
    # Accelerate keeps its state in process-wide singletons: an HF Trainer that ran earlier in this process would
    # otherwise decide when this Accelerator syncs (and the next Accelerator sets its own)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    _, ft = accelerate_runs.build({0: {"params": ["model.head.*"], "max_transition_step": 3},
                                   1: {"params": [r"model\.layers\.3\..*"]}}, accelerator)
    x, y = dataset(64, 0).tensors
    for i in range(0, 64, 8):  # 8 micro-batches: 4 optimizer steps
        with accelerator.accumulate(ft.model):
            accelerate_runs.train_step(ft, x[i:i + 8], y[i:i + 8])
    assert ft.global_step == 4
    assert [(r.depth, r.start_step, r.end_step) for r in ft.history] == [(0, 0, 3), (1, 3, None)]


def test_it_is_a_host_of_the_run():
    for name in ("optimizer_and_schedulers", "install", "trained_model"):
        assert inspect.signature(getattr(AcceleratedFinetuning, name)).parameters.keys() == \
            inspect.signature(getattr(Host, name)).parameters.keys(), name


# ------------------------------------------------------------------------------------------------ 2 DDP processes
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch("accelerate_scenarios.py", tmp_path_factory.mktemp("accelerate"))


def test_ddp_transitions_rebuild_ddp_and_train_the_thawed_parameters_on_both_ranks(ranks):
    r0, r1 = ranks[0]["run"], ranks[1]["run"]
    assert r0["distributed"] == "MULTI_CPU" and r0["processes"] == 2
    assert r0["phases"] == r1["phases"] == [[0, 0, 6], [1, 6, 11], [2, 11, 16]]
    assert r0["rebuilt"] == [["DistributedDataParallel", True]] * 2  # a new DDP at each transition
    assert all(r0["params"][n] != r0["initial"][n] for n in r0["params"])  # every scheduled tensor trained
    assert r0["params"] == r1["params"]  # exact: rank against rank (each trained on its half of every batch)


@pytest.mark.numerical
@pytest.mark.launched
def test_ddp_follows_the_one_process_loops_trajectory(ranks):
    loop_module, _, loop_trajectory, _ = step_loop_run(STEPS)
    assert ranks[0]["run"]["trajectory"] == json.loads(json.dumps(loop_trajectory))
    for name, values in ranks[0]["run"]["params"].items():
        # numerical: 2 ranks average two means of 8 samples where the loop takes one mean of 16; 16 steps, sums of
        # 16 terms, weights below 2 (the largest ends near 1.02)
        torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), loop_module.state_dict()[name].double().flatten(),
                                   rtol=0, atol=float32_drift(16, 16, scale=2.0), msg=lambda m, name=name: f"{name}: {m}")


def test_ddp_resume_from_save_state_in_phase_1_is_bit_equal_on_every_rank(ranks):
    for rank in ranks:
        assert rank["resumed"]["trajectory"] == rank["run"]["trajectory"][8:]
        assert rank["resumed"]["params"] == rank["run"]["params"]  # exact: resume against the uninterrupted run


def test_without_the_ddp_rewrap_the_thawed_parameters_drift_apart_across_ranks(ranks):
    r0, r1 = ranks[0]["without_rewrap"], ranks[1]["without_rewrap"]
    assert r0["rebuilt"] == [["DistributedDataParallel", False]] * 2
    differ = {n for n in r0["params"] if r0["params"][n] != r1["params"][n]}
    # exact: rank against rank; the head was in DDP from the start, every tensor thawed later never had its
    # gradients averaged
    assert differ == {n for n in r0["params"] if not n.startswith("model.head.")}


# ------------------------------------------------------------------------------------------------ the example
@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """examples/accelerate/train.py, loaded, and its lines and save_state folders of one uninterrupted run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("accelerate_example", ROOT / "examples/accelerate/train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("accelerate_example")
    return module, module.main(["--output_dir", str(out)]), out


def test_the_example_runs_its_three_phases(example):
    _, lines, _ = example
    assert len(lines) == 13 and lines[0].startswith("epoch 0: phase 0, 2 tensors train")
    assert lines[-1] == ("phases: 0 from step 0 to 20 (max_transition_step reached), 1 from step 20 to 64 "
                         "(max_transition_epoch reached), 2 from step 64")


@pytest.mark.parametrize("stopped_after", [0, 3, 5], ids=["in_phase_0", "at_the_epoch_transition", "in_phase_2"])
def test_the_example_resumes_bit_equal_from_its_last_epoch(example, tmp_path, stopped_after):
    import shutil

    module, lines, full = example
    for epoch in range(stopped_after + 1):  # a run that stopped after that epoch
        shutil.copytree(full / f"epoch_{epoch}", tmp_path / f"epoch_{epoch}")
    assert module.main(["--output_dir", str(tmp_path), "--resume"]) == lines[stopped_after + 1:]
    weights = "epoch_11/model.safetensors"  # exact: resume against the uninterrupted run, same machine and batches
    assert (tmp_path / weights).read_bytes() == (full / weights).read_bytes()


def test_an_accelerator_that_steps_lr_schedulers_per_process_is_warned_about():
    from types import SimpleNamespace

    from phasetune.loop.run_facts import scheduler_stepping_note

    phases = [SimpleNamespace(index=0, new_lr_scheduler=None), SimpleNamespace(index=1, new_lr_scheduler={"x": 1})]

    def accelerator(**kw):
        return SimpleNamespace(**{"num_processes": 2, "step_scheduler_with_optimizer": True, "split_batches": False, **kw})

    note = scheduler_stepping_note(phases, accelerator())
    assert note.startswith("phase(s) 1 bring lr schedulers sized in optimizer steps")
    assert "steps a prepared lr scheduler 2 times per optimizer step" in note
    assert "build the Accelerator with step_scheduler_with_optimizer=False" in note
    for fine in (accelerator(num_processes=1), accelerator(step_scheduler_with_optimizer=False),
                 accelerator(split_batches=True)):
        assert scheduler_stepping_note(phases, fine) is None
    assert scheduler_stepping_note(phases[:1], accelerator()) is None  # no lr shapes of the schedule's own
