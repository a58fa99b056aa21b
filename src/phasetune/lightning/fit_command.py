"""``PhasetuneCLI``: LightningCLI's ``fit``/``validate``/``test``, with ``fit`` extended.

``phasetune fit --config run.yaml`` works like any LightningCLI (YAML configs, ``--print_config``,
``--trainer.max_epochs 3`` overrides). On top of it, ``fit``:

* adds a :class:`FinetuningScheduler` (generated schedule) when the config has none;
* prints the per-phase summary table at the end and, with ``--test_after_fit true``, the test metrics of
  the best checkpoint;
* writes ``phases.png`` (validation curves over steps, phases shaded) to the run's log dir;
* with ``--baseline also`` then trains the same model and data with plain full fine-tuning for the same
  number of steps and prints both runs side by side, with the peak-memory ratio scheduled / full fine-tuning as
  measured beside the one phasetune.plan gives (:mod:`phasetune.lightning.memory_ratio`) (``--baseline only``
  trains just the baseline);
* with ``--seeds N`` does all that N times (seeds ``seed_everything``, +1, ...) and prints mean ± sd of each
  metric per arm and the paired difference scheduled - baseline (:mod:`phasetune.lightning.seed_tables`).

The console script's entry point is :func:`phasetune.lightning.cli.main`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from phasetune.errors import ConfigurationError
from phasetune.features.peak_memory import KIND_LABELS, PeakMemory
from phasetune.lightning import _compat, messages
from phasetune.lightning.callback import FinetuningScheduler
from phasetune.lightning.memory_ratio import FitFactsRecorder, print_memory_ratios
from phasetune.lightning.seed_tables import SeedRun, metrics_table, paired_table
from phasetune.lightning.summary import ValidationHistory, metrics_line, plot_phases, summary_table
from phasetune.lr_shapes import WarmupLinearDecay
from phasetune.util.text import fmt_bytes, fmt_seconds, format_table

PLOT_NAME = "phases.png"


@dataclass
class RunResult:
    """What one training run of ``phasetune fit`` produced."""

    name: str
    steps: int
    wall_time: float
    peak_memory: int | None
    peak_memory_kind: str | None
    test: dict[str, float] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)  # the last validation's metrics
    points: list[Any] = field(default_factory=list)
    log_dir: str | None = None
    cpu_time: float | None = None  # the process's CPU time (every thread) during the fit
    facts: Any = None  # memory_ratio.FitFacts: what the memory plan of this run needs


class FullFineTuning(Callback):
    """The baseline: every parameter trains from the first step (optionally all at one ``lr``).

    A :class:`~phasetune.lr_shapes.WarmupLinearDecay` from ``configure_optimizers`` (phase 0's shape in the
    scheduled run) is stretched over the baseline's step budget, keeping its warm-up share.

    Also measures the run's peak memory the way :class:`FinetuningScheduler` does per phase.
    """

    def __init__(self, lr: float | None = None) -> None:
        self.lr = lr
        self.memory: PeakMemory | None = None
        self.peak: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # before configure_optimizers, which usually takes what requires grad
            for p in pl_module.parameters():
                p.requires_grad_(True)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        in_optimizer = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        left_out = [n for n, p in pl_module.named_parameters() if id(p) not in in_optimizer]
        if left_out:
            messages.warn(
                f"baseline: configure_optimizers left {len(left_out)} parameters out (e.g. {left_out[0]!r}); they "
                "do not train in the full fine-tuning baseline"
            )
        if self.lr is not None:
            for opt in trainer.optimizers:
                for g in opt.param_groups:
                    g["lr"] = self.lr
                    if "initial_lr" in g:
                        g["initial_lr"] = self.lr
            for cfg in trainer.lr_scheduler_configs:
                if hasattr(cfg.scheduler, "base_lrs"):
                    cfg.scheduler.base_lrs = [self.lr] * len(cfg.scheduler.base_lrs)
        for cfg in trainer.lr_scheduler_configs:
            if isinstance(cfg.scheduler, WarmupLinearDecay) and trainer.max_steps > 0:
                self._stretch(cfg.scheduler, trainer.max_steps)
        self.memory = PeakMemory(pl_module.device)
        self.memory.reset()

    @staticmethod
    def _stretch(shape: WarmupLinearDecay, steps: int) -> None:
        """Phase 0's warm-up then decay, stretched over the baseline's whole budget (same warm-up share)."""
        warmup = min(round(shape.warmup_steps / shape.total_steps * steps), steps - 1)
        shape.total_steps, shape.warmup_steps = steps, warmup
        for g, base in zip(shape.optimizer.param_groups, shape.base_lrs):
            g["lr"] = base * shape.factor(shape.last_epoch)
        shape._last_lr = [g["lr"] for g in shape.optimizer.param_groups]  # torch's get_last_lr() storage
        _say(f"baseline: lr warm-up over {warmup} step{'' if warmup == 1 else 's'}, then linear decay to 0 at step {steps}")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.memory is not None:
            self.peak = self.memory.read()


class PhasetuneCLI(LightningCLI):
    """LightningCLI with ``fit`` extended as described in the module docstring."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate", "test")}

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--baseline", type=Literal["none", "also", "only"], default="none",
            help="fit only: 'also' trains plain full fine-tuning of the same model and data for the same number of "
                 "steps after the scheduled run and compares them; 'only' trains just that baseline",
        )
        parser.add_argument(
            "--baseline_lr", type=float | None, default=None,
            help="fit only: lr of every parameter group in the baseline (default: what configure_optimizers sets)",
        )
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="fit only: evaluate the test set with the best checkpoint (or the final weights) after training",
        )
        parser.add_argument(
            "--seeds", type=int, default=1,
            help="fit only: train each arm this many times, with seeds seed_everything, +1, ..., and print mean ± sd "
                 "of each metric and the paired difference scheduled - baseline",
        )
        parser.add_argument(
            "--plot", type=bool, default=True,
            help=f"fit only: write {PLOT_NAME} (validation metrics over steps, phases shaded) to the log dir",
        )

    def _opt(self, key: str) -> Any:
        return self.config[self.subcommand][key]

    def before_validate(self) -> None:
        self._refuse_fit_options()

    def before_test(self) -> None:
        self._refuse_fit_options()

    def _refuse_fit_options(self) -> None:
        if self._opt("baseline") != "none" or self._opt("test_after_fit") or self._opt("seeds") != 1:
            raise ConfigurationError(f"--baseline, --seeds and --test_after_fit apply to fit, not {self.subcommand}")

    def _base_seed(self) -> int | None:
        seed = self.config[self.subcommand].get("seed_everything")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    def fit(self, model: LightningModule, datamodule: Any = None, **kwargs: Any) -> None:
        seeds = self._opt("seeds")
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ConfigurationError(f"--seeds must be an integer >= 1, got {seeds!r}")
        if seeds > 1:
            self._fit_seeds(seeds, model, datamodule, **kwargs)
            return
        fts, results = self._fit_arms(self.trainer, model, datamodule, self._base_seed(), **kwargs)
        if not self.trainer.is_global_zero:
            return
        if len(results) == 2:
            _print_comparison(results)
            print_memory_ratios(*results)
        if self._opt("plot") and fts is not None and fts.history:
            main = results[0]
            baseline_points = results[1].points if len(results) == 2 else None
            try:
                path = plot_phases(Path(main.log_dir or ".") / PLOT_NAME, main.points, fts.history,
                                   baseline=baseline_points, title=_plot_title(results))
                _say(f"plot: {_shown(path)}")
            except (ImportError, ValueError) as e:
                _say(f"no plot: {e}")

    def _fit_arms(self, trainer: Trainer, model: LightningModule, datamodule: Any, seed: int | None,
                  **kwargs: Any) -> tuple[FinetuningScheduler | None, list[RunResult]]:
        """The scheduled run (unless ``--baseline only``), then the baseline (unless ``--baseline none``)."""
        results: list[RunResult] = []
        fts = None
        if self._opt("baseline") != "only":
            fts = _scheduler_of(trainer)
            results.append(self._scheduled_run(fts, model, datamodule, trainer, **kwargs))
        if self._opt("baseline") != "none":
            budget = results[0].steps if results else None
            results.append(self._baseline_run(budget, scheduled=fts, seed=seed, scheduled_logger=trainer.logger))
        return fts, results

    # -- several seeds ------------------------------------------------------------------------------
    def _fit_seeds(self, n: int, model: LightningModule, datamodule: Any, **kwargs: Any) -> None:
        """Every arm with seeds base, base + 1, ...; then mean ± sd per metric and paired differences."""
        base = self._base_seed() or 0
        trainer, runs = self.trainer, []
        for i in range(n):
            seed = base + i
            if i > 0:  # a fresh model, data and trainer (with fresh callbacks) for every seed
                seed_everything(seed, workers=True, verbose=False)
                init = self.parser.instantiate_classes(self.config)[self.subcommand]
                model, datamodule = init.get("model"), init.get("data")
                _compat.apply_cli_optimizers(self, model, init)
                trainer = self.trainer_class(**init.get("trainer", {}))
            if trainer.is_global_zero:
                _say(f"seed {seed} ({i + 1} of {n})")
            _, results = self._fit_arms(trainer, model, datamodule, seed, **kwargs)
            for r in results:
                arm = "scheduled" if r.name.startswith("scheduled") else r.name
                runs.append(SeedRun(arm, seed, {**r.val, **r.test}, r.wall_time, r.peak_memory, r.steps))
        if not trainer.is_global_zero:
            return
        print(flush=True)
        _say(f"{n} seeds ({base} to {base + n - 1}): mean ± sd over seeds (val_*: the last validation; test_*: "
             "the best checkpoint)")
        print(metrics_table(runs))
        if self._opt("baseline") == "also":
            print()
            _say("paired by seed (same classifier init and data order): scheduled - full fine-tuning")
            print(paired_table(runs, "full fine-tuning"))
        print(flush=True)

    # -- the scheduled run --------------------------------------------------------------------------
    def _scheduled_run(self, fts: FinetuningScheduler, model: LightningModule, datamodule: Any, trainer: Trainer,
                       **kwargs: Any) -> RunResult:
        history, facts = ValidationHistory(), FitFactsRecorder(fts)
        trainer.callbacks += [history, facts]  # after fts: facts reads the memory held when fts resets its peak
        start, cpu = time.perf_counter(), time.process_time()
        trainer.fit(model, datamodule=datamodule, **kwargs)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        peaks = [r.peak_memory for r in fts.history if r.peak_memory is not None]
        kind = next((r.peak_memory_kind for r in fts.history if r.peak_memory_kind), None)
        result = RunResult(f"scheduled ({len(fts.history)} phases)", trainer.global_step, wall,
                           max(peaks, default=None), kind, val=_val_metrics(trainer), points=history.points,
                           log_dir=_log_dir(trainer), cpu_time=cpu, facts=facts.facts)
        if trainer.is_global_zero:
            _say(f"scheduled fine-tuning: {trainer.global_step} steps in {fmt_seconds(wall)}")
            print(summary_table(fts.history, fts.monitor), flush=True)
        if self._opt("test_after_fit"):
            result.test = _test(trainer, model, datamodule, "scheduled")
        return result

    # -- the baseline --------------------------------------------------------------------------------
    def _baseline_run(self, budget: int | None, scheduled: FinetuningScheduler | None,
                      seed: int | None = None, scheduled_logger: Logger | None = None) -> RunResult:
        if seed is not None:  # the scheduled run's seed: the same classifier init and data order, paired
            seed_everything(seed, workers=True, verbose=False)
        init = self.parser.instantiate_classes(self.config)[self.subcommand]
        model, datamodule = init.get("model"), init.get("data")
        _compat.apply_cli_optimizers(self, model, init)
        config = {**init.get("trainer", {})}
        monitor = scheduled.monitor if scheduled is not None else None
        mode = scheduled.monitor_mode if scheduled is not None else "min"
        callbacks, weights_only = [], False
        for cb in config.get("callbacks") or []:
            if isinstance(cb, (FinetuningScheduler, EarlyStopping)):
                continue  # the baseline has no phases and a fixed step budget
            if isinstance(cb, ModelCheckpoint):
                monitor = monitor or cb.monitor
                mode = cb.mode if cb.monitor else mode
                weights_only = cb.save_weights_only
                continue
            callbacks.append(cb)
        full, history, facts = FullFineTuning(self._opt("baseline_lr")), ValidationHistory(), FitFactsRecorder()
        callbacks += [full, facts, history]  # facts after full: the memory held when full resets its peak
        if config.get("enable_checkpointing", True) is not False:
            callbacks.append(ModelCheckpoint(monitor=monitor or "val_loss", mode=mode, save_top_k=1,
                                             save_weights_only=weights_only))
        config["callbacks"] = callbacks
        if budget is not None:
            config["max_steps"] = budget
        if scheduled is not None:
            config["logger"] = _baseline_logger(scheduled_logger, config.get("logger"))
        trainer = self.trainer_class(**config)
        if trainer.is_global_zero:
            what = f"{budget} steps, the scheduled run's budget" if budget is not None else "the trainer's own limits"
            _say(f"baseline: plain full fine-tuning of every parameter for {what}")
        start, cpu = time.perf_counter(), time.process_time()
        trainer.fit(model, datamodule=datamodule)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        if trainer.is_global_zero:
            _say(f"baseline: {trainer.global_step} steps in {fmt_seconds(wall)}")
        memory_kind = full.memory.kind if full.memory is not None else None
        result = RunResult("full fine-tuning", trainer.global_step, wall, full.peak, memory_kind,
                           val=_val_metrics(trainer), points=history.points, log_dir=_log_dir(trainer), cpu_time=cpu,
                           facts=facts.facts)
        if self._opt("test_after_fit"):
            result.test = _test(trainer, model, datamodule, "baseline")
        return result


def _scheduler_of(trainer: Trainer) -> FinetuningScheduler:
    found = [c for c in trainer.callbacks if isinstance(c, FinetuningScheduler)]
    if len(found) > 1:
        raise ConfigurationError(f"trainer.callbacks holds {len(found)} FinetuningScheduler callbacks; keep one")
    if found:
        return found[0]
    fts = FinetuningScheduler()
    trainer.callbacks.append(fts)
    _say("no FinetuningScheduler in trainer.callbacks: added one that generates a schedule from the model")
    return fts


def _val_metrics(trainer: Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}


def _test(trainer: Trainer, model: LightningModule, datamodule: Any, name: str) -> dict[str, float]:
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    if trainer.is_global_zero:
        source = f"best checkpoint {Path(best).name}" if best else "final weights"
        _say(f"{name} test ({source}): {metrics_line(metrics)}")
    return metrics


def _log_dir(trainer: Trainer) -> str:
    return str(trainer.log_dir if trainer.log_dir is not None else trainer.default_root_dir)


def _baseline_logger(scheduled: Logger | None, configured: Any) -> Any:
    """Log the baseline beside the scheduled run: ``version_3`` -> ``version_3_baseline``."""
    if isinstance(scheduled, (TensorBoardLogger, CSVLogger)):
        version = scheduled.version if isinstance(scheduled.version, str) else f"version_{scheduled.version}"
        return type(scheduled)(save_dir=scheduled.save_dir, name=scheduled.name, version=f"{version}_baseline")
    return configured


def _plot_title(results: Sequence[RunResult]) -> str:
    parts = []
    for r in results:
        acc = r.test.get("test_acc")
        parts.append(f"{r.name}: {r.steps} steps" + (f", test_acc {acc:.3f}" if acc is not None else ""))
    return " | ".join(parts)


def _print_comparison(results: Sequence[RunResult]) -> None:
    keys = sorted({k for r in results for k in r.test})
    rows = [[r.name, r.steps, fmt_seconds(r.wall_time), "-" if r.cpu_time is None else fmt_seconds(r.cpu_time),
             fmt_bytes(r.peak_memory), *(f"{r.test[k]:.4f}" if k in r.test else "-" for k in keys)] for r in results]
    print(flush=True)
    _say("scheduled fine-tuning vs. plain full fine-tuning (same number of steps)")
    print(format_table(["run", "steps", "wall time", "CPU time", "peak memory", *keys], rows,
                       align="lrrrr" + "r" * len(keys)))
    kinds = {r.peak_memory_kind for r in results if r.peak_memory_kind}
    for k in sorted(kinds):
        print(f"peak memory: {KIND_LABELS.get(k, k)}")
    print("CPU time: the process's, every thread, during the fit (validation and checkpoints included)")
    if len(results) == 2:
        print(timing_caution(results[0], results[1]))
    print(flush=True)


def timing_caution(scheduled: RunResult, baseline: RunResult) -> str:
    """What one pair of timings says: its ratios, and that one seed's ratio on a shared machine is not a
    measurement (with the machine's load when it was busy)."""
    ratios = [f"{scheduled.wall_time / baseline.wall_time:.2f}x the wall time"] if baseline.wall_time > 0 else []
    if scheduled.cpu_time and baseline.cpu_time:
        ratios.append(f"{scheduled.cpu_time / baseline.cpu_time:.2f}x the CPU time")
    load, cores = os.getloadavg()[0] if hasattr(os, "getloadavg") else None, os.cpu_count() or 1
    busy = f" (load {load:.1f} on {cores} cores now)" if load is not None and load > cores else ""
    return (f"timing: {', '.join(ratios)} of full fine-tuning, from one run of each: on a machine shared with other "
            f"work{busy} one pair's ratio moves by tens of percent, so it is noise, not a measurement; "
            "bench/quality.py times the arms over seeds, interleaved, in CPU time")


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it (shorter to read and to copy)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _say(message: str) -> None:
    print(f"phasetune: {message}", flush=True)

