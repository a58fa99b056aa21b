"""FSDP2Strategy against a hand-written FSDP2 loop on the same model, and checkpoint cost per phase.

Both variants shard the same units (one per block, the embedding, the root), use AdamW with the same two
groups (decay / no decay), 2 accumulation micro-steps without gradient sync on the first, and clip to one
global norm of 1.0. Timing alternates the variants step by step in one ``torchrun`` launch so machine noise
hits both alike (median step time per variant and their ratio); the one computation that differs, the
global-norm clipping, is also timed alone against ``torch.nn.utils.clip_grad_norm_``. Memory per rank is
measured twice: exact bytes of this rank's tensors (parameter shards, gradients, optimizer state) in the
timing run, and peak RSS growth (CPU) or peak allocated memory (CUDA) in one launch per variant. A 3-phase
ScheduledFinetuning saves a checkpoint in each phase and loads it into fresh objects (time and bytes; a raw
``dcp.save`` of the same state dicts for comparison).

    python bench/strategy_step.py [--nproc 2] [--rounds 40] [--steps 1] [--width 128] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ, MICRO, ACCUM = 2048, 32, 8, 2


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Model(nn.Module):
    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h).mean(dim=1))


def batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)
        yield ids, ids[:, 0] % 2


# ------------------------------------------------------------------------------------------ the two variants
class StrategyLoop:
    def __init__(self, args) -> None:
        from phasetune import FSDP2Strategy

        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.st = FSDP2Strategy(seed=0, max_norm=1.0, micro_batch_size=MICRO, global_batch_size=MICRO * ACCUM * world)
        with self.st.init_model_context():
            model = Model(args.width, args.layers)
        self.model = self.st.prepare_model(model, block_classes=[Block])
        self.opt = self.st.create_optimizer(self.model, lr=1e-4, weight_decay=0.01)

    def step(self, data) -> None:
        for _ in range(ACCUM):
            ids, y = next(data)
            self.st.backward(F.cross_entropy(self.model(ids), y), self.model)
            self.st.optimizer_step(self.opt, self.model)


class ManualLoop:
    """What one writes by hand with torch's FSDP2 API."""

    def __init__(self, args) -> None:
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        self.model = Model(args.width, args.layers)
        fully_shard(self.model.embed)
        for b in self.model.blocks:
            fully_shard(b)
        fully_shard(self.model)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and not n.endswith("bias")]
        rest = [p for n, p in self.model.named_parameters() if not (p.dim() >= 2 and not n.endswith("bias"))]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                     lr=1e-4)

    def step(self, data) -> None:
        for i in range(ACCUM):
            ids, y = next(data)
            self.model.set_requires_gradient_sync(i == ACCUM - 1)
            (F.cross_entropy(self.model(ids), y) / ACCUM).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


VARIANTS = {"strategy": StrategyLoop, "manual": ManualLoop}


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def tensor_bytes(loop) -> dict[str, int]:
    params = sum(local_bytes(p) for p in loop.model.parameters())
    state = sum(local_bytes(v) for s in loop.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return {"params": params, "grads": params, "optimizer": state, "total": 2 * params + state}


def peak_memory() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------ worker parts
def timing(args) -> dict:
    loops = {name: cls(args) for name, cls in VARIANTS.items()}
    data = {name: batches(1) for name in loops}
    for loop_name, loop in loops.items():  # warm-up
        for _ in range(2):
            loop.step(data[loop_name])
    times: dict[str, list[float]] = {name: [] for name in loops}
    order = list(loops)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            for _ in range(args.steps):
                torch.distributed.barrier()
                t0 = time.perf_counter()
                loops[name].step(data[name])
                times[name].append(time.perf_counter() - t0)
    return {"times": times, "bytes": {name: tensor_bytes(loop) for name, loop in loops.items()},
            "clip": clip_times(loops["manual"])}


def clip_times(loop, reps: int = 100) -> dict[str, float]:
    """The one computation that differs: phasetune's global-norm clipping vs torch's (one mesh, where torch's works)."""
    from phasetune.sharding import clip_grad_norm_

    ids, y = next(batches(3))
    F.cross_entropy(loop.model(ids), y).backward()
    params = list(loop.model.parameters())
    fns = {"phasetune": lambda: clip_grad_norm_(params, 1e9), "torch": lambda: torch.nn.utils.clip_grad_norm_(params, 1e9)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for k in (list(fns) if r % 2 else list(fns)[::-1]):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    loop.opt.zero_grad(set_to_none=True)
    return {k: statistics.median(v) for k, v in times.items()}


def memory(args, variant: str) -> dict:
    base = peak_memory()
    loop = VARIANTS[variant](args)
    data = batches(1)
    for _ in range(3):
        loop.step(data)
    return {"peak_growth": peak_memory() - base}


def checkpoints(args) -> list[dict]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from phasetune import ScheduledFinetuning
    from phasetune.loop.strategy.checkpoint_dirs import dir_bytes

    last = args.layers - 1
    schedule = {
        0: {"params": ["head.*", "norm.*"], "max_transition_epoch": 1},
        1: {"params": [rf"blocks\.{last}\..*"], "lr": 1e-4, "max_transition_epoch": 2},
        2: {"params": [rf"blocks\.(?!{last}\.)\d+\..*", "embed.*"], "lr": 5e-5},
    }

    def build():
        loop = StrategyLoop(args)
        return loop, ScheduledFinetuning(schedule, loop.model, loop.opt)

    loop, ft = build()
    root = Path(args.ckpt_dir)
    data = batches(2)
    rows = []
    for depth in range(3):
        if depth:
            ft.step(depth - 1)  # the phase's max_transition_epoch: thaw the next phase
        for _ in range(2):
            loop.step(data)
        t0 = time.perf_counter()
        path = loop.st.save_ckpt(loop.model, root, f"phase{depth}", finetuning=ft, max_num=10)
        save_s = time.perf_counter() - t0
        raw_dir = root / f".raw{depth}"
        torch.distributed.barrier()
        t0 = time.perf_counter()
        dcp.save({"model": get_model_state_dict(loop.model), "optim": get_optimizer_state_dict(loop.model, loop.opt)},
                 checkpoint_id=str(raw_dir))
        raw_s = time.perf_counter() - t0
        fresh, fresh_ft = build()
        torch.distributed.barrier()
        t0 = time.perf_counter()
        fresh.st.load_ckpt(fresh.model, root, finetuning=fresh_ft, tag=f"phase{depth}")
        load_s = time.perf_counter() - t0
        trainable = sum(p.numel() for p in loop.model.parameters() if p.requires_grad)
        rows.append({"depth": ft.depth, "trainable": trainable, "save_s": save_s, "raw_save_s": raw_s,
                     "load_s": load_s, "bytes": dir_bytes(path) if torch.distributed.get_rank() == 0 else 0,
                     "raw_bytes": dir_bytes(raw_dir) if torch.distributed.get_rank() == 0 else 0})
    return rows


def worker(args) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("phasetune").setLevel(logging.WARNING)
    from phasetune.loop.strategy.distributed import init_distributed

    init_distributed()
    if args.part == "timing":
        out = {"timing": timing(args), "checkpoints": checkpoints(args)}
    else:
        out = memory(args, args.part)
    rank = int(os.environ.get("RANK", "0"))
    Path(args.out, f"{args.part}.rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------ driver
def launch(args, part: str, out: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", __file__,
           "--part", part, "--out", str(out), "--width", str(args.width), "--layers", str(args.layers),
           "--rounds", str(args.rounds), "--steps", str(args.steps), "--threads", str(args.threads),
           "--ckpt-dir", str(out / "ckpt")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{part} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def mib(n: float) -> str:
    return f"{n / 2**20:8.2f} MiB"


def main(args) -> None:
    out = Path(tempfile.mkdtemp(prefix="phasetune_bench_"))
    try:
        for part in ("timing", "strategy", "manual"):
            launch(args, part, out)
        ranks = range(args.nproc)
        timing_runs = [json.loads((out / f"timing.rank{r}.json").read_text()) for r in ranks]
        mem = {v: [json.loads((out / f"{v}.rank{r}.json").read_text())["peak_growth"] for r in ranks]
               for v in ("strategy", "manual")}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    t = timing_runs[0]["timing"]
    print(f"model: width {args.width}, {args.layers} blocks, vocab {VOCAB}; {args.nproc} ranks, micro-batch {MICRO} x "
          f"{ACCUM} accumulation micro-steps, AdamW, clipping at 1.0; device "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}, {args.threads} thread(s) per rank")
    n = args.steps
    print(f"\nstep time ({args.rounds} interleaved rounds x {n} steps per variant, rank 0)")
    med = {v: statistics.median(ts) for v, ts in t["times"].items()}
    low = {v: min(ts) for v, ts in t["times"].items()}
    for v in ("manual", "strategy"):
        ts = t["times"][v]
        print(f"  {v:9s} median {med[v] * 1e3:7.1f} ms   min {low[v] * 1e3:7.1f} ms   "
              f"p90 {statistics.quantiles(ts, n=10)[-1] * 1e3:7.1f} ms")
    paired = [statistics.mean(t["times"]["strategy"][i:i + n]) / statistics.mean(t["times"]["manual"][i:i + n])
              for i in range(0, len(t["times"]["manual"]), n)]
    print(f"  ratio strategy / manual: median {med['strategy'] / med['manual']:.3f}, min {low['strategy'] / low['manual']:.3f}, "
          f"median of per-round ratios {statistics.median(paired):.3f}")
    c = t["clip"]
    print(f"  clipping alone (median of 100): phasetune {c['phasetune'] * 1e3:.2f} ms, torch clip_grad_norm_ "
          f"{c['torch'] * 1e3:.2f} ms, difference {(c['phasetune'] - c['torch']) / med['manual'] * 100:+.1f}% of a step")
    print("\nmemory per rank")
    for r in ranks:
        b = timing_runs[r]["timing"]["bytes"]
        print(f"  rank {r} tensors (params+grads+optimizer state): manual {mib(b['manual']['total'])}, strategy "
              f"{mib(b['strategy']['total'])}, ratio {b['strategy']['total'] / b['manual']['total']:.3f}")
    kind = "peak allocated" if torch.cuda.is_available() else "peak RSS growth"
    for r in ranks:
        print(f"  rank {r} {kind} (one launch per variant): manual {mib(mem['manual'][r])}, strategy "
              f"{mib(mem['strategy'][r])}, ratio {mem['strategy'][r] / max(mem['manual'][r], 1):.3f}")
    print("\ncheckpoints of a 3-phase ScheduledFinetuning (rank 0 times; bytes on disk, all ranks)")
    print(f"  {'phase':>5} {'trainable':>10} {'save':>8} {'raw dcp.save':>13} {'load':>8} {'bytes':>12} {'raw bytes':>12}")
    for row in timing_runs[0]["checkpoints"]:
        print(f"  {row['depth']:>5} {row['trainable']:>10,} {row['save_s']:>7.3f}s {row['raw_save_s']:>12.3f}s "
              f"{row['load_s']:>7.3f}s {row['bytes']:>12,} {row['raw_bytes']:>12,}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt-dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.part is None:
        main(a)
    else:
        worker(a)
