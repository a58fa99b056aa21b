"""FSDP2Strategy with ScheduledFinetuning: 2 processes under torchrun (gloo, CPU), and one process.

Two launches: ``train`` (numerics against single-process references, rotation, offload, and a run killed
just after saving a checkpoint right after a phase transition) and ``resume`` (the uninterrupted run, resumes
from the killed run's checkpoints, MiniLM export and meta-init, the documented loop).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import float32_drift
from launch import launch
from phasetune import ConfigurationError, FSDP2Strategy, ScheduledFinetuning
from phasetune.loop.strategy import block_plan, list_checkpoints
from phasetune.loop.strategy import checkpoint_dirs as checkpoint
from phasetune.sharding.units import unit_dtype_problems
from plain_models import SCHEDULE, TinyLM

DOC = Path(__file__).resolve().parents[1] / "docs" / "plain_pytorch.md"


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    out = tmp_path_factory.mktemp("strategy_train")
    return out, launch("strategy_scenarios.py", out, "train")


@pytest.fixture(scope="module")
def resume(train, tmp_path_factory):
    return launch("strategy_scenarios.py", tmp_path_factory.mktemp("strategy_resume"), "resume", str(train[0]))


def both(ranks, key, *fields):
    """``ranks[*][key]`` (only ``fields`` of it, if given), checked to be the same on both ranks."""
    a, b = ranks[0][key], ranks[1][key]
    if fields:
        a, b = {f: a[f] for f in fields}, {f: b[f] for f in fields}
    assert a == b, f"{key}: ranks disagree"
    return a


# ------------------------------------------------------------------------------------------ numerics
# numerical, each against one process on the whole batches: ranks and micro-steps sum gradients in another order;
# sums of 16 terms (TinyLM's width, the batches), weights below 1, over each comparison's optimizer steps
@pytest.mark.numerical
@pytest.mark.launched
def test_a_three_phase_loop_on_two_ranks_matches_one_process_on_the_full_batches(train):
    r = both(train[1], "agreement")
    assert r["depths"] == r["ref_depths"] == [[0, 0], [1, 1], [2, 2]]
    assert r["steps"] == 16 and r["clipped_steps"] > 0  # clipping was active in some steps
    assert r["max_diff"] <= float32_drift(16, 16)
    assert r["groups_homogeneous"]


@pytest.mark.numerical
@pytest.mark.launched
def test_gradient_accumulation_equals_one_large_batch_step(train):
    r = both(train[1], "accumulation")
    assert r["accumulation_steps"] == 4
    assert r["stepped"] == [False, False, False, True]
    assert r["max_diff"] <= float32_drift(1, 16)


def test_gradients_are_not_synchronised_before_the_last_micro_step(train):
    # FSDP2 keeps unsharded gradients locally while sync is off; sharded .grad appears after the reduce-scatter
    assert both(train[1], "accumulation")["no_sharded_grads_after_backward"] == [True, True, True, False]


@pytest.mark.numerical
@pytest.mark.launched
def test_clipping_uses_one_norm_over_all_meshes_like_clip_grad_norm_on_the_unsharded_model(train):
    r = both(train[1], "clipping")
    assert len(r["meshes"]) == 2 and r["torch_clip_fails"]  # torch's own norm refuses two meshes
    # numerical: shards' sums of squares against one sum over TinyLM's 1762 parameters (n terms: n roundings)
    assert r["norm"] == pytest.approx(r["ref_norm"], rel=float32_drift(1, 1762)) and r["norm"] > 0.05  # so it clipped
    assert r["max_diff"] <= float32_drift(1, 16)


def test_a_non_finite_gradient_norm_skips_the_step_and_drops_the_gradients(train):
    r = both(train[1], "nonfinite")
    assert r["nan_stepped"] is False and r["nan_skipped"] == 1
    assert r["unchanged"] and r["grads_dropped"]  # exact: the skipped step wrote nothing


def test_bf16_computes_in_bfloat16_and_keeps_float32_master_weights(train):
    r = both(train[1], "nonfinite")
    assert r["bf16_logits"] == "torch.bfloat16" and r["bf16_params"] == "torch.float32"
    assert r["bf16_stepped"] and r["bf16_norm_finite"]


def test_bf16_thaws_a_unit_frozen_at_the_first_forward_and_trains_it(train):
    for r in (rank["nonfinite"] for rank in train[1]):
        assert "bf16_thaw_error" not in r, r.get("bf16_thaw_error")
        assert r["bf16_thaw_depth"] == 1 and r["bf16_thaw_trained"]


def test_offload_round_trips_optimizer_state_exactly(train):
    r = both(train[1], "offload")
    assert r["moved"] and r["round_trip_exact"] and r["next_step_matches_twin"]  # exact: copies, the same step
    assert r["state_types"] == ["DTensor", "Tensor"]  # sharded moments stay DTensors, step counts stay plain


# ------------------------------------------------------------------------------------------ checkpoints
def test_rotation_keeps_the_newest_checkpoints_by_count_and_by_size(train):
    r = both(train[1], "rotation")
    assert r["by_count"] == ["t2", "t3"]  # max_num=2
    assert r["by_size"] == ["t2", "t3"]  # max_mem of 2.5 checkpoints, max_num=10
    assert r["visible"] == ["t2", "t3"]


def test_a_run_killed_right_after_a_transition_resumes_bit_exactly_from_the_latest_checkpoint(train, resume):
    assert both(train[1], "killed") == {"killed_at_epoch": 2, "depth": 1}
    assert both(resume, "saved") == ["epoch0", "epoch1", "epoch2"]
    for rank in resume:
        full, resumed = rank["full"], rank["from_latest"]
        assert resumed["history"] == full["history"] == [[0, 0, 3, True], [1, 3, 4, True], [2, 4, None, False]]
        assert resumed["groups"] == full["groups"]
        assert resumed["params"] == full["params"]  # exact: resume against the uninterrupted run


def test_resuming_mid_phase_brings_back_the_restore_best_snapshot(resume):
    for rank in resume:  # epoch 1's snapshot is restored at the transition after epoch 2; exact
        assert rank["from_mid_phase"]["params"] == rank["full"]["params"]


def test_saving_changes_nothing_and_a_save_right_after_the_second_transition_resumes_exactly(resume):
    for rank in resume:  # exact: a run that saved, and a resume, against the uninterrupted run
        assert rank["saving"]["params"] == rank["full"]["params"]
        assert rank["from_second_transition"]["params"] == rank["full"]["params"]


# ------------------------------------------------------------------------------------------ export and init
@pytest.mark.numerical
@pytest.mark.launched
def test_save_model_output_reloads_with_from_pretrained_and_gives_the_same_logits(resume):
    r = resume[0]["minilm"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(r["files"])
    # numerical: the sharded model's forward against the reloaded one's in one process (other tensors, other
    # kernels' blocking); MiniLM's 6 layers, sums of up to 1536 terms, logits below 1
    assert r["reload_diff"] <= float32_drift(6, 1536), r["reload_diff"]


def test_hugging_face_blocks_from_no_split_modules_become_fsdp_units(resume):
    assert both(resume, "minilm", "units")["units"] == ["FSDPBertEmbeddings", "FSDPBertForSequenceClassification",
                                               "FSDPBertLayer"]


def test_a_meta_initialized_model_is_materialized_from_a_full_state_dict(resume):
    r = both(resume, "minilm", "meta_params_before", "meta_equal")
    assert r["meta_params_before"] == 105 and r["meta_equal"]  # exact: the same sharded model's logits


def test_models_without_save_pretrained_are_exported_as_plain_safetensors(resume):
    assert both(resume, "minilm", "plain_export_exact")["plain_export_exact"]  # exact: the export holds the bits


def test_the_documented_loop_runs_under_torchrun(resume):
    r = both(resume, "doc_loop")
    assert r == {"depth": 2, "checkpoints": ["epoch4", "epoch5"], "exported": ["model.safetensors"]}


# ------------------------------------------------------------------------------------------ one process
def sharded(**kw):
    st = FSDP2Strategy(**{"seed": 0, "micro_batch_size": 4, "global_batch_size": 4, **kw})
    with st.init_model_context():
        model = TinyLM()
    return st, st.prepare_model(model)


def train_step(st, model, opt):
    ids = torch.randint(0, 32, (4, 8))
    st.backward(nn.functional.cross_entropy(model(ids), ids[:, 0] % 2), model)
    return st.optimizer_step(opt, model)


def test_the_documented_loop_runs_unchanged_on_one_process(one_process):
    code = re.search(r"<!-- tested: .*? -->\s*```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    scope: dict = {"__name__": "__main__"}
    exec(compile(code, str(DOC), "exec"), scope)
    assert scope["ft"].depth == 2 and scope["strategy"].accumulation_steps == 4
    assert [c.tag for c in list_checkpoints(one_process / "checkpoints")] == ["epoch4", "epoch5"]
    assert (one_process / "final" / "model.safetensors").is_file()
    assert not dist.is_initialized()  # teardown() destroyed the group the strategy created


def test_a_global_batch_that_is_no_multiple_of_micro_batch_times_world_is_refused(one_process):
    with pytest.raises(ConfigurationError, match=r"global_batch_size=10 is not a multiple .* use 8 or 12"):
        FSDP2Strategy(micro_batch_size=4, global_batch_size=10)
    assert not dist.is_initialized()


def test_a_save_that_dies_halfway_leaves_no_visible_checkpoint(one_process, monkeypatch):
    st, model = sharded()
    opt = st.create_optimizer(model)
    train_step(st, model, opt)
    st.save_ckpt(model, "ck", "good", optimizer=opt)
    real_save = checkpoint.dcp.save

    def dies_halfway(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoint.dcp, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        st.save_ckpt(model, "ck", "broken", optimizer=opt)
    assert sorted(p.name for p in Path("ck").iterdir() if not p.name.startswith(".")) == ["good"]
    path, _ = st.load_ckpt(model, "ck", optimizer=opt)
    assert path.name == "good"
    monkeypatch.setattr(checkpoint.dcp, "save", real_save)
    st.save_ckpt(model, "ck", "next", optimizer=opt)
    assert sorted(p.name for p in Path("ck").iterdir()) == ["good", "next"]  # the dead save's leftovers are gone


def test_save_ckpt_refuses_to_save_in_the_middle_of_an_accumulation_cycle(one_process):
    st, model = sharded(micro_batch_size=2)
    opt = st.create_optimizer(model)
    assert train_step(st, model, opt) is False
    with pytest.raises(RuntimeError, match="micro-step 1 of an accumulation cycle of 2"):
        st.save_ckpt(model, "ck", optimizer=opt)


def test_loading_a_later_phase_without_the_finetuning_object_says_what_to_pass(one_process):
    st, model = sharded()
    opt = st.create_optimizer(model)
    ft = ScheduledFinetuning(SCHEDULE, model, opt)
    ft.step(0)
    st.save_ckpt(model, "ck", "phase1", finetuning=ft)
    with pytest.raises(ConfigurationError, match="pass finetuning="):
        st.load_ckpt(model, "ck", optimizer=opt)
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint 'nope'.*phase1"):
        st.load_ckpt(model, "ck", finetuning=ft, tag="nope")


def test_create_optimizer_takes_trainable_parameters_without_decay_for_biases_and_norms(one_process):
    st, model = sharded()
    model.embed.weight.requires_grad_(False)
    opt = st.create_optimizer(model, lr=0.1, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == {"head.weight", *(f"layers.{i}.lin.weight" for i in range(4))}
    assert sum(len(g["params"]) for g in opt.param_groups) == 18  # 19 parameters, the frozen embedding left out


def test_prepare_model_refuses_a_unit_mixing_dtypes(one_process):
    st = FSDP2Strategy(micro_batch_size=4, global_batch_size=4)
    model = TinyLM()
    model.layers[1].lin.to(torch.float64)
    with pytest.raises(ConfigurationError, match=r"unit 'layers.1' holds parameters of several dtypes .*float64"):
        st.prepare_model(model)


# ------------------------------------------------------------------------------------------ no process group
def test_block_plan_shards_blocks_and_embeddings_but_not_tied_ones():
    assert list(block_plan(TinyLM(), None)) == ["embed", "layers.0", "layers.1", "layers.2", "layers.3"]

    class Tied(TinyLM):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(16, 32, bias=False)
            self.out.weight = self.embed.weight

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.out

    assert list(block_plan(Tied(), ["Block"])) == ["layers.0", "layers.1", "layers.2", "layers.3"]


def test_block_classes_that_the_model_lacks_are_refused_with_suggestions():
    with pytest.raises(ConfigurationError, match="'Blok' is not a module class of TinyLM; did you mean 'Block'"):
        block_plan(TinyLM(), ["Blok"])


def test_unit_dtype_problems_name_the_unit_and_an_example_of_each_dtype():
    model = TinyLM()
    model.head.bias.data = model.head.bias.data.double()
    (problem,) = unit_dtype_problems(model, ["layers.0", ""])
    assert "'<root>'" in problem and "float64 e.g. 'head.bias'" in problem and "float32 e.g. 'embed.weight'" in problem


def _fake_ckpt(root: Path, tag: str, seq: int, nbytes: int) -> None:
    (root / tag).mkdir(parents=True)
    (root / tag / "data").write_bytes(b"x" * nbytes)
    (root / tag / checkpoint.META_FILE).write_text(f'{{"seq": {seq}}}')


def test_rotation_deletes_the_oldest_by_save_order_until_count_and_size_fit(tmp_path):
    for seq, tag in enumerate(["b", "a", "d", "c"]):  # names sort differently from save order
        _fake_ckpt(tmp_path, tag, seq, 1000)
    (tmp_path / ".partial-e-1").mkdir()  # an unfinished save is never listed nor counted
    assert [c.tag for c in list_checkpoints(tmp_path)] == ["b", "a", "d", "c"]
    checkpoint.rotate(tmp_path, max_num=3, max_mem_gib=1.0)
    assert [c.tag for c in list_checkpoints(tmp_path)] == ["a", "d", "c"]
    checkpoint.rotate(tmp_path, max_num=3, max_mem_gib=2100 / 1024**3)
    assert [c.tag for c in list_checkpoints(tmp_path)] == ["d", "c"]
    checkpoint.rotate(tmp_path, max_num=3, max_mem_gib=10 / 1024**3)  # the newest stays even when too big
    assert [c.tag for c in list_checkpoints(tmp_path)] == ["c"]


def test_the_strategy_reads_torchruns_environment_and_picks_gloo_on_cpu(one_process):
    st = FSDP2Strategy(micro_batch_size=2, global_batch_size=4)
    assert (st.rank, st.world_size, st.device.type, st.accumulation_steps) == (0, 1, "cpu", 2)
    assert dist.get_backend() == "gloo" and st.env.owns_group and "WORLD_SIZE" not in os.environ


def test_an_fsdp_plan_with_activation_checkpointing_keeps_the_schedules_names(one_process):
    st = FSDP2Strategy(micro_batch_size=2, global_batch_size=4)
    with st.init_model_context():
        model = TinyLM()
    model = st.prepare_model(model, fsdp_plan={r"layers\.\d+": {"act_ckpt": "wrapped"}})
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    opt = st.create_optimizer(model, lr=0.1)
    ft = ScheduledFinetuning(SCHEDULE, model, opt)
    ft.step(0)
    ft.step(1)
    before = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}
    assert [train_step(st, model, ft.optimizer) for _ in range(2)] == [False, True]
    assert all(not torch.equal(p.detach().full_tensor(), before[n]) for n, p in model.named_parameters())  # exact


def test_a_skipped_non_finite_step_is_reported(one_process, caplog):
    st, model = sharded(max_norm=1.0)
    opt = st.create_optimizer(model)
    ids = torch.randint(0, 32, (4, 8))
    st.backward(model(ids).sum() * float("inf"), model)
    with caplog.at_level("WARNING", logger="phasetune"):
        assert st.optimizer_step(opt, model) is False
    assert "optimizer step 0 skipped: the gradient norm is" in caplog.text and st.skipped_steps == 1


def test_a_meta_initialized_model_without_weights_is_refused_before_sharding(one_process):
    st = FSDP2Strategy(micro_batch_size=4, global_batch_size=4)
    with st.init_model_context(meta_init=True):
        model = TinyLM()
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(ConfigurationError, match="19 parameters on the meta device"):
        st.prepare_model(model)
    with pytest.raises(ConfigurationError, match=r"lacks 2 parameter\(s\): 'head.weight', 'head.bias'"):
        st.prepare_model(model, state_dict={n: p for n, p in TinyLM().state_dict().items() if "head" not in n})
    assert not any(type(m).__name__.startswith("FSDP") for m in model.modules())  # nothing was sharded
