"""Fake = real: the memory plan's forward/backward peaks under fake tensors against the same run on real tensors.

For three models -- a transformer-shaped MLP (tests/data/plan/plan_models.py), a tiny Hugging Face Llama and a
tiny BERT built from their configs (tests/data/plan/tiny_*.json) -- three phases each (head; the top half of the
blocks; the rest), FSDP2 on fake process groups of 1, 2, 4 and 8 ranks, activation checkpointing off and on:
plan_memory(tensors="fake") and plan_memory(tensors="real") simulate the same phases, and the ratio of their
forward/backward peaks is printed (target: within 1%). Real tensors allocate for real (collectives on the fake
group move no data, so values are meaningless but every byte is there). Also printed: whether peaks grow with
thaw depth and checkpointing lowers activations.

    python bench/plan_fidelity.py            # 3 models x 4 world sizes x 2 = 24 pairs of plans
    python bench/plan_fidelity.py --quick    # world size 2, checkpointing off
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "plan"

MODELS = {
    "mlp": ("plan_models:net", {0: {"params": ["head.*", "norm.*"]}, 1: {"params": [r"layers\.[23]\..*"]},
                                2: {"params": [r"layers\.[01]\..*", "embed.*"]}}),
    "hf-llama": (str(DATA / "tiny_llama.json"), {
        0: {"params": ["lm_head.weight", "model.norm.weight"]},
        1: {"params": [r"model\.layers\.[23]\..*"]},
        2: {"params": [r"model\.layers\.[01]\..*", "model.embed_tokens.weight"]}}),
    "hf-bert": (str(DATA / "tiny_bert.json"), {
        0: {"params": [r"cls\..*"]},
        1: {"params": [r"bert\.encoder\.layer\.[23]\..*"]},
        2: {"params": [r"bert\.encoder\.layer\.[01]\..*", r"bert\.embeddings\..*"]}}),
}
#: BERT's word embeddings are tied to its MLM decoder, so they share the root unit; the default block plan would
#: make BertEmbeddings (listed in _no_split_modules) a unit of its own, which FSDP2 refuses for a tied weight
FSDP_PLANS = {"hf-bert": {r"bert\.encoder\.layer\.\d+": {}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="world size 2 and checkpointing off only")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(DATA))
    from phasetune.plan import plan_memory

    worlds = (2,) if args.quick else (1, 2, 4, 8)
    ckpts = (False,) if args.quick else (False, True)
    print(f"{'model':8} {'ranks':>5} {'ckpt':>4} | fake/real forward+backward peak per phase | max |r-1| | grows | s")
    worst, rows, activations = 0.0, 0, {}
    for (name, (model, sched)), world, ckpt in itertools.product(MODELS.items(), worlds, ckpts):
        t = time.perf_counter()
        kw = {"world_size": world, "seq_len": 32, "micro_batch": 2, "act_ckpt": ckpt, "fsdp_plan": FSDP_PLANS.get(name)}
        fake = plan_memory(sched, model, **kw)
        real = plan_memory(sched, model, tensors="real", **kw)
        if any(p.source != "simulated" for p in fake.phases + real.phases):
            sys.exit(f"{name} at {world} ranks did not simulate: {fake.notes + real.notes}")
        ratios = [f.forward_backward_peak / r.forward_backward_peak for f, r in zip(fake.phases, real.phases)]
        dev = max(abs(r - 1) for r in ratios)
        worst = max(worst, dev)
        peaks = [p.peak for p in fake.phases]
        grows = all(a < b for a, b in itertools.pairwise(peaks))
        activations[(name, world, ckpt)] = [p.activations for p in fake.phases]
        rows += 1
        print(f"{name:8} {world:>5} {'on' if ckpt else 'off':>4} | " + "  ".join(f"{r:.6f}" for r in ratios)
              + f" | {dev:.2e} | {'yes' if grows else 'NO'} | {time.perf_counter() - t:.1f}")
    print(f"\n{rows} configurations x 3 phases: largest |fake/real - 1| = {worst:.2e} (target <= 1e-2)")
    if not args.quick:
        lower = [(k, a, activations[(k[0], k[1], True)]) for k, a in activations.items() if not k[2]]
        ok = all(on[-1] < off[-1] for _, off, on in lower)
        print("checkpointing lowers the activations of the full phase: " + ("yes" if ok else "NO") + "; " + ", ".join(
            f"{k[0]}@{k[1]} {off[-1] / 2**20:.2f}->{on[-1] / 2**20:.2f} MiB" for k, off, on in lower[:4]) + " ...")


if __name__ == "__main__":
    main()
