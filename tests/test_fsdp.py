"""FSDP1 (FSDPStrategy): wrap plans, name translation and alignment checks in-process (a 1-rank gloo group),
then the FSDPStrategyAdapter in real 2-process runs (one torchrun launch shared by the tests below it)."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy, size_based_auto_wrap_policy

from helpers import Block, Net, ToyModule, float32_drift
from launch import launch
from phasetune import (
    ConfigurationError,
    FinetuningScheduler,
    FSDPStrategyAdapter,
    PhaseEngine,
    generate_schedule,
    resolve_schedule,
)
from phasetune.lightning.adapters import select_adapter
from phasetune.sharding import fsdp1_alignment as fsdp1

pytestmark = pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")

PHASES = {0: ["head.*"], 1: [r"layers\.[4-7]\..*"], 2: [r"layers\.[0-3]\..*", "embed.*"]}
SCHEDULE = {k: {"params": v} for k, v in PHASES.items()}


# ------------------------------------------------------------------------------------------------ engine


def test_engine_thaws_groups_and_snapshots_a_tensor_shared_by_several_names_once():
    flat_a, flat_b = nn.Parameter(torch.zeros(6)), nn.Parameter(torch.zeros(4))
    params = {"a.w": flat_a, "a.b": flat_a, "b.w": flat_b, "b.b": flat_b}  # two units, as FSDP1 flattens them
    schedule = resolve_schedule({0: {"params": ["a.*"]}, 1: {"params": ["b.*"], "lr": 0.5}}, list(params))
    engine = PhaseEngine(schedule, params)
    engine.start()
    opt = torch.optim.SGD([flat_a, flat_b], lr=0.1)
    engine.prepare_optimizer(opt)
    assert [len(g["params"]) for g in opt.param_groups] == [1]
    t = engine.advance(opt)
    assert t.thawed == ["b.w", "b.b"]  # every name whose tensor was thawed, not just the first
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    assert list(engine.trainable()) == ["a.w", "b.w"]  # one entry per tensor


# ------------------------------------------------------------------------------------------------ in-process FSDP


def wrapped(orig: bool, policy=None, **kw) -> tuple[Net, FSDP]:
    torch.manual_seed(0)
    net = Net(n_layers=8)
    plain = Net(n_layers=8)
    policy = policy if policy is not None else fsdp1.AlignedWrapPolicy(ModuleWrapPolicy({Block}), ["head"])
    return plain, FSDP(net, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=orig, **kw)


@pytest.mark.parametrize("orig", [False, True], ids=["flat", "orig_params"])
def test_param_index_gives_logical_names_shapes_and_order_of_the_unwrapped_model(gloo_one_rank, orig):
    plain, model = wrapped(orig)
    index = fsdp1.ParamIndex.build(model)
    assert list(index.tensors) == [n for n, _ in plain.named_parameters()]
    assert index.shapes == {n: tuple(p.shape) for n, p in plain.named_parameters()}
    assert sorted(u.module for u in index.units) == ["", "head"] + [f"layers.{i}" for i in range(8)]
    assert index.use_orig_params is orig


def test_param_index_translates_flat_parameters_to_logical_names_and_back(gloo_one_rank):
    _, model = wrapped(False)
    index = fsdp1.ParamIndex.build(model)
    flat_names = [n for n, _ in model.named_parameters()]
    assert len(flat_names) == 10  # root (embed), head, 8 layers
    layer3 = "_fsdp_wrapped_module.layers.3._fsdp_wrapped_module._flat_param"
    assert layer3 in flat_names
    assert index.to_fsdp(["layers.3.lin.weight", "layers.3.norm.bias"]) == [layer3]
    assert index.to_logical([layer3]) == ["layers.3.norm.weight", "layers.3.norm.bias", "layers.3.lin.weight", "layers.3.lin.bias"]
    assert index.tensors["layers.3.lin.weight"] is index.tensors["layers.3.norm.bias"]  # one FlatParameter


def test_param_index_keeps_one_original_tensor_per_name_with_use_orig_params(gloo_one_rank):
    _, model = wrapped(True)
    index = fsdp1.ParamIndex.build(model)
    assert len({id(t) for t in index.tensors.values()}) == 36
    assert index.to_fsdp(["layers.3.lin.weight"]) == ["_fsdp_wrapped_module.layers.3._fsdp_wrapped_module.lin.weight"]
    assert index.to_logical(index.to_fsdp(["head.bias"])) == ["head.bias"]


def phase_of(schedule_dict, names):
    schedule = resolve_schedule(schedule_dict, names)
    return {n: k for k, p in enumerate(schedule.phases) for n in p.params}


def test_aligned_units_pass_the_check(gloo_one_rank):
    _, model = wrapped(False)
    index = fsdp1.ParamIndex.build(model)
    assert fsdp1.alignment_problems(index, phase_of(SCHEDULE, list(index.tensors))) == []


def test_a_root_unit_mixing_phases_lists_its_parameters_with_the_root_hint_and_a_fix(gloo_one_rank):
    _, model = wrapped(False, policy=ModuleWrapPolicy({Block}))  # head stays in the root unit with embed
    index = fsdp1.ParamIndex.build(model)
    [problem] = fsdp1.alignment_problems(index, phase_of(SCHEDULE, list(index.tensors)))
    assert "FSDP units mix parameters of different phases" in problem
    for name, k in [("embed.weight", 2), ("embed.bias", 2), ("head.weight", 0), ("head.bias", 0)]:
        assert f"'{name}' (phase {k}) -> unit of Net (the root unit)" in problem
    assert "layers.0" not in problem
    assert "left to the root unit" in problem
    assert "add ['head'] to strategy_adapter_cfg={'awp_overrides'" in problem
    assert "use_orig_params=True" in problem


def test_use_orig_params_allows_mixed_units(gloo_one_rank):
    _, model = wrapped(True, policy=ModuleWrapPolicy({Block}))
    index = fsdp1.ParamIndex.build(model)
    assert fsdp1.alignment_problems(index, phase_of(SCHEDULE, list(index.tensors))) == []


def test_unscheduled_parameters_sharing_a_unit_with_scheduled_ones_are_flagged(gloo_one_rank):
    _, model = wrapped(False)
    index = fsdp1.ParamIndex.build(model)
    partial = {0: {"params": ["head.*"]}, 1: {"params": [r"layers\.7\.lin\..*"]}}
    [problem] = fsdp1.alignment_problems(index, phase_of(partial, list(index.tensors)))
    assert "'layers.7.norm.weight' (not in the schedule) -> unit of 'layers.7' (Block)" in problem
    assert "would train from the phase that thaws their unit" in problem
    assert "add ['layers.7.lin']" in problem


# ------------------------------------------------------------------------------------------------ wrap plans


def test_awp_overrides_add_units_by_name_and_regex_and_report_entries_matching_nothing():
    plan = fsdp1.plan_wrap(Net(8), ModuleWrapPolicy({Block}), ["head", r"embed|nothing", "layers.9", "lay"])
    assert plan.wrapped == ["embed"] + [f"layers.{i}" for i in range(8)] + ["head"]
    assert plan.unmatched == ["layers.9", "lay"]


def test_min_num_params_wraps_what_torchs_size_based_policy_wraps():
    net = Net(8)
    alone = fsdp1.plan_wrap(net, min_num_params=100)
    torch_policy = functools.partial(size_based_auto_wrap_policy, min_num_params=100)
    assert alone.wrapped == fsdp1.plan_wrap(net, torch_policy).wrapped
    assert alone.wrapped == ["embed"] + [f"layers.{i}.lin" for i in range(8)]


def test_min_num_params_combines_with_a_policy_object_and_overrides():
    plan = fsdp1.plan_wrap(Net(8), ModuleWrapPolicy({Block}), ["head"], min_num_params=100)
    expected = ["embed"] + [m for i in range(8) for m in (f"layers.{i}", f"layers.{i}.lin")] + ["head"]
    assert plan.wrapped == expected


def test_the_aligned_policy_wraps_exactly_its_plan(gloo_one_rank):
    policy = fsdp1.AlignedWrapPolicy(None, [r"layers\.[0-3]", "head"], min_num_params=None)
    _, model = wrapped(False, policy=policy)
    units = sorted(n for n, m in model.named_modules() if isinstance(m, FSDP))
    assert [fsdp1.logical_name(u) for u in units] == ["", "head", "layers.0", "layers.1", "layers.2", "layers.3"]
    assert policy.plan is not None and policy.plan.unmatched == []


def test_the_logical_skeleton_generates_the_same_implicit_schedule_as_the_unwrapped_model(gloo_one_rank):
    plain, model = wrapped(False)
    skeleton = fsdp1.logical_skeleton(model, fsdp1.ParamIndex.build(model))
    for style in ("blocks", "pairs"):
        assert generate_schedule(skeleton, style) == generate_schedule(plain, style)


# ------------------------------------------------------------------------------------------------ adapter config


def test_resuming_from_a_checkpoint_without_phasetune_state_is_refused_before_the_strategy_loads_it(
    gloo_one_rank, tmp_path
):
    import lightning.pytorch as pl

    from fsdp_cpu import CPUFSDPStrategy
    from helpers import ToyModule, trainer

    plain = trainer(tmp_path / "plain", [], max_epochs=1)
    plain.fit(ToyModule(all_params_in_optimizer=True))
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    fts = FinetuningScheduler({0: {"params": ["model.head.*"]}, 1: {"params": ["model.embed.*"]}},
                              strategy_adapter_cfg={"awp_overrides": ["model.head", "model.embed"]})
    t = pl.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, max_epochs=2, callbacks=[fts],
                   strategy=CPUFSDPStrategy(auto_wrap_policy=ModuleWrapPolicy({Block})), logger=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    # without the check, FSDP's optimizer-state load fails first with KeyError: 'model.embed.bias'
    with pytest.raises(ConfigurationError, match=r"plain\.ckpt: it holds no FinetuningScheduler state"):
        t.fit(ToyModule(), ckpt_path=tmp_path / "plain.ckpt")


class PathHparams(ToyModule):
    """Hyperparameters holding a pathlib.Path, which torch.load refuses with weights_only=True."""

    def __init__(self, data_dir: Path = Path("data")) -> None:
        super().__init__(optimizer="adam", lr=0.01)
        self.save_hyperparameters()


TWO_PHASES = {0: {"params": ["model.head.*"], "max_transition_epoch": 1}, 1: {"params": ["model.embed.*"], "max_transition_epoch": 3}}


def fsdp1_fit(one_rank_dir: Path, strategy: FSDPStrategy, max_epochs: int, **fit_kw) -> tuple[pl.Trainer, Any]:
    fts = FinetuningScheduler(TWO_PHASES, epoch_transitions_only=True,
                              strategy_adapter_cfg={"awp_overrides": ["model.head", "model.embed"]})
    t = pl.Trainer(default_root_dir=str(one_rank_dir), accelerator="cpu", devices=1, max_epochs=max_epochs,
                   callbacks=[fts], strategy=strategy, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0)
    t.fit(PathHparams(), **fit_kw)
    return t, fts


@pytest.fixture(scope="module")
def path_hparams_fit(gloo_one_rank, tmp_path_factory):
    """One in-process FSDP1 fit into phase 1 whose checkpoint's hparams hold a Path."""
    from fsdp_cpu import CPUFSDPStrategy

    out = tmp_path_factory.mktemp("path_hparams")
    user_policy = ModuleWrapPolicy({Block})
    t, fts = fsdp1_fit(out, CPUFSDPStrategy(auto_wrap_policy=user_policy), max_epochs=2)
    t.save_checkpoint(out / "path.ckpt")
    return out, t, user_policy, fts


def test_after_fit_the_fsdp_strategy_is_left_as_the_user_gave_it(path_hparams_fit):
    _, t, user_policy, _ = path_hparams_fit
    assert not {"load_checkpoint", "optimizer_state", "save_checkpoint"} & set(vars(t.strategy))
    assert t.strategy.kwargs["auto_wrap_policy"] is user_policy


def test_a_checkpoint_whose_hparams_hold_a_path_resumes_as_the_strategy_reads_it(path_hparams_fit):
    # FSDPStrategy unpickles a full checkpoint whatever weights_only says (and Lightning 2.6 passes it None);
    # phasetune's read of the callback state before that load once forced weights_only=True: UnpicklingError
    from fsdp_cpu import CPUFSDPStrategy

    out, _, user_policy, _ = path_hparams_fit
    t, fts = fsdp1_fit(out / "resumed", CPUFSDPStrategy(auto_wrap_policy=user_policy), max_epochs=3,
                       ckpt_path=out / "path.ckpt")
    assert fts.curr_depth == 1 and t.current_epoch == 3


def test_a_checkpoint_torch_load_refuses_is_reported_in_one_line_with_its_path_and_the_fix(path_hparams_fit):
    from phasetune.lightning.sharded import read_callback_state

    out, _, _, fts = path_hparams_fit
    with pytest.raises(ConfigurationError) as e:
        read_callback_state(out / "path.ckpt", fts.state_key, weights_only=True)
    message = str(e.value)
    assert "\n" not in message and str(out / "path.ckpt") in message
    assert "torch.serialization.add_safe_globals([pathlib.PosixPath])" in message
    with torch.serialization.safe_globals([type(out)]):
        assert read_callback_state(out / "path.ckpt", fts.state_key, weights_only=True)["depth"] == 1


def test_adapter_is_chosen_for_fsdp_strategy_and_validates_its_config():
    assert type(select_adapter(FSDPStrategy(), {"awp_overrides": ["model.head"]})) is FSDPStrategyAdapter
    with pytest.raises(ConfigurationError) as err:
        FSDPStrategyAdapter(awp_overrides="model.head", min_num_params=0)
    assert "awp_overrides must be a list" in str(err.value)
    assert "min_num_params must be a positive integer" in str(err.value)


def test_the_docs_example_is_the_configuration_the_two_process_scenarios_train():
    from pathlib import Path

    from fsdp_cpu import OVERRIDES, SCHEDULE

    text = (Path(__file__).resolve().parents[1] / "docs" / "fsdp.md").read_text()
    block = re.search(r"<!-- tested: tests/test_fsdp.py.*?```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {"Block": Block}
    exec(block, scope)
    assert scope["schedule"] == SCHEDULE
    assert scope["fts"].strategy_adapter_cfg == OVERRIDES and scope["fts"].epoch_transitions_only
    strategy = scope["strategy"]
    assert strategy.kwargs["use_orig_params"] is False
    assert fsdp1.plan_wrap(Net(2), strategy.kwargs["auto_wrap_policy"]).wrapped == ["layers.0", "layers.1"]


# ------------------------------------------------------------------------------------------------ 2 processes


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def ranks(out_dir):
    return launch("fsdp_scenarios.py", out_dir)


LAYERS = [f"model.layers.{i}.{m}.{p}" for i in range(8) for m in ("norm", "lin") for p in ("weight", "bias")]
HEAD = ["model.head.weight", "model.head.bias"]
EMBED = ["model.embed.weight", "model.embed.bias"]


@pytest.mark.parametrize("mode", ["flat", "orig"])
def test_three_phases_thaw_and_train_exactly_the_scheduled_parameters_per_epoch(ranks, mode):
    run = ranks[0][f"{mode}_run"]
    assert [p[:2] for p in run["phases"]] == [[0, 2], [2, 4], [4, 6]]
    assert [e["depth"] for e in run["epochs"]] == [0, 0, 1, 1, 2, 2]
    assert [e["thawed"] for e in run["epochs"]] == [2, 2, 18, 18, 36, 36]
    # tensors that train: one FlatParameter per unit (use_orig_params=False) or the original parameters
    expected_tensors = [1, 1, 5, 5, 10, 10] if mode == "flat" else [2, 2, 18, 18, 36, 36]
    assert [e["trainable_tensors"] for e in run["epochs"]] == expected_tensors
    phase1 = HEAD + [n for n in LAYERS if int(n.split(".")[2]) >= 4]
    changed = [e["changed"] for e in run["epochs"]]
    assert changed[0] == changed[1] == sorted(HEAD)
    assert changed[2] == changed[3] == sorted(phase1)
    assert changed[4] == changed[5] == sorted(HEAD + LAYERS + EMBED)
    assert run["trainable_params"] == [34, 1250, 2610]
    assert [g[2] for g in run["groups"]] == [0, 1, 2]


@pytest.mark.numerical
@pytest.mark.launched
def test_both_modes_train_the_same_model(ranks):
    flat, orig = ranks[0]["flat_run"]["params"], ranks[0]["orig_run"]["params"]
    assert flat.keys() == orig.keys()
    for name, values in flat.items():
        # numerical: flat parameters and original ones go through the optimizer as other tensors (other vectorised
        # loops and their tails); 6 epochs of 4 steps, sums of 16 terms (width 16), weights below 1
        torch.testing.assert_close(torch.tensor(orig[name]), torch.tensor(values), rtol=0, atol=float32_drift(24, 16),
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", ["flat", "orig"])
def test_resume_from_a_phase_1_checkpoint_matches_the_uninterrupted_run_exactly(ranks, mode):
    ref, resumed = ranks[0][f"{mode}_run"], ranks[0][f"{mode}_resumed"]
    assert resumed["epochs"][0]["epoch"] == 4
    assert resumed["params"] == ref["params"]  # exact: resume against the uninterrupted run
    assert resumed["groups"] == ref["groups"]
    assert ranks[1][f"{mode}_resumed"]["groups"] == ranks[1][f"{mode}_run"]["groups"]


def test_after_each_fit_the_strategy_holds_no_phasetune_patches_and_its_own_wrap_policy(ranks):
    for rank in ranks:
        for name in ("flat_run", "flat_resumed", "orig_run", "orig_resumed", "es_run", "es_resumed"):
            assert rank[name]["patches_left"] == [], name


def test_checkpoints_hold_optimizer_state_consolidated_under_logical_names(ranks, out_dir):
    for mode in ("flat", "orig"):
        ckpt = torch.load(out_dir / f"{mode}_run" / "epoch=3.ckpt", weights_only=True)
        [opt] = ckpt["optimizer_states"]
        phase1 = HEAD + [n for n in LAYERS if int(n.split(".")[2]) >= 4]
        assert sorted(opt["state"]) == sorted(phase1)
        assert [(g["ft_phase"], sorted(g["params"])) for g in opt["param_groups"]] == [
            (0, sorted(HEAD)), (1, sorted(phase1[2:])),
        ]
        assert opt["state"]["model.layers.5.lin.weight"]["exp_avg"].shape == (16, 16)


def test_restore_best_with_early_stopping_and_its_resume_match_across_processes(ranks):
    run = ranks[0]["es_run"]
    assert run["phases"] == [
        [0, 4, "early stopping", True],
        [4, 7, "early stopping", True],
        [7, 11, "early stopping", False],
    ]
    # resumed in phase 1 with the phase's best-state snapshot (each rank's shards) from the checkpoint; exact
    assert ranks[0]["es_resumed"]["params"] == run["params"]


def test_each_misalignment_is_reported_before_training_in_one_error(ranks):
    r = ranks[0]
    root_mix = r["root_mix"]["error"]
    assert "FSDP units mix parameters of different phases" in root_mix
    assert "'model.head.weight' (phase 0) -> unit of ToyModule (the root unit)" in root_mix
    assert "'model.embed.weight' (phase 2) -> unit of ToyModule (the root unit)" in root_mix
    assert "left to the root unit" in root_mix and "add ['model.head']" in root_mix

    both = r["split_and_unmatched"]["error"]
    assert both.startswith("2 configuration problems")
    assert re.search(r"awp_overrides entries \['model.nothere', 'model\\\\.layers\\\\.9'\] match no module", both)
    assert "'model.layers.7.lin.weight' (phase 0) -> unit of 'model.layers.7' (Block)" in both
    assert "'model.layers.7.norm.bias' (phase 1) -> unit of 'model.layers.7' (Block)" in both
    assert "add ['model.layers.7.lin']" in both

    assert "phase 0 holds no parameter that FSDP wraps" in r["phase0_ignored"]["error"]
    assert "'model.head.weight'" in r["phase0_ignored"]["error"]
    assert "already contains FullyShardedDataParallel modules" in r["already_wrapped"]["error"]


def test_a_model_without_wrap_policy_is_one_unit_with_a_warning(ranks):
    one = ranks[0]["one_unit"]
    assert any("the whole model is one FSDP unit" in w for w in one["warnings"])
    assert "add ['model.head', 'model.layers.4', 'model.layers.5', 'model.layers.6', 'model.layers.7']" in one["error"]


def test_ranks_without_a_shard_of_phase_0_are_reported_at_debug_level(ranks):
    # head (phase 0) left in the root unit after embed: its 34 elements all land in rank 1's shard
    for r in ranks:
        assert r["orig_root_head"]["error"] is None
        assert r["orig_root_head"]["empty_phase0_ranks"] == [0]
    assert ranks[0]["orig_root_head"]["debug"] == [
        "phasetune: ranks [0] hold no shard of phase 0's parameters (elements per rank: [0, 34]); their optimizer "
        "has nothing to update in phase 0. Wrapping phase 0's modules in their own unit (awp_overrides) spreads "
        "them over all ranks."
    ]


def test_min_num_params_adds_size_based_units_through_the_adapter(ranks):
    units = ranks[0]["min_num_params"]["units"]
    assert ranks[0]["min_num_params"]["error"] is None
    assert units == ["model.embed", "model.head"] + [m for i in range(8) for m in (f"model.layers.{i}", f"model.layers.{i}.lin")]


def test_awp_overrides_are_ignored_with_a_warning_when_the_model_is_wrapped_in_configure_model(ranks):
    manual = ranks[0]["manual"]
    assert any("awp_overrides/min_num_params are ignored" in w for w in manual["warnings"])
    assert manual["units"] == ["model.embed", "model.head"] + [f"model.layers.{i}" for i in range(8)]
    assert [e["trainable_tensors"] for e in manual["epochs"]] == [1, 1, 5]
    assert manual["checkpoints"] == ["epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt"]


def test_units_wrapped_by_hand_without_an_enclosing_unit_are_refused(ranks):
    error = ranks[0]["many_roots"]["error"]
    assert "the model has 10 outermost FSDP units ('model.embed', 'model.layers.0', 'model.layers.1' and 7 more)" in error
    assert "self.model = wrap(self.model)" in error
