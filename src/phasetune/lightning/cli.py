"""The ``phasetune`` command: LightningCLI's ``fit``/``validate``/``test`` plus ``schedule generate|check|show``.

``phasetune fit --config run.yaml`` works like any LightningCLI (YAML configs, ``--print_config``,
``--trainer.max_epochs 3`` overrides). On top of it, ``fit``:

* adds a :class:`FinetuningScheduler` (generated schedule) when the config has none;
* prints the per-phase summary table at the end and, with ``--test_after_fit true``, the test metrics of
  the best checkpoint;
* writes ``phases.png`` (validation curves over steps, phases shaded) to the run's log dir;
* with ``--baseline also`` then trains the same model and data with plain full fine-tuning for the same
  number of steps and prints both runs side by side (``--baseline only`` trains just the baseline).

Class paths are imported relative to the current directory too (like ``python -m``), so a project's own
modules (``examples.rotten_tomatoes.model.SentimentClassifier``) work without installing them.
User errors (bad config, missing file, invalid schedule) end in a short message and exit code 1 or 2,
not a traceback; set ``PHASETUNE_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from phasetune import generate
from phasetune.errors import ConfigurationError, PhasetuneError, ScheduleError, ScheduleGenerated
from phasetune.lightning import _compat
from phasetune.lightning.adapters import select_adapter
from phasetune.lightning.callback import FinetuningScheduler
from phasetune.lightning.summary import ValidationHistory, metrics_line, plot_phases, summary_table
from phasetune.memory import KIND_LABELS, PeakMemory
from phasetune.report import covering_modules, fmt_bytes, fmt_count, fmt_seconds, format_table
from phasetune.schedule import Schedule, resolve_schedule

PLOT_NAME = "phases.png"
USER_ERRORS = (PhasetuneError, ArgumentError, MisconfigurationException, FileNotFoundError, ImportError)


# ---------------------------------------------------------------------------------------------- fit & co.
@dataclass
class RunResult:
    """What one training run of ``phasetune fit`` produced."""

    name: str
    steps: int
    wall_time: float
    peak_memory: int | None
    peak_memory_kind: str | None
    test: dict[str, float] = field(default_factory=dict)
    points: list[Any] = field(default_factory=list)
    log_dir: str | None = None


class FullFineTuning(Callback):
    """The baseline: every parameter trains from the first step (optionally all at one ``lr``).

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
            rank_zero_warn(
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
        self.memory = PeakMemory(pl_module.device)
        self.memory.reset()

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
        if self._opt("baseline") != "none" or self._opt("test_after_fit"):
            raise ConfigurationError(f"--baseline and --test_after_fit apply to fit, not {self.subcommand}")

    def fit(self, model: LightningModule, datamodule: Any = None, **kwargs: Any) -> None:
        results: list[RunResult] = []
        fts = None
        if self._opt("baseline") != "only":
            fts = _scheduler_of(self.trainer)
            results.append(self._scheduled_run(fts, model, datamodule, **kwargs))
        if self._opt("baseline") != "none":
            budget = results[0].steps if results else None
            results.append(self._baseline_run(budget, scheduled=fts))
        if not self.trainer.is_global_zero:
            return
        if len(results) == 2:
            _print_comparison(results)
        if self._opt("plot") and fts is not None and fts.history:
            main = results[0]
            baseline_points = results[1].points if len(results) == 2 else None
            try:
                path = plot_phases(Path(main.log_dir or ".") / PLOT_NAME, main.points, fts.history,
                                   baseline=baseline_points, title=_plot_title(results))
                _say(f"plot: {_shown(path)}")
            except (ImportError, ValueError) as e:
                _say(f"no plot: {e}")

    # -- the scheduled run --------------------------------------------------------------------------
    def _scheduled_run(self, fts: FinetuningScheduler, model: LightningModule, datamodule: Any, **kwargs: Any) -> RunResult:
        trainer = self.trainer
        history = ValidationHistory()
        trainer.callbacks.append(history)
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, **kwargs)
        wall = time.perf_counter() - start
        peaks = [r.peak_memory for r in fts.history if r.peak_memory is not None]
        kind = next((r.peak_memory_kind for r in fts.history if r.peak_memory_kind), None)
        result = RunResult(f"scheduled ({len(fts.history)} phases)", trainer.global_step, wall,
                           max(peaks, default=None), kind, points=history.points, log_dir=_log_dir(trainer))
        if trainer.is_global_zero:
            _say(f"scheduled fine-tuning: {trainer.global_step} steps in {fmt_seconds(wall)}")
            print(summary_table(fts.history, fts.monitor), flush=True)
        if self._opt("test_after_fit"):
            result.test = _test(trainer, model, datamodule, "scheduled")
        return result

    # -- the baseline --------------------------------------------------------------------------------
    def _baseline_run(self, budget: int | None, scheduled: FinetuningScheduler | None) -> RunResult:
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
        full, history = FullFineTuning(self._opt("baseline_lr")), ValidationHistory()
        callbacks += [full, history]
        if config.get("enable_checkpointing", True) is not False:
            callbacks.append(ModelCheckpoint(monitor=monitor or "val_loss", mode=mode, save_top_k=1,
                                             save_weights_only=weights_only))
        config["callbacks"] = callbacks
        if budget is not None:
            config["max_steps"] = budget
        if scheduled is not None:
            config["logger"] = _baseline_logger(self.trainer.logger, config.get("logger"))
        trainer = self.trainer_class(**config)
        if trainer.is_global_zero:
            what = f"{budget} steps, the scheduled run's budget" if budget is not None else "the trainer's own limits"
            _say(f"baseline: plain full fine-tuning of every parameter for {what}")
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        wall = time.perf_counter() - start
        if trainer.is_global_zero:
            _say(f"baseline: {trainer.global_step} steps in {fmt_seconds(wall)}")
        memory_kind = full.memory.kind if full.memory is not None else None
        result = RunResult("full fine-tuning", trainer.global_step, wall, full.peak, memory_kind,
                           points=history.points, log_dir=_log_dir(trainer))
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
    rows = [[r.name, r.steps, fmt_seconds(r.wall_time), fmt_bytes(r.peak_memory), *(
        f"{r.test[k]:.4f}" if k in r.test else "-" for k in keys)] for r in results]
    print(flush=True)
    _say("scheduled fine-tuning vs. plain full fine-tuning (same number of steps)")
    print(format_table(["run", "steps", "wall time", "peak memory", *keys], rows, align="lrrr" + "r" * len(keys)))
    kinds = {r.peak_memory_kind for r in results if r.peak_memory_kind}
    for k in sorted(kinds):
        print(f"peak memory: {KIND_LABELS.get(k, k)}")
    print(flush=True)


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it (shorter to read and to copy)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _say(message: str) -> None:
    print(f"phasetune: {message}", flush=True)


# ---------------------------------------------------------------------------------------------- schedule
SCHEDULE_HELP = """\
phasetune schedule generate --config CONFIG [--style blocks|pairs] [--output FILE]
phasetune schedule check [SCHEDULE] --config CONFIG
phasetune schedule show [SCHEDULE] --config CONFIG

CONFIG is a `phasetune fit` config; its model is built (weights included) to read parameter names.
SCHEDULE defaults to the ft_schedule of the FinetuningScheduler in CONFIG. Further arguments are
config overrides, e.g. --model.init_args.lr 1e-4.
"""


class UsageError(PhasetuneError):
    """A ``phasetune schedule`` command line that cannot be parsed."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _schedule_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="phasetune schedule", usage=SCHEDULE_HELP,
                                     description="Generate, check or show a fine-tuning schedule for a model.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="{generate,check,show}")
    gen = sub.add_parser("generate", prog="phasetune schedule generate",
                         help="write a schedule generated from the model's structure")
    gen.add_argument("--style", choices=generate.STYLES, default=None,
                     help="'blocks' (head, then one repeated block per phase, then the stem) or 'pairs'")
    gen.add_argument("-o", "--output", help="file to write (default: print to stdout)")
    for name, text in (("check", "validate a schedule against the model (every problem at once)"),
                       ("show", "show a schedule as a table: parameters, lr and transition rule per phase")):
        p = sub.add_parser(name, prog=f"phasetune schedule {name}", help=text)
        p.add_argument("schedule", nargs="?", help="schedule YAML (default: the config's ft_schedule)")
    for p in sub.choices.values():
        p.add_argument("-c", "--config", required=True, help="a `phasetune fit` config file naming the model")
    return parser


@dataclass
class _Target:
    """The model of a config, by logical parameter name, and the FinetuningScheduler settings it names."""

    params: dict[str, torch.Tensor]
    structure: torch.nn.Module
    fts: FinetuningScheduler
    model_name: str


def _load_target(config: str, overrides: Sequence[str]) -> _Target:
    argv, sys.argv = sys.argv, ["phasetune schedule", "--config", config, *overrides]
    quiet = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # the Trainer is built only to read its callbacks: no "GPU available" lines
        logger.setLevel(logging.WARNING)
    try:  # through sys.argv: LightningCLI warns when given args while the process has command-line arguments
        cli = PhasetuneCLI(run=False, save_config_callback=None, seed_everything_default=False,
                           parser_kwargs={"prog": "phasetune schedule", "exit_on_error": False})
    finally:
        sys.argv = argv
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    model = cli.model
    if not any(True for _ in model.parameters()):
        with torch.device("meta"):  # names and shapes are all a schedule needs
            model.configure_model()
    found = [c for c in cli.trainer.callbacks if isinstance(c, FinetuningScheduler)]
    fts = found[0] if found else FinetuningScheduler()
    adapter = select_adapter(cli.trainer.strategy, fts.strategy_adapter_cfg)
    return _Target(adapter.named_parameters(model), adapter.structure_module(model), fts, type(model).__name__)


def _schedule_source(args: argparse.Namespace, target: _Target) -> tuple[Any, str]:
    if args.schedule:
        return args.schedule, args.schedule
    if target.fts.ft_schedule is not None:
        src = target.fts.ft_schedule
        return src, str(src) if not isinstance(src, dict) else "the config's ft_schedule"
    raw = generate.generate_schedule(target.structure, target.fts.schedule_style)
    return raw, f"the schedule generated for {target.model_name} (style {target.fts.schedule_style!r})"


def schedule_main(argv: Sequence[str]) -> int:
    """``phasetune schedule generate|check|show``; returns the exit code."""
    args, overrides = _schedule_parser().parse_known_args(list(argv))
    target = _load_target(args.config, overrides)
    shapes = {n: tuple(p.shape) for n, p in target.params.items()}
    if args.action == "generate":
        style = args.style or target.fts.schedule_style
        raw = generate.generate_schedule(target.structure, style)
        schedule = resolve_schedule(raw, shapes)
        header = (f"phasetune schedule generated for {target.model_name} (style {style!r}): {len(schedule)} phases\n"
                  "edit it, then pass it as FinetuningScheduler(ft_schedule=...)")
        if args.output:
            schedule.dump(args.output, resolved=False, header=header)
            print(f"wrote {args.output} ({len(schedule)} phases)")
        else:
            print("".join(f"# {line}\n" for line in header.splitlines()) + schedule.to_yaml(resolved=False), end="")
        return 0
    source, desc = _schedule_source(args, target)
    try:
        schedule = resolve_schedule(source, shapes, epoch_transitions_only=target.fts.epoch_transitions_only)
    except ScheduleError as e:
        print(f"phasetune: {e}", file=sys.stderr)
        return 1
    if args.action == "show":
        print(f"{desc} for {target.model_name}:")
        print(_schedule_table(schedule, target))
    for note in schedule.warnings:
        print(f"note: {note}")
    if schedule.unscheduled:
        print(f"note: {len(schedule.unscheduled)} of {len(shapes)} parameters are in no phase and stay frozen "
              f"(e.g. {schedule.unscheduled[0]!r})")
    if args.action == "check":
        print(f"{desc}: OK, {len(schedule)} phases for {target.model_name}")
    return 0


def _schedule_table(schedule: Schedule, target: _Target) -> str:
    numel = {n: p.numel() for n, p in target.params.items()}
    total = max(sum(numel.values()), 1)
    fts, rows, cumulative = target.fts, [], 0
    last = len(schedule) - 1 if fts.max_depth < 0 else min(fts.max_depth, len(schedule) - 1)
    for phase in schedule.phases[: last + 1]:
        count = sum(numel[n] for n in phase.params)
        cumulative += count
        if phase.index == 0:
            lr = "optimizer's"
        elif phase.lr is not None:
            lr = f"{phase.lr:.3g}"
        else:
            lr = f"{fts.base_max_lr:.3g} (base)" if fts.base_max_lr else "1/10 of phase 0"
        rows.append([phase.index, f"{fmt_count(count)} ({len(phase.params)})", f"{100.0 * cumulative / total:.1f}%",
                     lr, _rule(phase.max_transition_epoch, phase.index == last, fts.epoch_transitions_only),
                     covering_modules(phase.params, list(numel), limit=2)])
    return format_table(["phase", "params (tensors)", "trainable", "lr", "ends", "thaws"], rows, align="lrrrll")


def _rule(epoch: int, final: bool, epoch_only: bool) -> str:
    stop = "run ends" if final else "next phase"
    if epoch_only:
        return f"epoch {epoch}: {stop}"
    if epoch >= 0:
        return f"early stopping or epoch {epoch}: {stop}"
    return f"early stopping: {stop}"


# ---------------------------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``phasetune`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    # Lightning 2.6 with torch >= 2.8 warns about its own pytree use on every run; nothing a user can change
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: class paths may name modules of this directory
    try:
        if args and args[0] == "schedule":
            return schedule_main(args[1:])
        PhasetuneCLI(args=None if argv is None else args, save_config_kwargs={"overwrite": True},
                     parser_kwargs={"prog": "phasetune", "exit_on_error": False})
        return 0
    except ScheduleGenerated as e:
        print(f"phasetune: {e}")
        return 0
    except Exception as e:
        cause = _user_error(e)
        if cause is None or os.environ.get("PHASETUNE_DEBUG"):
            raise
        print(f"phasetune: error: {_one_line(cause)}", file=sys.stderr)
        return 2 if isinstance(cause, (ArgumentError, UsageError)) else 1


def _user_error(e: BaseException) -> BaseException | None:
    """The innermost user error (bad config, missing file or package, invalid schedule) that caused ``e``.

    jsonargparse wraps errors raised while building classes from the config in ValueErrors; anything that
    is not caused by a user error is a bug and keeps its traceback.
    """
    found, seen = None, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, USER_ERRORS):
            found = e
        e = e.__cause__ or e.__context__
    return found


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line. A PhasetuneError keeps its list of problems (all of them, on
    purpose); jsonargparse's nested explanations are reduced to the innermost reason."""
    text = str(e).strip() or type(e).__name__
    if isinstance(e, PhasetuneError):
        return text
    lines = [line for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "Problem with given class_path" in line:
            indent = len(line) - len(line.lstrip())
            detail = [line.strip().lstrip("- ")]
            for deeper in lines[i + 1:]:
                if len(deeper) - len(deeper.lstrip()) <= indent:
                    break
                detail.append(deeper.strip())
            return " ".join([lines[0].strip(), *detail])
    return " ".join(line.strip() for line in lines[:2])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
