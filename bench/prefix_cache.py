"""Phase-0 step time of the demo with and without the frozen-prefix output cache.

The demo's model (all-MiniLM-L6-v2 + a new classifier, ``examples/rotten_tomatoes``) trains phase 0 of its
schedule (pooler + classifier; embeddings and the 6 encoder layers frozen) on ``--train_size`` Rotten Tomatoes
snippets for ``--epochs`` epochs, twice in one process: without the cache (the prefix in eval mode, as the
cached run has it) and with it. Epoch 1 of the cached run fills the cache; the steps of the later epochs are
the ones compared. Printed: median step time of each run over epochs 2.. (wall clock, and the process's CPU
time, steadier on a shared machine), their ratios, the first epoch of each, the memory the cache holds, and the
largest difference between the two runs' final parameters.

    python bench/prefix_cache.py [--train_size 256] [--epochs 2] [--threads 2]

The cache pays only when a phase sees a sample more than once. The demo as configured (``demo.yaml``) draws
each "epoch" as 8 batches of a reshuffled 3,366-snippet set, so its phase 0 almost never sees a snippet twice:
there the cache cannot help; this benchmark uses full passes over a smaller training set.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from phasetune import resolve_schedule
from phasetune.features.prefix_cache.cache import IndexedCollate, IndexedDataset, PrefixCache, find_prefix_end

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = ROOT / "examples" / "rotten_tomatoes" / "schedule.yaml"
sys.path.insert(0, str(ROOT))  # the demo's model and data live in examples/ (not an installed package)


def phase0_run(data: Any, args: argparse.Namespace, cached: bool) -> tuple[list[list[tuple[float, float]]], dict, str]:
    """Per-epoch (wall, process CPU) step times of phase 0, the final trainable parameters and the cache's
    description."""
    from examples.rotten_tomatoes.data import pad_batch
    from examples.rotten_tomatoes.model import SentimentClassifier

    torch.manual_seed(0)
    module = SentimentClassifier(lr=1e-3)
    names = [n for n, _ in module.named_parameters()]
    trainable = set(resolve_schedule(SCHEDULE, names).params_through(0))
    for n, p in module.named_parameters():
        p.requires_grad_(n in trainable)
    optimizer = module.configure_optimizers()
    prefix_end = find_prefix_end(module, trainable)
    frozen = [module.get_submodule(n) for n in ("model.bert.embeddings", "model.bert.encoder")]
    loader = DataLoader(IndexedDataset(data.sets["train"]), batch_size=args.batch_size, shuffle=True,
                        collate_fn=IndexedCollate(functools.partial(pad_batch, pad_id=data.pad_id)),
                        generator=torch.Generator().manual_seed(1))
    cache = PrefixCache(module, prefix_end, limit_bytes=args.limit_mb << 20).activate() if cached else None
    times: list[list[tuple[float, float]]] = []
    for _ in range(args.epochs):
        module.train()
        for m in frozen if cache is None else ():
            m.eval()  # the reference: the same prefix in eval mode, computed every step
        times.append([])
        for batch in loader:
            start, cpu = time.perf_counter(), time.process_time()
            loss = module(batch).loss  # the batch carries "sample_index": the cache finds it
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times[-1].append((time.perf_counter() - start, time.process_time() - cpu))
    described = cache.describe() if cache is not None else ""
    memory = cache.memory() if cache is not None else {}
    if cache is not None:
        cache.close()
    params = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return times, {"params": params, "memory": memory, "prefix_end": prefix_end}, described


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit_mb", type=int, default=1024)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: epoch 1 fills the cache")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    from examples.rotten_tomatoes.data import RottenTomatoes

    data = RottenTomatoes(max_length=48, batch_size=args.batch_size, train_size=args.train_size)
    data.setup("fit")

    plain_t, plain, _ = phase0_run(data, args, cached=False)
    cached_t, cached, described = phase0_run(data, args, cached=True)
    def later(ts: list[list[tuple[float, float]]], k: int) -> float:
        return statistics.median(t[k] for epoch in ts[1:] for t in epoch)

    steps = len(plain_t[0])
    diff = max((plain["params"][n] - cached["params"][n]).abs().max().item() for n in plain["params"])
    mem = cached["memory"]
    print(f"phase 0 of the demo: {args.train_size} snippets, batch {args.batch_size}, {steps} steps per epoch, "
          f"{args.epochs} epochs, {args.threads} threads; prefix up to {cached['prefix_end']}")
    for k, clock in enumerate(("wall clock", "process CPU time")):
        print(f"  step, epochs 2..{args.epochs} (median {clock}): without cache {later(plain_t, k) * 1e3:.1f} ms, "
              f"with cache {later(cached_t, k) * 1e3:.1f} ms -> {later(plain_t, k) / later(cached_t, k):.1f}x faster")
    print(f"  epoch 1 (fills the cache, wall clock): without {sum(t[0] for t in plain_t[0]):.2f} s, "
          f"with {sum(t[0] for t in cached_t[0]):.2f} s")
    print(f"  cache holds {mem['entries']} samples, {mem['ram_bytes'] / 2**20:.1f} MiB in RAM, "
          f"{mem['disk_bytes'] / 2**20:.1f} MiB on disk ({mem['ram_bytes'] / max(mem['entries'], 1) / 1024:.1f} KiB "
          "per snippet)")
    print(f"  {described}")
    print(f"  largest difference between the two runs' final trainable parameters: {diff:.2e}")


if __name__ == "__main__":
    main()
