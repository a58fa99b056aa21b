"""What finetuning-scheduler (FTS) users bring with them: FTS's callback options, read with FTS's meaning, and
checkpoints FTS wrote, recognised so that resuming one says what it is and what to do.

Each option parser returns ``(value, problems)``; :meth:`FTSArgs.parse` collects them, so that the callback raises
every problem of every argument at once.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from phasetune.errors import ConfigurationError
from phasetune.lightning.adapters import StrategyAdapter

#: keys of FTS's FinetuningScheduler state in a checkpoint (phasetune's state has ``format`` instead)
FTS_STATE_KEYS = ("fts_metadata", "internal_optimizer_metadata")


@dataclass
class FTSArgs:
    """FTS's ``FinetuningScheduler`` arguments as phasetune uses them, and what is wrong with them."""

    log_dir: str | None = None
    logging_level: int | None = None
    adapters: dict[str, type[StrategyAdapter]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, log_dir: Any, logging_level: Any, allow_untested: Any, custom_strategy_adapters: Any) -> FTSArgs:
        args = cls()
        args.log_dir, found = parse_log_dir(log_dir)
        args.problems += found
        args.logging_level, found = parse_logging_level(logging_level)
        args.problems += found
        args.adapters, found = parse_custom_strategy_adapters(custom_strategy_adapters)
        args.problems += found
        if not isinstance(allow_untested, bool):
            args.problems.append(f"allow_untested must be True or False, got {allow_untested!r}")
        return args

    def apply_logging_level(self) -> None:
        """Set the ``phasetune`` logger's level, as FTS sets its own at construction (None: leave it)."""
        if self.logging_level is not None:
            logging.getLogger("phasetune").setLevel(self.logging_level)


def parse_log_dir(value: Any) -> tuple[str | None, list[str]]:
    """``log_dir``: the directory for schedules and snapshot files (None: the trainer's log dir)."""
    if value is None:
        return None, []
    if isinstance(value, (str, os.PathLike)) and os.fspath(value):
        return os.fspath(value), []
    return None, [f"log_dir must be a directory path (str or os.PathLike) or None, got {value!r}"]


def parse_logging_level(value: Any) -> tuple[int | None, list[str]]:
    """``logging_level``: a level number (``logging.DEBUG``) or name (``"DEBUG"``) for the ``phasetune`` logger."""
    if value is None:
        return None, []
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value, []
    if isinstance(value, str) and isinstance(logging.getLevelName(value.upper()), int):
        return logging.getLevelName(value.upper()), []
    return None, [
        f"logging_level must be a logging level such as logging.DEBUG or 'INFO' (or None to leave the 'phasetune' "
        f"logger as it is), got {value!r}"
    ]


def parse_custom_strategy_adapters(value: Any) -> tuple[dict[str, type[StrategyAdapter]], list[str]]:
    """``custom_strategy_adapters``: strategy flag or class name -> adapter class or its import path
    (``"package.module.Class"`` or ``"package.module:Class"``); the classes are imported now."""
    if value is None:
        return {}, []
    if not isinstance(value, Mapping):
        return {}, [
            f"custom_strategy_adapters must map strategy names to StrategyAdapter import paths "
            f"(e.g. {{'ddp': 'my_pkg.adapters.MyAdapter'}}), got {type(value).__name__}"
        ]
    adapters: dict[str, type[StrategyAdapter]] = {}
    problems: list[str] = []
    for key, target in value.items():
        if not isinstance(key, str) or not key:
            problems.append(f"custom_strategy_adapters key {key!r} must be a strategy name such as 'ddp' or 'FSDPStrategy'")
            continue
        cls, problem = _import_adapter(target)
        if problem:
            problems.append(f"custom_strategy_adapters[{key!r}]: {problem}")
        else:
            adapters[key] = cls  # type: ignore[assignment]
    return adapters, problems


def _import_adapter(target: Any) -> tuple[type | None, str | None]:
    if isinstance(target, type):
        cls = target
    elif isinstance(target, str) and ("." in target or ":" in target):
        module_name, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as e:
            return None, f"cannot import {target!r} ({type(e).__name__}: {e}); check the import path"
    else:
        return None, f"{target!r} is not an import path 'package.module.Class' (or 'package.module:Class') of an adapter"
    if not (isinstance(cls, type) and issubclass(cls, StrategyAdapter)):
        return None, (
            f"{target!r} is not a phasetune StrategyAdapter subclass (FTS's adapters have another interface: "
            "port it to phasetune.lightning.StrategyAdapter)"
        )
    return cls, None


def fts_checkpoint_error(state: Mapping[str, Any] | None, path: Any) -> ConfigurationError | None:
    """The refusal for resuming a checkpoint whose FinetuningScheduler state FTS wrote; None for any other."""
    if not isinstance(state, Mapping) or "format" in state or not any(k in state for k in FTS_STATE_KEYS):
        return None
    meta = state.get("fts_metadata")
    depth = meta.get("current_ckpt_depth") if isinstance(meta, Mapping) else None
    at = f" at phase {depth}" if isinstance(depth, int) else ""
    return ConfigurationError(
        f"cannot resume from {path}: it was written by finetuning-scheduler (FTS){at}, whose phase and optimizer "
        "state phasetune cannot continue. Load its weights into the model (YourModule.load_from_checkpoint(path), or "
        "load_state_dict of its 'state_dict') and call fit without ckpt_path"
        + (f", e.g. with a schedule whose phase 0 thaws what FTS's phases 0..{depth} did" if isinstance(depth, int) and depth > 0 else "")
    )


def option_property(name: str) -> property:
    """A callback attribute that reads and writes ``self.options.<name>``: FTS's flat option names on the callback,
    kept in its one ``RunOptions``."""
    return property(lambda self: getattr(self.options, name), lambda self, value: setattr(self.options, name, value))
