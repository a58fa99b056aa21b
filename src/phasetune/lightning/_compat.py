"""The only place phasetune touches private Lightning names; each use says why.

Keep this module small: every entry pins phasetune to Lightning internals that may change in a minor
release, so each one is the smallest access that does the job, with a comment on why nothing public does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def apply_cli_optimizers(cli: Any, model: Any, config_init: Any) -> None:
    """Give ``model`` the optimizer/lr scheduler a LightningCLI config sets with ``--optimizer``.

    LightningCLI does this only for the model it instantiated itself (``cli.model``); the ``phasetune fit``
    baseline builds a second model from the same config, and ``_add_configure_optimizers_method_to_model``
    is the only implementation of "``--optimizer`` overrides ``configure_optimizers``". It reads
    ``cli.model`` and ``cli.config_init``, so both are swapped for the call and restored afterwards.
    """
    saved = cli.model, cli.config_init
    try:
        cli.model = model
        cli.config_init = {cli.subcommand: config_init} if cli.subcommand else config_init
        cli._add_configure_optimizers_method_to_model(cli.subcommand)
    finally:
        cli.model, cli.config_init = saved


def checkpoint_metadata_file(checkpoint_dir: Path) -> Path:
    """The file of a sharded (distributed-checkpoint) Lightning checkpoint directory that holds the
    non-tensor state (callbacks, loops, hyperparameters).

    Lightning names it with the private ``_METADATA_FILENAME`` (``meta.pt``) and has no public accessor.
    """
    from lightning.fabric.utilities.load import _METADATA_FILENAME  # private: no public name for meta.pt

    return Path(checkpoint_dir) / _METADATA_FILENAME


def fsdp_state_dict_type(strategy: Any) -> str:
    """``"full"`` or ``"sharded"``: how an ``FSDPStrategy`` writes checkpoints.

    ``FSDPStrategy(state_dict_type=...)`` keeps the choice only in the private ``_state_dict_type``; the FSDP1
    adapter needs it to consolidate optimizer state for full checkpoints only.
    """
    return str(getattr(strategy, "_state_dict_type", "full"))  # private: no public accessor
