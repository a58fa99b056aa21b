"""Memory plans at scale: Llama-3-8B on 8 fake ranks and Llama-3-70B on 64, with the time and RAM they take.

Both configs are the real Llama-3 dimensions (bench/plan_configs/*.json; no weights, no download). Each plan
builds the model under fake tensors, shards it with phasetune's fsdp_plan code (one unit per decoder layer, the
embedding and the head; the root last) and simulates every phase of bench/plan_configs/llama3_8b_schedule.yaml
(the 70B run uses the same three-phase shape: head, top 4 layers, the rest). Printed: each plan's table, its
wall and CPU time and the process's peak RSS, and three checks with their numbers -- peaks grow with thaw depth,
activation checkpointing lowers activations, and the planned peak of each phase against full fine-tuning.

    python bench/plan_scale.py            # 8B (device 80 GiB, global batch 32, micro-batch search), 8B with
                                          # checkpointing, 70B on 64 ranks
    python bench/plan_scale.py --quick    # 8B without the micro-batch search only
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "plan_configs"
SCHEDULE_8B = CONFIGS / "llama3_8b_schedule.yaml"
GiB = 1 << 30


def schedule_70b() -> dict[int, dict]:
    return {
        0: {"params": ["lm_head.weight", "model.norm.weight"]},
        1: {"params": [r"model\.layers\.(76|77|78|79)\..*"]},
        2: {"params": [r"model\.layers\.([0-9]|[1-6][0-9]|7[0-5])\..*", "model.embed_tokens.weight"]},
    }


def timed(label: str, fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    print(f"[{label}] wall {wall:.1f} s, CPU {cpu:.1f} s, peak RSS of this process so far {rss:.2f} GiB "
          f"(load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    return out, wall, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8B only, without the micro-batch search")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from phasetune.plan import plan_memory

    common = {"world_size": 8, "seq_len": 2048, "micro_batch": 2, "mixed_precision": "bf16", "device_gib": 80}
    if args.quick:
        common["search_micro_batch"] = False
    else:
        common["global_batch"] = 32
    plan8, wall8, rss8 = timed("Llama-3-8B, 8 ranks", lambda: plan_memory(str(SCHEDULE_8B), str(CONFIGS / "llama3_8b.json"),
                                                                         **common))
    print(plan8.table())
    peaks = [p.peak for p in plan8.phases]
    print(f"\ncheck: peaks grow with thaw depth: {' < '.join(f'{p / GiB:.2f}' for p in peaks)} GiB -> "
          f"{'yes' if all(a < b for a, b in itertools.pairwise(peaks)) else 'NO'}")
    full = plan8.phases[-1].peak  # the last phase trains every parameter: full fine-tuning's footprint
    print("planned peak / full fine-tuning peak per phase: "
          + ", ".join(f"phase {p.phase} {p.peak / full:.3f}" for p in plan8.phases)
          + " (measured ratios need a GPU: bench/gpu_check.py)")
    print(f"budget check: 8B plan took {wall8:.1f} s wall (target <= 180 s) and {rss8:.2f} GiB peak RSS (target <= 4)")
    if args.quick:
        return
    no_search = {**common, "search_micro_batch": False, "global_batch": None}
    ckpt, _, _ = timed("Llama-3-8B, 8 ranks, activation checkpointing",
                       lambda: plan_memory(str(SCHEDULE_8B), str(CONFIGS / "llama3_8b.json"), act_ckpt=True, **no_search))
    plain, _, _ = timed("Llama-3-8B, 8 ranks, no checkpointing",
                        lambda: plan_memory(str(SCHEDULE_8B), str(CONFIGS / "llama3_8b.json"), **no_search))
    print("check: activation checkpointing lowers activations at the peak: " + ", ".join(
        f"phase {a.phase} {a.activations / GiB:.2f} -> {b.activations / GiB:.2f} GiB" for a, b in zip(plain.phases, ckpt.phases)))
    plan70, wall70, rss70 = timed("Llama-3-70B, 64 ranks", lambda: plan_memory(
        schedule_70b(), str(CONFIGS / "llama3_70b.json"), **{**no_search, "world_size": 64}))
    print(plan70.table())
    print(f"\n70B on 64 ranks: {wall70:.1f} s wall, {rss70:.2f} GiB peak RSS")


if __name__ == "__main__":
    sys.exit(main())
