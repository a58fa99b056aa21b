"""``phasetune schedule plan``: the per-phase memory plan of a run, before launch, from the command line.

The model is built from a Hugging Face config (``--model-dir``: a model folder or its ``config.json``; no
weights are read) or a factory (``--model module:factory``) under fake tensors, so a laptop CPU can plan an
8B model for 8 GPUs. It prints :meth:`phasetune.plan.MemoryPlan.table` (``--json``:
:meth:`~phasetune.plan.MemoryPlan.to_dict`) of :func:`phasetune.plan.plan_memory` called with the flags' values:
each setting flag is the :class:`phasetune.plan.PlanSetup` field of the same name (``--world-size`` is
``world_size``; ``--world_size`` works too). Progress goes to stderr, so ``--json`` can be piped.

Exit status: 0 every phase fits ``--device-gib`` (or no device size was given), 1 a phase will not fit (each
such phase is named on stderr, with by how much), 2 bad input (the message names the argument and what to
write instead).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from phasetune.errors import PhasetuneError, ScheduleError

EXIT_FITS = 0
EXIT_DOES_NOT_FIT = 1
EXIT_BAD_INPUT = 2

PLAN_USAGE = """\
phasetune schedule plan [SCHEDULE] (--model-dir PATH | --model module:factory) [--model-kwargs JSON]
                        [--world-size N] [--strategy S] [--mixed-precision bf16|fp16] [--act-ckpt]
                        [--micro-batch N] [--seq-len N] [--global-batch N] [--device-gib GIB] [--json] ...
"""

PLAN_EPILOG = """\
exit status: 0 every phase fits --device-gib (or none was given), 1 a phase will not fit (named on stderr),
2 bad input. Example (Llama-3-8B on 8 GPUs of 80 GiB; about 2 minutes of CPU time, 0.5 GiB of RAM):
  phasetune schedule plan bench/plan_configs/llama3_8b_schedule.yaml --model-dir bench/plan_configs/llama3_8b.json \\
      --world-size 8 --mixed-precision bf16 --seq-len 2048 --micro-batch 2 --global-batch 32 --device-gib 80
"""

#: the ``PlanSetup`` fields without a flag: ``tensors="real"`` is a check of the simulation on small models
NO_FLAG = ("tensors",)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, with the flag meant when one was misspelt
        from phasetune.lightning.schedule_command import UsageError

        unknown = re.findall(r"(--[\w-]+)", message) if "unrecognized arguments" in message else []
        flags = [s for a in self._actions for s in a.option_strings]
        hints = [f"{u}: did you mean {close[0]}?" for u in unknown
                 if (close := difflib.get_close_matches(u.replace("_", "-"), flags, n=1))]
        raise UsageError("; ".join([message, *hints]) + f" (see '{self.prog} --help')")


def plan_parser() -> argparse.ArgumentParser:
    """The parser of ``phasetune schedule plan`` (defaults None: an absent flag leaves PlanSetup's default)."""
    from phasetune.plan import PlanSetup
    from phasetune.plan.setup import DTYPES, IMPLS, OPTIMIZERS, STRATEGIES

    d = PlanSetup()
    p = _Parser(prog="phasetune schedule plan", usage=PLAN_USAGE, epilog=PLAN_EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Plan the memory of every phase of a schedule, per rank, before launch: the model is built\n"
                            "from its config under fake tensors (no weights, no GPU) and sharded by the run's own code.\n"
                            "Each setting flag is the phasetune.plan.PlanSetup field of that name; see docs/memory_plan.md.")
    p.add_argument("schedule", nargs="?", metavar="SCHEDULE",
                   help="schedule YAML, as the run takes it (default: phasetune's generated default schedule)")
    g = p.add_argument_group("model (one of)")
    model = g.add_mutually_exclusive_group(required=True)
    model.add_argument("--model-dir", metavar="PATH",
                       help="a Hugging Face model folder or its config.json; only the config is read")
    model.add_argument("--model", metavar="module:factory",
                       help="a function or class whose call returns the model (called under fake tensors)")
    g.add_argument("--model-kwargs", metavar="JSON",
                   help="with --model: its keyword arguments; with --model-dir: config fields to replace, e.g. "
                        "'{\"num_hidden_layers\": 4}'")
    g.add_argument("--inputs", metavar="module:function",
                   help="function(micro_batch, seq_len) -> the forward's kwargs dict or args tuple (default: token ids "
                        "for Hugging Face models, else the model's example_inputs)")
    g.add_argument("--loss", metavar="module:function", help="function(output) -> loss (default: output.loss, else the "
                                                              "sum of the first floating-point output)")
    g.add_argument("--name-prefix", metavar="PATH", help="nest the model under this attribute path (e.g. 'model'), so a "
                                                         "schedule written for a LightningModule's self.model matches")
    g = p.add_argument_group("the run")
    g.add_argument("--world-size", metavar="N", help=f"ranks; the plan is rank 0's (default {d.world_size})")
    g.add_argument("--strategy", choices=STRATEGIES, help=f"default {d.strategy}")
    g.add_argument("--fsdp-plan", metavar="YAML", help="FSDP2 fsdp_plan as the Lightning adapter takes it: a YAML/JSON "
                                                       "file or inline text (default: one unit per transformer block)")
    g.add_argument("--fsdp-default-kwargs", metavar="YAML", help="FSDP2 fully_shard kwargs of every entry (file or text)")
    g.add_argument("--block-classes", nargs="+", metavar="CLASS", help="the transformer block classes (default: found)")
    g.add_argument("--mixed-precision", choices=("bf16", "fp16"),
                   help="FSDP2 gathers in this dtype and reduces in float32; single device and DDP autocast")
    g.add_argument("--param-dtype", choices=tuple(DTYPES), help=f"dtype of the parameters (default {d.param_dtype})")
    g.add_argument("--act-ckpt", action="store_true", default=None, help="checkpoint every transformer block")
    g.add_argument("--cpu-offload", action="store_true", default=None, help="FSDP2 CPUOffloadPolicy")
    g.add_argument("--sync-every-micro-step", action="store_true", default=None,
                   help="reduce gradients every micro-step (Lightning's ModelParallelStrategy) instead of at the end "
                        "of each accumulation cycle")
    g.add_argument("--optimizer", choices=tuple(OPTIMIZERS), help=f"default {d.optimizer}")
    g.add_argument("--optimizer-impl", choices=tuple(IMPLS), help=f"default {d.optimizer_impl} (CUDA's default)")
    g.add_argument("--optimizer-kwargs", metavar="JSON", help="e.g. '{\"momentum\": 0.9}' or '{\"amsgrad\": true}'")
    g.add_argument("--micro-batch", metavar="N", help=f"samples per rank per micro-step (default {d.micro_batch})")
    g.add_argument("--seq-len", metavar="N", help=f"tokens per sample (default {d.seq_len})")
    g.add_argument("--global-batch", metavar="N", help="samples per optimizer step over all ranks (accumulation follows)")
    g.add_argument("--dataset-size", metavar="N", help="samples, for the prefix cache's host RAM")
    g.add_argument("--snapshot-storage", choices=("memory", "disk"), help=f"restore-best snapshots (default "
                                                                          f"{d.snapshot_storage})")
    g = p.add_argument_group("the device")
    g.add_argument("--device-gib", metavar="GIB", help="device memory: headroom, the largest micro-batch, exit status 1 "
                                                      "when a phase will not fit")
    g.add_argument("--reserve-gib", metavar="GIB", help=f"CUDA context and NCCL buffers (default {d.reserve_gib})")
    g.add_argument("--fragmentation", metavar="F", help=f"allocator slack, a fraction of the peak (default {d.fragmentation})")
    g.add_argument("--no-micro-batch-search", dest="search_micro_batch", action="store_false", default=None,
                   help="skip the largest-micro-batch search (faster)")
    g.add_argument("--max-micro-batch", metavar="N", help=f"the search's cap (default {d.max_micro_batch})")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print MemoryPlan.to_dict() as JSON instead of the table")
    g.add_argument("--unit", choices=("GiB", "MiB"), help="the table's unit (default: GiB, MiB for small models)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


INTS = ("world_size", "micro_batch", "seq_len", "global_batch", "dataset_size", "max_micro_batch")
FLOATS = ("device_gib", "reserve_gib", "fragmentation")
MAPPINGS = ("fsdp_plan", "fsdp_default_kwargs", "optimizer_kwargs", "model_kwargs")
PASSED = ("strategy", "mixed_precision", "param_dtype", "act_ckpt", "cpu_offload", "sync_every_micro_step",
          "optimizer", "optimizer_impl", "snapshot_storage", "search_micro_batch", "name_prefix")


def flag(name: str) -> str:
    """The command-line flag of a plan setting."""
    return "--no-micro-batch-search" if name == "search_micro_batch" else "--" + name.replace("_", "-")


def plan_arguments(args: argparse.Namespace) -> tuple[Any, str, dict[str, Any]]:
    """``(schedule, model, kwargs)`` of the :func:`phasetune.plan.plan_memory` call the flags ask for; raises
    UsageError listing every bad value (and every invalid setting) at once."""
    from phasetune.lightning.schedule_command import UsageError
    from phasetune.plan import PlanSetup

    problems: list[str] = []
    kwargs: dict[str, Any] = {k: getattr(args, k) for k in PASSED if getattr(args, k) is not None}
    if args.block_classes:
        kwargs["block_classes"] = tuple(args.block_classes)
    for names, convert, what in ((INTS, int, "an integer"), (FLOATS, _number, "a number")):
        for name in names:
            text = getattr(args, name)
            if text is None:
                continue
            try:
                kwargs[name] = convert(text)
            except ValueError:
                problems.append(f"{flag(name)} must be {what}, got {text!r}")
    for name in MAPPINGS:
        if getattr(args, name) is not None:
            value = _mapping(getattr(args, name), flag(name), problems)
            if value is not None:
                kwargs[name] = value
    if args.schedule is not None and not Path(args.schedule).is_file():
        problems.append(f"SCHEDULE {args.schedule!r}: no such file; give the schedule YAML the run uses, or leave it "
                        "out to plan phasetune's generated default")
    model = args.model
    if args.model_dir is not None:
        model = args.model_dir
        if not Path(model).exists():
            problems.append(f"--model-dir {model!r}: no such file or folder; give a Hugging Face model folder (with a "
                            "config.json) or a config.json")
    for name in ("inputs", "loss"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if problems:  # the settings' own problems too, all at once
        valid = {k: v for k, v in kwargs.items() if k in PlanSetup.__dataclass_fields__}
        problems += [cli_words(p) for p in PlanSetup(**valid).problems()]
        raise UsageError(_listed(problems))
    return args.schedule, model, kwargs


def _number(text: str) -> int | float:
    """``80`` as 80 and ``79.5`` as 79.5: printed back as written, like the value of a Python call."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _mapping(text: str, name: str, problems: list[str]) -> dict[str, Any] | None:
    """A dict from a YAML/JSON file or inline YAML/JSON text."""
    from phasetune.util.files import load_yaml

    path = Path(text)
    try:
        source = path.read_text() if path.suffix in (".yaml", ".yml", ".json") and path.is_file() else text
        value = load_yaml(source)
    except Exception as e:  # yaml's errors, duplicate keys, an unreadable file
        problems.append(f"{name}: cannot read {text!r} as YAML or JSON ({str(e).splitlines()[0]})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{name} must be a mapping such as '{{\"key\": value}}' (or a .yaml/.json file holding one), "
                        f"got {text!r}")
        return None
    return value


_SETTING = re.compile(r"(?<![\w(.'-])(" + "|".join(
    ("world_size", "strategy", "fsdp_plan", "fsdp_default_kwargs", "block_classes", "mixed_precision", "param_dtype",
     "act_ckpt", "cpu_offload", "optimizer_kwargs", "optimizer_impl", "optimizer", "micro_batch", "seq_len",
     "global_batch", "sync_every_micro_step", "device_gib", "reserve_gib", "fragmentation", "dataset_size",
     "snapshot_storage", "max_micro_batch", "name_prefix", "model_kwargs")) + r")(?=[ =;,:]|$)(=True|=)?")


def cli_words(message: str) -> str:
    """A plan setting's message in the command line's words: ``world_size`` is ``--world-size``, ``x=1`` is
    ``--x 1``, ``cpu_offload=True`` is ``--cpu-offload``."""
    return _SETTING.sub(lambda m: flag(m.group(1)) + (" " if m.group(2) == "=" else ""), message)


def _listed(problems: list[str]) -> str:
    return problems[0] if len(problems) == 1 else "\n".join([f"{len(problems)} problems:", *(f"  - {p}" for p in problems)])


def _progress(quiet: bool) -> Callable[[str], None]:
    start = time.perf_counter()

    def say(line: str) -> None:
        if not quiet:
            print(f"phasetune plan [{time.perf_counter() - start:5.0f} s] {line}", file=sys.stderr, flush=True)

    return say


def plan_main(argv: Sequence[str]) -> int:
    """``phasetune schedule plan``; returns the exit status (see the module docstring)."""
    from phasetune.lightning.schedule_command import UsageError
    from phasetune.plan import plan_memory

    argv = [_dashes(a) for a in argv]
    args = plan_parser().parse_args(argv)
    schedule, model, kwargs = plan_arguments(args)
    say = _progress(args.quiet)
    world = kwargs.get("world_size", 1)
    say(f"building {model} under fake tensors as rank 0 of {world} (no weights, no device memory)")
    bad = None
    try:
        plan = plan_memory(schedule, model, progress=say, **kwargs)
    except PhasetuneError as e:  # settings, model, schedule: what to change, in the command line's words
        problems = getattr(e, "problems", None) or [str(e)]
        bad = (f"SCHEDULE {schedule}: {_listed(problems)}" if isinstance(e, ScheduleError)
               else _listed([cli_words(p) for p in problems]))
    if bad is not None:  # raised outside the handler: the CLI reports the innermost user error of a chain
        raise UsageError(bad)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table(args.unit, timing=False))
    say(f"planned in {plan.seconds:.1f} s")
    if plan.fits is False:
        for line in plan.problems():
            print(f"phasetune: {line}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    if plan.fits is None and not args.quiet:
        print("phasetune: no --device-gib given: peaks only, nothing checked against a device", file=sys.stderr)
    return EXIT_FITS


def _dashes(arg: str) -> str:
    """``--world_size=8`` -> ``--world-size=8``: the plan_memory keyword spelling works as a flag."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return name.replace("_", "-") + eq + value


__all__ = ["EXIT_BAD_INPUT", "EXIT_DOES_NOT_FIT", "EXIT_FITS", "cli_words", "flag", "plan_arguments", "plan_main",
           "plan_parser"]
