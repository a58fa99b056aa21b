"""Does ``FinetuningScheduler()`` alone pay off? The implicit default through the real front ends, against tuned
full fine-tuning.

On both tasks of ``bench/quality.py`` (``rt``, the demo's Rotten Tomatoes snippets; ``debates``, 2016 debate
statements; its data loading is reused), all-MiniLM-L6-v2 trains for the same optimizer steps of the same batches
in two arms, each run in its own process, seeds interleaved (A, B for one seed, B, A for the next):

* ``default``: a LightningModule (the demo's ``SentimentClassifier``) whose ``configure_optimizers`` returns AdamW
  at the user's lr (``--user_lr``, 1e-3 as in issue 22's trial) and no lr scheduler, in a ``Trainer`` with
  ``callbacks=[FinetuningScheduler()]``: no schedule, no options. The schedule, its budget and lrs are the
  implicit default's (phasetune.core.recipes.DEFAULT_RULE); FTSEarlyStopping is added as for any user.
* ``baseline``: the same module and Trainer without phasetune, AdamW at the baseline lr ``bench/quality.py``
  chose per task on the validation split (``bench/results/quality_choice.json``), warm-up over 10% of the steps
  then linear decay to 0.

Both validate 4 times a run (``val_check_interval``), keep no checkpoints and are tested on the final weights.
Costs cover the training steps only (from each batch's start to its end: forward, backward, optimizer step,
phasetune's per-step hook): process CPU time (every thread, the robust figure on a shared machine) and wall time;
peak memory is the process's peak resident memory while training (VmHWM), and the memory the training adds (that
peak minus the resident memory before training). Ratios are per seed pair (default / baseline of the same task
and seed), given as mean ± sd (min-max). The same default then runs through the Hugging Face Trainer
(``PhasetuneTrainerCallback()`` alone, ``learning_rate`` the user's lr) on the demo task for one seed.

    python bench/default_payoff.py                          # 5 seeds per task + the Trainer (hours on 2 cores)
    python bench/default_payoff.py --seeds 1 --steps 8      # a quick check of the harness (minutes)
    python bench/default_payoff.py --out bench/results/default_payoff.md   # also write the runs and tables
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import quality  # noqa: E402  (bench/quality.py: tasks, budget, the tuned baseline's lrs)
import quality_run  # noqa: E402  (bench/quality_run.py: the tasks' data, evaluation)

USER_LR = 1e-3
HF_TASK = "rt"
VALIDATIONS = 4


# ------------------------------------------------------------------------------------------ one run (own process)


def run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one arm with one seed on one task as ``cfg`` says; return its metrics and costs."""
    import torch
    import transformers

    from examples.rotten_tomatoes.data import model_dir, pad_batch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(cfg.get("threads", 2))
    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir()))
    pad_id = tokenizer.pad_token_id or 0
    sets = quality_run.load_task(cfg["task"], tokenizer)
    collate = functools.partial(pad_batch, pad_id=pad_id)
    run = _run_hf if cfg["arm"] == "default_hf" else _run_lightning
    model, costs = run(cfg, sets, collate)
    out = {**cfg, **costs}
    out.update({f"val_{k}": v for k, v in quality_run.evaluate(model, sets["val"], pad_id).items()})
    out.update({f"test_{k}": v for k, v in quality_run.evaluate(model, sets["test"], pad_id).items()})
    return out


class _Costs:
    """CPU and wall time of the training steps, and the process's peak memory while training."""

    def __init__(self) -> None:
        from phasetune.features.peak_memory import PeakMemory

        self.cpu = self.wall = 0.0
        self.step_cpu: list[float] = []  # each step's CPU time (the first steps pay for lazy set-up)
        self.peak = PeakMemory()
        self.rss_before: int | None = None
        self._marks = (0.0, 0.0)

    def train_start(self) -> None:
        self.rss_before = quality_run._rss()
        self.peak.reset()

    def step_start(self) -> None:
        self._marks = (time.process_time(), time.perf_counter())

    def step_end(self) -> None:
        self.step_cpu.append(time.process_time() - self._marks[0])
        self.cpu += self.step_cpu[-1]
        self.wall += time.perf_counter() - self._marks[1]

    def result(self, phase_peaks: list[int]) -> dict[str, Any]:
        # phasetune resets the peak at each phase start: the run's peak is the largest of its phases' and ours
        peak = max([p for p in [self.peak.read(), *phase_peaks] if p is not None], default=None)
        return {"cpu_s": self.cpu, "wall_s": self.wall, "peak_rss": peak, "rss_before": self.rss_before,
                "step_cpu_s": [round(t, 3) for t in self.step_cpu], "load_after": os.getloadavg()[0]}


def _run_lightning(cfg: dict[str, Any], sets: dict[str, Any], collate: Any) -> tuple[Any, dict[str, Any]]:
    import lightning.pytorch as pl
    import torch

    from examples.rotten_tomatoes.model import SentimentClassifier
    from phasetune import FinetuningScheduler
    from phasetune.core.recipes import phase_lr_shape

    steps = cfg["steps"]

    class Data(pl.LightningDataModule):
        def train_dataloader(self) -> Any:
            g = torch.Generator().manual_seed(cfg["seed"])
            return torch.utils.data.DataLoader(sets["train"], batch_size=cfg["batch"], shuffle=True, generator=g,
                                               collate_fn=collate)

        def val_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(sets["val"], batch_size=64, collate_fn=collate)

    costs = _Costs()

    class Meter(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            costs.train_start()

        def on_train_batch_start(self, *args: Any) -> None:
            costs.step_start()

        def on_train_batch_end(self, *args: Any) -> None:
            costs.step_end()

    pl.seed_everything(cfg["seed"], verbose=False)  # the classifier's init; the loader's order has its own seed
    if cfg["arm"] == "default":
        module = SentimentClassifier(lr=cfg["user_lr"])  # AdamW at the user's lr, no lr scheduler
        fts = FinetuningScheduler()
        callbacks: list[Any] = [fts, Meter()]
    else:
        shape = phase_lr_shape(steps, quality_run.WARMUP)
        module = SentimentClassifier(lr=cfg["lr"], lr_steps=shape["total_steps"], warmup_steps=shape["warmup_steps"])
        fts, callbacks = None, [Meter()]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, val_check_interval=max(1, steps // VALIDATIONS),
        check_val_every_n_epoch=None, num_sanity_val_steps=0, enable_checkpointing=False, logger=False,
        default_root_dir=cfg["out_dir"], enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(module, datamodule=Data())
    phases = [] if fts is None else fts.history
    out = costs.result([r.peak_memory for r in phases if r.peak_memory is not None])
    out.update(steps_done=trainer.global_step, phases=[[r.depth, r.start_step, r.end_step, r.end_reason] for r in phases])
    if fts is not None:
        out["schedule"] = fts.schedule.to_dict()
    return module.model, out


def _run_hf(cfg: dict[str, Any], sets: dict[str, Any], collate: Any) -> tuple[Any, dict[str, Any]]:
    import transformers

    from examples.rotten_tomatoes.data import model_dir
    from phasetune.hf import PhasetuneTrainer, PhasetuneTrainerCallback

    costs = _Costs()

    class Meter(transformers.TrainerCallback):
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            costs.train_start()

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            costs.step_start()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            costs.step_end()

    transformers.set_seed(cfg["seed"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(model_dir()), num_labels=2)
    model.train()
    out_dir = Path(cfg["out_dir"])
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
        per_device_eval_batch_size=64, learning_rate=cfg["user_lr"], weight_decay=0.01, optim="adamw_torch",
        lr_scheduler_type="constant", eval_strategy="steps", eval_steps=max(1, cfg["steps"] // VALIDATIONS),
        save_strategy="no", metric_for_best_model="eval_loss", remove_unused_columns=False, logging_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True, seed=cfg["seed"],
    )
    ft = PhasetuneTrainerCallback()
    trainer = PhasetuneTrainer(model=model, args=args, train_dataset=sets["train"], eval_dataset=sets["val"],
                               data_collator=collate, callbacks=[Meter(), ft])
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.train()
    out = costs.result([r.peak_memory for r in ft.history if r.peak_memory is not None])
    out.update(steps_done=trainer.state.global_step, schedule=ft.schedule.to_dict(),
               phases=[[r.depth, r.start_step, r.end_step, r.end_reason] for r in ft.history])
    return model, out


# ------------------------------------------------------------------------------------------ the comparison


def configs(seeds: list[int], steps: int, user_lr: float) -> list[dict[str, Any]]:
    """Every run, in the order they run: per task and seed both arms, their order alternating by seed."""
    base_lrs = json.loads(quality.CHOICE.read_text())["baseline"]
    run = {"steps": steps, "batch": quality.BATCH}
    out = []
    for task in quality.TASKS:
        for i, seed in enumerate(seeds):
            arms = [{**run, "task": task, "seed": seed, "arm": "default", "user_lr": user_lr},
                    {**run, "task": task, "seed": seed, "arm": "baseline", "lr": base_lrs[task]}]
            out += arms if i % 2 == 0 else arms[::-1]
    return out


def run_all(cfgs: list[dict[str, Any]], out_dir: Path) -> list[dict[str, Any]]:
    results = []
    for n, cfg in enumerate(cfgs, 1):
        # every run writes into the scratch folder (the Trainer's output_dir; Lightning's generated schedule files)
        cfg = {**cfg, "out_dir": str(out_dir / ("hf_output" if cfg["arm"] == "default_hf" else f"lightning_{n}"))}
        print(f"[{n}/{len(cfgs)}] {cfg['task']} seed {cfg['seed']} {cfg['arm']}", flush=True)
        done = subprocess.run([sys.executable, __file__, "run", json.dumps(cfg)], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            raise SystemExit(f"run {cfg} failed:\n{done.stderr[-4000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def _same_cfg(cfg: dict[str, Any], run: dict[str, Any]) -> bool:
    """Whether an earlier run's record was made with every setting of ``cfg``."""
    return all(run.get(k) == v for k, v in cfg.items())


def _kept_runs(path: Path, cfgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The earlier runs in ``path`` that one of ``cfgs`` asks for (a missing file keeps none)."""
    if not path.exists():
        return []
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in runs if any(_same_cfg(c, r) for c in cfgs)]


def _mean_sd(values: list[float], digits: int = 4, signed: bool = False) -> str:
    m = statistics.mean(values)
    sd = f"{statistics.stdev(values):.{digits}f}" if len(values) > 1 else "-"
    return f"{m:+.{digits}f} ± {sd}" if signed else f"{m:.{digits}f} ± {sd}"


def _ratio(values: list[float]) -> str:
    sd = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}x{sd} ({min(values):.2f}-{max(values):.2f})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join([*lines, *("  ".join(str(x).ljust(w) for x, w in zip(r, widths)) for r in rows)])


def report(results: list[dict[str, Any]]) -> str:
    arms = []
    pairs = []
    for task in quality.TASKS:
        runs = [r for r in results if r["task"] == task and r["arm"] != "default_hf"]
        for arm in ("default", "baseline"):
            mine = [r for r in runs if r["arm"] == arm]
            if mine:
                name = ("FinetuningScheduler()" + f" (lr {mine[0]['user_lr']:g})" if arm == "default"
                        else f"full fine-tuning lr={mine[0]['lr']:g}")
                arms.append([task, name, str(len(mine)), _mean_sd([r["test_acc"] for r in mine]),
                             _mean_sd([r["val_acc"] for r in mine]), f"{statistics.mean(r['cpu_s'] for r in mine):.1f}s",
                             f"{statistics.mean(r['peak_rss'] for r in mine) / 2**20:.0f} MiB"])
        by_seed = {(r["seed"], r["arm"]): r for r in runs}
        seeds = sorted({s for s, a in by_seed if a == "default" and (s, "baseline") in by_seed})
        if seeds:
            d = [by_seed[s, "default"] for s in seeds]
            b = [by_seed[s, "baseline"] for s in seeds]
            pairs.append([task, str(len(seeds)), _mean_sd([x["test_acc"] - y["test_acc"] for x, y in zip(d, b)], signed=True),
                          _mean_sd([x["val_acc"] - y["val_acc"] for x, y in zip(d, b)], signed=True),
                          _ratio([x["cpu_s"] / y["cpu_s"] for x, y in zip(d, b)]),
                          _ratio([x["wall_s"] / y["wall_s"] for x, y in zip(d, b)]),
                          _ratio([x["peak_rss"] / y["peak_rss"] for x, y in zip(d, b)]),
                          _ratio([(x["peak_rss"] - x["rss_before"]) / (y["peak_rss"] - y["rss_before"])
                                  for x, y in zip(d, b)])])
    text = [_table(["task", "arm", "seeds", "test_acc", "val_acc", "train CPU time", "peak memory"], arms), "",
            "paired by seed: FinetuningScheduler() - full fine-tuning (accuracy), FinetuningScheduler() / full "
            "fine-tuning (costs); mean ± sd (min-max)",
            _table(["task", "pairs", "Δ test_acc", "Δ val_acc", "CPU time ratio", "wall time ratio", "peak memory ratio",
                    "added memory ratio"], pairs)]
    hf = [r for r in results if r["arm"] == "default_hf"]
    for r in hf:
        same = next((x for x in results if x["arm"] == "default" and x["task"] == r["task"] and x["seed"] == r["seed"]),
                    None)
        text += ["", f"Hugging Face Trainer, PhasetuneTrainerCallback() alone ({r['task']}, seed {r['seed']}): test_acc "
                 f"{r['test_acc']:.4f}, val_acc {r['val_acc']:.4f}, train CPU time {r['cpu_s']:.1f}s, phases "
                 f"{[p[:3] for p in r['phases']]}"
                 + ("" if same is None else f"; Lightning's FinetuningScheduler() on the same seed: test_acc "
                    f"{same['test_acc']:.4f}, phases {[p[:3] for p in same['phases']]}, the same schedule: "
                    f"{_hf_names(same['schedule']) == r['schedule']}")]
    return "\n".join(text)


def _hf_names(schedule: dict[str, Any]) -> dict[str, Any]:
    """A Lightning run's schedule with the Hugging Face model's own names (the LightningModule adds ``model.``)."""
    return {k: {**v, "params": [n.removeprefix("model.") for n in v["params"]]} for k, v in schedule.items()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        print(json.dumps(run_one(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=len(quality.FINAL_SEEDS), help="seeds per task (from 0)")
    parser.add_argument("--steps", type=int, default=quality.STEPS, help="optimizer steps of every run")
    parser.add_argument("--user_lr", type=float, default=USER_LR, help="the lr configure_optimizers gives")
    parser.add_argument("--no_hf", action="store_true", help="leave out the Hugging Face Trainer run")
    parser.add_argument("--out", type=Path, help="write the runs (<out>.jsonl) and the tables (<out>) here")
    parser.add_argument("--keep", action="store_true",
                        help="reuse the runs already in <out>.jsonl that have the same settings; run only the rest")
    args = parser.parse_args()
    if args.keep and args.out is None:
        parser.error("--keep reads the runs of --out: name the file with --out")
    cfgs = configs(list(range(args.seeds)), args.steps, args.user_lr)
    if not args.no_hf:
        cfgs.append({"steps": args.steps, "batch": quality.BATCH, "task": HF_TASK, "seed": 0, "arm": "default_hf",
                     "user_lr": args.user_lr})
    kept = _kept_runs(args.out.with_suffix(".jsonl"), cfgs) if args.keep else []
    todo = [c for c in cfgs if not any(_same_cfg(c, r) for r in kept)]
    print(f"{len(kept)} runs kept from earlier, {len(todo)} to run", flush=True)
    with tempfile.TemporaryDirectory(prefix="default_payoff_") as scratch:  # the Trainer's output_dir
        results = kept + run_all(todo, Path(scratch))
    text = report(results)
    print(text)
    if args.out is not None:
        args.out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
        how = f" (--keep: {len(kept)} of the {len(results)} runs from an earlier invocation)" if kept else ""
        args.out.write_text(f"`python bench/default_payoff.py --seeds {args.seeds} --steps {args.steps}`{how}\n\n```text\n"
                            f"{text}\n```\n")


if __name__ == "__main__":
    main()
