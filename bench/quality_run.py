"""One run of bench/quality.py, in its own process: ``python bench/quality_run.py '<JSON config>'`` trains one arm
with one seed and prints one JSON line (metrics, and the training loop's CPU time, wall time and peak memory).

The config: ``task`` (rt or debates), ``seed``, ``steps``, ``batch``, ``arm`` and, with ``test``, the test split
read at the end too. ``arm: baseline`` takes ``lr``; ``arm: lpft`` takes ``head_lr`` (the lr of the user's
optimizer, the head's in phase 0), ``body_lr``, ``head_fraction``, ``stem`` (frozen or body) and optionally
``ft_head_lr`` (the head's lr in phase 1 instead of ``head_lr``) and ``top_blocks`` (the body phase thaws only
the top k encoder layers).
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

MAX_LENGTH, WARMUP = 48, 0.1
NO_DECAY = ("bias", "LayerNorm.weight")



def load_task(task: str, tokenizer: Any) -> dict[str, Any]:
    """Encoded train / val / test sets of ``task`` (fixed split, seed 42)."""
    from examples.rotten_tomatoes import data

    if task == "rt":
        texts, labels = data.load_snippets()
        split = data.stratified_split(labels, 500, 1000, seed=42)
    elif task == "debates":  # statements of the four candidates; the moderators' are dropped
        path = data.data_file().parent / "presidential_debates_2016.csv.gz"
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r["party"] in ("Republican", "Democratic")]
        texts = [r["statement"].strip() for r in rows]
        labels = [int(r["party"] == "Democratic") for r in rows]
        split = data.stratified_split(labels, 150, 250, seed=42)
    else:
        raise SystemExit(f"unknown task {task!r}: rt or debates")
    ids = tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    return {name: data.Encoded([ids[i] for i in idx], [labels[i] for i in idx])
            for name, idx in (("train", split.train), ("val", split.val), ("test", split.test))}


def evaluate(model: Any, dataset: Any, pad_id: int) -> dict[str, float]:
    import torch

    from examples.rotten_tomatoes.data import pad_batch

    loader = torch.utils.data.DataLoader(dataset, batch_size=64, collate_fn=functools.partial(pad_batch, pad_id=pad_id))
    model.eval()
    loss = correct = n = 0.0
    with torch.no_grad():
        for b in loader:
            out = model(**b)
            k = len(b["labels"])
            loss += float(out.loss) * k
            correct += float((out.logits.argmax(-1) == b["labels"]).sum())
            n += k
    model.train()
    return {"acc": correct / n, "loss": loss / n}


def lpft_schedule(model: Any, cfg: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The candidate default's schedule for ``model``: head, then the body, each phase with its own lr shape."""
    from phasetune.core.generate import block_units
    from phasetune.core.recipes import WARMUP_LINEAR_DECAY, apply_recipe, phase_lr_shape, split_budget

    units, has_stem = block_units(model)
    head, blocks, stem = units[0], units[1:-1] if has_stem else units[1:], units[-1:] if has_stem else []
    if cfg.get("top_blocks"):
        blocks = blocks[: cfg["top_blocks"]]
    phase_steps = split_budget(cfg["steps"], 2, cfg["head_fraction"], "lpft")
    options = {"ft_head_lr": cfg["ft_head_lr"], "head_groups": 2} if "ft_head_lr" in cfg else {}
    schedule = apply_recipe("lpft", [head, *blocks, *(stem if cfg["stem"] == "body" else [])], has_stem=False,
                            lr=cfg["body_lr"], phase_steps=phase_steps, warmup_fraction=WARMUP, **options)
    schedule[0]["new_lr_scheduler"] = {  # phase 0's shape over its own steps, replacing the user's scheduler
        "lr_scheduler_init": {"class_path": WARMUP_LINEAR_DECAY, "init_args": phase_lr_shape(phase_steps[0], WARMUP)},
        "pl_lrs_cfg": {"interval": "step"}}
    return schedule


def run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one arm with one seed as ``cfg`` says; return metrics and the training loop's costs."""
    import torch
    import transformers

    from examples.rotten_tomatoes.data import model_dir, pad_batch
    from phasetune import ScheduledFinetuning
    from phasetune.core.recipes import phase_lr_shape
    from phasetune.features.peak_memory import PeakMemory
    from phasetune.lr_shapes import WarmupLinearDecay

    torch.set_num_threads(cfg.get("threads", 2))
    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir()))
    pad_id = tokenizer.pad_token_id or 0
    sets = load_task(cfg["task"], tokenizer)
    torch.manual_seed(cfg["seed"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(model_dir()), num_labels=2)
    model.train()
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if not any(s in n for s in NO_DECAY)], "weight_decay": 0.01},
              {"params": [p for n, p in named if any(s in n for s in NO_DECAY)], "weight_decay": 0.0}]
    steps, ft = cfg["steps"], None
    if cfg["arm"] == "baseline":
        opt = torch.optim.AdamW(groups, lr=cfg["lr"])
        sched = WarmupLinearDecay(opt, **phase_lr_shape(steps, WARMUP))
    else:  # the user's optimizer, no scheduler: the schedule brings every phase's
        opt = torch.optim.AdamW(groups, lr=cfg["head_lr"])
        ft = ScheduledFinetuning(lpft_schedule(model, cfg), model, opt, None, epoch_transitions_only=True,
                                 restore_best=False, no_decay=list(NO_DECAY))
        opt, sched = ft.optimizer, ft.lr_scheduler
    g = torch.Generator().manual_seed(cfg["seed"])
    loader = torch.utils.data.DataLoader(sets["train"], batch_size=cfg["batch"], shuffle=True, generator=g,
                                         collate_fn=functools.partial(pad_batch, pad_id=pad_id))
    batches, train_loss, phase_cpu = iter(()), [], []
    peak = PeakMemory()
    rss0, load0 = _rss(), os.getloadavg()[0]
    peak.reset()
    wall0 = time.perf_counter()
    cpu0 = mark = time.process_time()
    for _ in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_loss.append(float(loss.detach()))
        if ft is not None and ft.step_end() is not None:
            now = time.process_time()
            phase_cpu.append(now - mark)
            mark = now
            opt, sched = ft.optimizer, ft.lr_scheduler
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    phase_cpu.append(cpu0 + cpu - mark)
    if ft is not None and not ft.done:
        ft.close()
    out = {**cfg, "cpu_s": cpu, "wall_s": wall, "phase_cpu_s": phase_cpu, "peak_rss": peak.read(), "rss_before": rss0,
           "load_before": load0, "load_after": os.getloadavg()[0], "train_loss_last10": sum(train_loss[-10:]) / 10}
    out.update({f"val_{k}": v for k, v in evaluate(model, sets["val"], pad_id).items()})
    if cfg.get("test"):
        out.update({f"test_{k}": v for k, v in evaluate(model, sets["test"], pad_id).items()})
    return out


def _rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None




if __name__ == "__main__":
    print(json.dumps(run_one(json.loads(sys.argv[1]))))
