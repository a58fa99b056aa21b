"""``phasetune schedule generate|check|show``: a schedule for the model of a ``phasetune fit`` config, a
Hugging Face model folder, or a model class.

The config is read by :class:`PhasetuneCLI` without running anything; its model is built to read parameter
names and shapes, and its :class:`FinetuningScheduler` (if any) supplies the schedule and its settings.
``--model-dir PATH`` loads a Hugging Face model saved with ``save_pretrained`` (offline, with
``AutoModelForSequenceClassification``, else ``AutoModel``); ``--model module:Class`` builds ``Class()``. Both
use the default settings (those of ``PhasetuneTrainerCallback()`` and ``ScheduledFinetuning``).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import yaml

from phasetune.core import generate
from phasetune.core.schedule import Schedule, resolve_schedule
from phasetune.errors import ConfigurationError, PhasetuneError, ScheduleError
from phasetune.lightning.adapters import select_adapter
from phasetune.lightning.callback import FinetuningScheduler
from phasetune.lightning.fit_command import PhasetuneCLI
from phasetune.lora.recipes import LORA_RECIPES
from phasetune.run import RunOptions
from phasetune.util.files import atomic_write_text
from phasetune.util.text import covering_modules, few, fmt_count, format_table

SCHEDULE_HELP = """\
phasetune schedule generate MODEL [--recipe NAME] [--lr LR] [--lr_decay F]
                           [--phase_steps N [N ...] | --steps N [--head_fraction F]] [--warmup_fraction F]
                           [--steps_per_epoch N] [--include_stem true|false] [--blocks_per_phase N] [--output FILE]
phasetune schedule check [SCHEDULE] MODEL
phasetune schedule show [SCHEDULE] MODEL
phasetune schedule plan [SCHEDULE] (--model-dir PATH | --model module:factory) [--world-size N] ...
                        (the memory of each phase, before launch: see 'phasetune schedule plan --help')

MODEL is one of --config CONFIG (a `phasetune fit` config; its model is built, weights included, to read
parameter names), --model-dir PATH (a Hugging Face model folder, loaded offline) or --model module:Class.
SCHEDULE defaults to the ft_schedule of the FinetuningScheduler in CONFIG. Further arguments are
config overrides, e.g. --model.init_args.lr 1e-4.
"""


class UsageError(PhasetuneError):
    """A ``phasetune schedule`` command line that cannot be parsed."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


RECIPE_OPTIONS = ("lr", "lr_decay", "phase_steps", "total_steps", "head_fraction", "warmup_fraction",
                  "steps_per_epoch", "include_stem", "blocks_per_phase")  # the recipe options with a flag


def _schedule_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="phasetune schedule", usage=SCHEDULE_HELP,
                                     description="Generate, check or show a fine-tuning schedule for a model.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="{generate,check,show,plan}")
    gen = sub.add_parser("generate", prog="phasetune schedule generate",
                         help="write a schedule generated from the model's structure")
    gen.add_argument("--recipe", "--style", dest="style", choices=(*generate.STYLES, *LORA_RECIPES), default=None,
                     help="'blocks' (head, then one repeated block per phase, then the stem), 'discriminative' "
                          "(the same with lrs falling by --lr_decay per block), 'lpft' (head, then everything), "
                          "'pairs' (the classic: two tensors per phase), 'progressive_lora' (LoRA adapters top "
                          "block first, then lower ones) or 'lora_then_full' (LoRA on every block, then merged and "
                          "the top blocks' weights trained; docs/peft.md); default: the config's schedule_style")
    gen.add_argument("--rank", dest="r", type=int, help="LoRA recipes: the adapters' rank (8)")
    gen.add_argument("--alpha", type=float, help="LoRA recipes: adapter output scaled by alpha / rank (8)")
    gen.add_argument("--leaf", help="LoRA recipes: regex over the last name part of the linear layers that get "
                                    "adapters (e.g. 'query|value'; default: every nn.Linear in the blocks)")
    gen.add_argument("--full_blocks", type=int, help="lora_then_full: top blocks whose base weights train (1)")
    gen.add_argument("--lr", type=float, help="lr of phase 1 (phase 0 trains at configure_optimizers' lr); lpft: "
                                              "default 2e-4, the implicit default's (phasetune.core.recipes.DEFAULT_RULE)")
    gen.add_argument("--lr_decay", type=float, help="discriminative: lr factor from one block to the one below")
    gen.add_argument("--phase_steps", type=int, nargs="+", metavar="N",
                     help="optimizer steps per phase (one value for all, or one per phase): each phase >= 1 gets "
                          "a warm-up then linear decay over its steps (phasetune.lr_shapes.WarmupLinearDecay)")
    gen.add_argument("--steps", "--total_steps", dest="total_steps", type=int, metavar="N",
                     help="a step budget for the whole run, split across the phases (each phase ends at its "
                          "max_transition_step; the lr shapes as with --phase_steps)")
    gen.add_argument("--head_fraction", type=float,
                     help="with --steps: the head phase's share of the budget (default: a quarter for lpft, an "
                          "equal share otherwise)")
    gen.add_argument("--warmup_fraction", type=float, help="share of each phase's steps spent warming up (0.1)")
    gen.add_argument("--steps_per_epoch", type=int,
                     help="with --phase_steps or --steps: write each phase's end as max_transition_epoch instead "
                          "of max_transition_step (--steps is then split in whole epochs)")
    gen.add_argument("--include_stem", type=_bool, help="schedule the embeddings (stem) in a last phase (lpft: "
                                                        "false, the implicit default's; others: true)")
    gen.add_argument("--blocks_per_phase", type=int, help="discriminative/blocks: blocks thawed per phase (1)")
    gen.add_argument("-o", "--output", help="file to write (default: print to stdout)")
    for name, text in (("check", "validate a schedule against the model (every problem at once)"),
                       ("show", "show a schedule as a table: parameters, lr and transition rule per phase")):
        p = sub.add_parser(name, prog=f"phasetune schedule {name}", help=text)
        p.add_argument("schedule", nargs="?", help="schedule YAML (default: the config's ft_schedule)")
    for p in sub.choices.values():
        model = p.add_mutually_exclusive_group(required=True)
        model.add_argument("-c", "--config", help="a `phasetune fit` config file naming the model")
        model.add_argument("--model-dir", dest="model_dir", metavar="PATH",
                           help="a Hugging Face model folder (save_pretrained), loaded offline")
        model.add_argument("--model", dest="model_class", metavar="module:Class",
                           help="a model class whose Class() builds the model")
    sub.add_parser("plan", help="the memory of each phase per rank, before launch (phasetune.lightning.plan_command)")
    return parser


@dataclass
class _Target:
    """The model of a config, by logical parameter name, and the FinetuningScheduler settings it names."""

    params: dict[str, torch.Tensor]
    structure: torch.nn.Module
    fts: FinetuningScheduler
    model_name: str
    model: torch.nn.Module  # what a run injects LoRA adapters into (the LightningModule of a config)
    read_params: Callable[[], dict[str, torch.Tensor]]  # ``params`` again, after an injection


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
    # the adapter a fit of this config would use: the callback's own custom adapters and allow_untested count
    adapter = select_adapter(cli.trainer.strategy, fts.strategy_adapter_cfg, custom=fts._custom_adapters,
                             allow_untested=fts.allow_untested)
    return _Target(adapter.named_parameters(model), adapter.structure_module(model), fts, type(model).__name__, model,
                   lambda: adapter.named_parameters(model))


def _load_model_target(model_dir: str | None, model_class: str | None) -> _Target:
    """The model of ``--model-dir`` or ``--model``, with default settings."""
    model = _load_pretrained(model_dir) if model_dir is not None else _build_class(str(model_class))
    return _Target(dict(model.named_parameters()), model, FinetuningScheduler(), type(model).__name__, model,
                   lambda: dict(model.named_parameters()))


def _load_pretrained(path: str) -> torch.nn.Module:
    from pathlib import Path

    if not (Path(path) / "config.json").is_file():
        raise UsageError(f"--model-dir {path}: no config.json there; pass the folder a Hugging Face model was saved "
                         "to with save_pretrained")
    try:
        import transformers
    except ImportError:
        raise UsageError("--model-dir needs the transformers package: pip install transformers") from None
    last: Exception | None = None
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # no load report: a new head's weights are expected to be missing
    try:
        for cls in (transformers.AutoModelForSequenceClassification, transformers.AutoModel):
            try:
                return cls.from_pretrained(path, local_files_only=True)
            except (ValueError, OSError, KeyError) as e:
                last = e
    finally:
        transformers.logging.set_verbosity(level)
    raise UsageError(f"--model-dir {path}: transformers could not load it ({str(last).splitlines()[0]})")


def _build_class(spec: str) -> torch.nn.Module:
    import importlib

    module_name, _, cls_name = spec.partition(":")
    if not module_name or not cls_name:
        raise UsageError(f"--model {spec!r}: write module:Class, e.g. --model mypackage.models:Classifier")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--model {spec!r}: cannot import it ({e})") from None
    try:
        model = cls()
    except TypeError as e:
        raise UsageError(f"--model {spec!r}: {cls_name}() cannot be built without arguments ({e}); use --config "
                         "with init_args, or --model-dir") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {spec!r}: {cls_name}() is a {type(model).__name__}, not a torch.nn.Module")
    return model


def _schedule_source(args: argparse.Namespace, target: _Target) -> tuple[Any, str]:
    if args.schedule:
        return args.schedule, args.schedule
    if target.fts.ft_schedule is not None:
        src = target.fts.ft_schedule
        return src, str(src) if not isinstance(src, dict) else "the config's ft_schedule"
    raw = generate.implicit_schedule(target.structure, target.fts.options)  # what the fit would generate
    return raw, f"the schedule generated for {target.model_name} (style {target.fts.schedule_style!r})"


def schedule_main(argv: Sequence[str]) -> int:
    """``phasetune schedule generate|check|show|plan``; returns the exit code."""
    if list(argv[:1]) == ["plan"]:
        from phasetune.lightning.plan_command import plan_main

        return plan_main(argv[1:])
    args, overrides = _schedule_parser().parse_known_args(list(argv))
    if args.config is None and overrides:
        raise UsageError(f"unrecognized arguments: {' '.join(overrides)} (config overrides need --config)")
    target = (_load_target(args.config, overrides) if args.config is not None
              else _load_model_target(args.model_dir, args.model_class))
    shapes = {n: tuple(p.shape) for n, p in target.params.items()}
    if args.action == "generate":
        return _generate(args, target, shapes)
    source, desc = _schedule_source(args, target)
    try:
        injected = _inject_adapters(target, source)
        shapes = {n: tuple(p.shape) for n, p in target.params.items()}
        schedule = resolve_schedule(source, shapes, epoch_transitions_only=target.fts.epoch_transitions_only)
    except ScheduleError as e:
        print(f"phasetune: {e}", file=sys.stderr)
        return 1
    if injected:
        print(f"note: {injected}")
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


def _inject_adapters(target: _Target, source: Any) -> str | None:
    """Inject the LoRA adapters a schedule with LoRA keys asks for into the target's model, as every front end does
    before training (:func:`phasetune.run.lora_glue.inject_adapters`), so its phases are checked against the
    post-injection names (``...lora_A.default.weight``, ``...query.base_layer.weight``); updates ``target.params``
    and returns a line saying what was injected (None for a schedule without LoRA keys). Raises
    :class:`~phasetune.errors.ScheduleError` with every problem (pre-injection names, a merge naming no adapter)."""
    from phasetune.run.lora_glue import inject_adapters

    record = inject_adapters(target.model, source)
    if record is None:
        return None
    target.params = target.read_params()
    return (f"LoRA adapter {record.adapter!r} injected into {len(record.modules)} modules "
            f"({few(list(record.modules))}), as a run does before training; "
            "the phases are checked against the names after injection")


def _generate(args: argparse.Namespace, target: _Target, shapes: dict[str, tuple[int, ...]]) -> int:
    """What ``FinetuningScheduler(schedule_style=..., schedule_options=...)`` would generate for the model (the
    implicit default's settings under ``lpft``), with ``--steps`` as the run's budget; written or printed."""
    style = args.style or target.fts.schedule_style
    options = {k: getattr(args, k) for k in RECIPE_OPTIONS if getattr(args, k) is not None}
    if options.get("phase_steps") and len(options["phase_steps"]) == 1:
        options["phase_steps"] = options["phase_steps"][0]
    if "phase_steps" in options and "total_steps" in options:
        raise UsageError("give either --phase_steps (the steps of each phase) or --steps (a budget split across the "
                         "phases), not both")
    if style in LORA_RECIPES:
        return _generate_lora(args, target, style, options)
    if style == "pairs" and options:
        raise UsageError(f"--recipe pairs takes no recipe options (got {', '.join(_flags(sorted(options)))}); use one "
                         f"of {', '.join(s for s in generate.STYLES if s != 'pairs')} for lrs and phase lengths")
    total = options.pop("total_steps", None)
    facts = generate.RunFacts(total_steps=total, budget_source="--steps", no_budget="no --steps or --phase_steps")
    problem = None
    try:
        made = generate.generate_implicit(target.structure, RunOptions(schedule_style=style, schedule_options=options),
                                          facts)
    except ConfigurationError as e:  # said in the command line's words, raised outside (the CLI reports the innermost)
        problem = _cli_words(str(e.__cause__ or e))
    if problem is not None:
        raise UsageError(problem)
    schedule = resolve_schedule(made.raw, shapes)
    header = [f"phasetune schedule generated for {target.model_name} (style {style!r}): {len(schedule)} phases",
              *made.notes[1:], *_phase0_note(made.raw, options.get("steps_per_epoch")),
              "edit it, then pass it as FinetuningScheduler(ft_schedule=...), PhasetuneTrainerCallback(schedule) or "
              "ScheduledFinetuning(schedule, ...)"]
    if args.output:
        schedule.dump(args.output, resolved=False, header="\n".join(header))
        print(f"wrote {args.output} ({len(schedule)} phases)")
    else:
        print("".join(f"# {line}\n" for line in header) + schedule.to_yaml(resolved=False), end="")
    return 0


def _generate_lora(args: argparse.Namespace, target: _Target, style: str, options: dict[str, Any]) -> int:
    """A LoRA recipe (:mod:`phasetune.lora.recipes`) over the model's blocks before injection, written as an ordinary
    schedule with its ``peft`` section. (``core.generate`` cannot offer these styles: core imports no ``lora``.)"""
    from phasetune.lora.recipes import lora_then_full, progressive_lora

    recipe = progressive_lora if style == "progressive_lora" else lora_then_full
    units, has_stem = generate.block_units(target.structure)
    lora = {k: getattr(args, k) for k in ("r", "alpha", "leaf", "full_blocks") if getattr(args, k) is not None}
    try:
        raw = recipe(units, has_stem=has_stem, **lora, **options)
    except (TypeError, ValueError) as e:  # an option the recipe does not take, or a bad value
        raise UsageError(f"--recipe {style}: {_cli_words(str(e))}") from None
    header = [f"phasetune schedule generated for {target.model_name} (recipe {style!r}): {len(raw) - 1} phases",
              "the peft section's adapters are injected before training (phasetune.run.inject_adapters; docs/peft.md)"]
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(raw, sort_keys=False, width=120)
    if args.output:
        atomic_write_text(args.output, text)
        print(f"wrote {args.output} ({len(raw) - 1} phases)")
    else:
        print(text, end="")
    return 0


def _flags(names: Sequence[str]) -> list[str]:
    return ["--steps" if n == "total_steps" else f"--{n}" for n in names]


def _cli_words(message: str) -> str:
    """A recipe's message in the command line's words: ``total_steps`` is ``--steps``, an option its flag."""
    return re.sub(r"(?<![\w-])(" + "|".join(RECIPE_OPTIONS) + r")\b(=?)",
                  lambda m: _flags([m.group(1)])[0] + (" " if m.group(2) else ""), message)


def _phase0_note(raw: dict[int, dict[str, Any]], steps_per_epoch: int | None) -> list[str]:
    """What the schedule cannot say about phase 0 when it sets no lr shape for it: that comes from
    configure_optimizers."""
    first = raw[0]
    if "new_lr_scheduler" in first:
        return []
    steps = first.get("max_transition_step", -1)
    if steps < 0 and steps_per_epoch and first.get("max_transition_epoch", -1) > 0:
        steps = first["max_transition_epoch"] * steps_per_epoch
    if steps < 0 or len(raw) == 1:
        return ["phase 0 trains with configure_optimizers' optimizer, lr and lr scheduler"]
    from phasetune.core.recipes import DEFAULT_WARMUP_FRACTION, phase_lr_shape

    shape = phase_lr_shape(steps, DEFAULT_WARMUP_FRACTION)
    return ["phase 0 trains with configure_optimizers' optimizer and lr; for the same lr shape, return with it",
            f"phasetune.lr_shapes.WarmupLinearDecay(optimizer, total_steps={shape['total_steps']}, "
            f"warmup_steps={shape['warmup_steps']}) stepped every step"]


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
                     lr, _rule(phase.max_transition_epoch, phase.max_transition_step, phase.index == last,
                               fts.epoch_transitions_only),
                     ("merges LoRA, then " if phase.merge_lora not in (None, False) else "")
                     + covering_modules(phase.params, list(numel), limit=2)])
    return format_table(["phase", "params (tensors)", "trainable", "lr", "ends", "thaws"], rows, align="lrrrll")


def _rule(epoch: int, step: int, final: bool, epoch_only: bool) -> str:
    stop = "run ends" if final else "next phase"
    caps = [f"epoch {epoch}"] * (epoch >= 0) + [f"step {step}"] * (step >= 0)
    if epoch_only:
        return f"{' or '.join(caps)}: {stop}"
    return f"{' or '.join(['early stopping', *caps])}: {stop}"

