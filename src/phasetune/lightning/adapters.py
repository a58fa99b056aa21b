"""Strategy adapters: what the callback needs to know about how a strategy holds the model.

The default adapter serves single-device training and makes the full checkpoint files Lightning writes
appear whole or not at all (:meth:`StrategyAdapter.route_file_saves`); :class:`DDPStrategyAdapter` adds the one
thing DDP needs: ``DistributedDataParallel`` only synchronises gradients of parameters that required grad when it
was built, so after each thaw the model is wrapped again (``DDPStrategy.configure_ddp``) or the newly
thawed parameters would silently train differently on each rank.

Sharded strategies register their own adapters with :func:`register_adapter`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy, StrategyRegistry
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch.nn.parallel import DistributedDataParallel

from phasetune.errors import ConfigurationError
from phasetune.lightning import _compat, messages
from phasetune.util.files import atomic_torch_save, partial_path, remove_leftovers

if TYPE_CHECKING:
    import lightning.pytorch as pl


class StrategyAdapter:
    """Default behaviour (single device). Subclass to support another strategy.

    ``cfg`` comes from ``FinetuningScheduler(strategy_adapter_cfg=...)``; the default adapter takes none.
    """

    #: keys this adapter accepts in ``strategy_adapter_cfg``
    config_keys: tuple[str, ...] = ()

    def __init__(self, **cfg: Any) -> None:
        unknown = sorted(set(cfg) - set(self.config_keys))
        if unknown:
            allowed = ", ".join(self.config_keys) or "none"
            raise ConfigurationError(
                f"strategy_adapter_cfg has keys {unknown} that {type(self).__name__} does not take "
                f"(it accepts: {allowed})"
            )
        self.cfg = cfg
        self.trainer: pl.Trainer | None = None

    def connect(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self.route_file_saves(trainer.strategy)

    def route_file_saves(self, strategy: Strategy) -> None:
        """Make the full checkpoint files the strategy's ``TorchCheckpointIO`` writes to local paths appear whole
        or not at all (until :meth:`release`).

        Lightning writes one into a temporary file in the system's temporary directory and moves it to its name;
        where that directory is on another filesystem (a tmpfs ``/tmp``, checkpoints on disk) the move is a copy,
        and a process killed during it leaves a partial checkpoint under the final name, which a resume with
        ``ckpt_path="last"`` then fails to load. Here the file is written under a hidden name in its own directory
        (:func:`phasetune.util.files.partial_path`), flushed to disk and renamed over its name; what saves killed before
        left there is removed after the next one. A remote (fsspec URL) path, ``storage_options`` and a
        CheckpointIO of the user's own keep Lightning's way.
        """
        io = strategy.checkpoint_io
        base = getattr(io, "checkpoint_io", io)  # AsyncCheckpointIO saves through the one it wraps
        if not isinstance(base, TorchCheckpointIO) or type(base).save_checkpoint is not TorchCheckpointIO.save_checkpoint:
            return

        def save_checkpoint(original: Any, checkpoint: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
            storage_options = kwargs.get("storage_options", args[0] if args else None)
            if storage_options is not None or "://" in str(path):
                return original(checkpoint, path, *args, **kwargs)
            final = Path(path)
            atomic_torch_save(checkpoint, final, tmp=partial_path(final))
            remove_leftovers(final.parent)  # saves go one at a time: none other is under way here
            return None

        # why a patch: Lightning has no option to write its checkpoint files next to their final name
        self.keep_undo(_compat.patch_method(base, "save_checkpoint", save_checkpoint))

    # -- names ------------------------------------------------------------------------------------
    def named_parameters(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """Every parameter by its logical (schedule) name, in registration order: the tensor that trains it
        (several names may share one, e.g. an FSDP1 FlatParameter)."""
        return dict(pl_module.named_parameters())

    def named_buffers(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return dict(pl_module.named_buffers())

    def param_shapes(self, pl_module: pl.LightningModule) -> dict[str, tuple[int, ...]]:
        """Every parameter's logical (unsharded) shape, by logical name, in registration order.

        Override when :meth:`named_parameters` maps names to tensors of another shape (FSDP1 FlatParameters).
        """
        return {n: tuple(p.shape) for n, p in self.named_parameters(pl_module).items()}

    def structure_module(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        """The module whose structure implicit schedules are generated from (logical names)."""
        return pl_module

    # -- lifecycle hooks ----------------------------------------------------------------------------
    def defer_init(self, pl_module: pl.LightningModule) -> bool:
        """Resolve the schedule at ``on_fit_start`` instead of ``setup`` (parameters made later)."""
        return not any(True for _ in pl_module.parameters())

    def after_thaw(self, trainer: pl.Trainer) -> None:
        """Called after parameters were thawed (a transition or a resume)."""

    def hook_module(self, pl_module: pl.LightningModule, name: str, wrapper: Callable[..., Any]) -> None:
        """Run ``wrapper(original)`` as ``pl_module``'s hook ``name`` for this fit (undone by :meth:`release`)."""
        self.keep_undo(_compat.patch_method(pl_module, name, wrapper))

    def keep_undo(self, undo: _compat.Undo) -> None:
        """Run ``undo`` (of a patch made for this fit) in :meth:`release`."""
        self._undo = [*getattr(self, "_undo", []), undo]

    def release(self) -> None:
        """Undo every patch made for this fit, newest first (the callback calls it at the end of a fit), so
        the module, strategy and precision plugin are left as the user gave them (picklable, no phasetune
        closures, ready for another fit)."""
        undo, self._undo = getattr(self, "_undo", []), []
        for fn in reversed(undo):
            fn()

    def check(self, fts: Any, trainer: pl.Trainer) -> list[str]:
        """Strategy-specific problems found before training (the callback raises them together)."""
        return []

    # -- optimizer and scheduler installation ---------------------------------------------------------
    def install_optimizer(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        trainer.strategy.optimizers = [optimizer]

    def install_scheduler(self, trainer: pl.Trainer, scheduler: Any, cfg: Mapping[str, Any]) -> None:
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        fields = {"interval": "epoch", "frequency": 1, **cfg}
        fields.setdefault("reduce_on_plateau", plateau)
        if plateau and not fields.get("monitor"):
            raise ConfigurationError(
                "a ReduceLROnPlateau installed by new_lr_scheduler needs pl_lrs_cfg.monitor (e.g. monitor: val_loss)"
            )
        trainer.strategy.lr_scheduler_configs = [LRSchedulerConfig(scheduler=scheduler, **fields)]

    # -- snapshots --------------------------------------------------------------------------------------
    snapshot_copy: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    #: restore-best snapshots hold this rank's own shards (sharded strategies): each rank keeps its own, in a
    #: file of its own when rank 0 writes the checkpoint, never gathered
    rank_local_snapshots: bool = False


class DDPStrategyAdapter(StrategyAdapter):
    """Re-wraps the model in DDP after each thaw so newly trainable parameters are synchronised."""

    def after_thaw(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        if isinstance(strategy.model, DistributedDataParallel):
            assert isinstance(strategy, DDPStrategy)
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()


_REGISTRY: list[tuple[Callable[[Strategy], bool], type[StrategyAdapter]]] = []


def register_adapter(matches: Callable[[Strategy], bool], adapter: type[StrategyAdapter]) -> None:
    """Use ``adapter`` for strategies ``matches`` accepts (checked before the built-in ones)."""
    _REGISTRY.insert(0, (matches, adapter))


def _is_plain_ddp(strategy: Strategy) -> bool:
    # DeepSpeed subclasses DDPStrategy but manages parameters and optimizers itself.
    return isinstance(strategy, DDPStrategy) and type(strategy).__name__ != "DeepSpeedStrategy"


register_adapter(_is_plain_ddp, DDPStrategyAdapter)
register_adapter(lambda s: isinstance(s, SingleDeviceStrategy), StrategyAdapter)


def strategy_names(strategy: Strategy) -> set[str]:
    """The names a strategy goes by: its class name, its ``strategy_name``, and the Lightning registry names of
    its class (``ddp``, ``ddp_spawn``, ... all name ``DDPStrategy``)."""
    names = {type(strategy).__name__, type(strategy).__name__.lower()}
    if isinstance(getattr(strategy, "strategy_name", None), str):
        names.add(strategy.strategy_name)
    names.update(name for name, entry in StrategyRegistry.items() if entry.get("strategy") is type(strategy))
    return names


def _custom_adapter(strategy: Strategy, custom: Mapping[str, type[StrategyAdapter]]) -> type[StrategyAdapter] | None:
    names = strategy_names(strategy)
    lowered = {n.lower() for n in names}
    chosen = {key: cls for key, cls in custom.items() if key in names or key.lower() in lowered}
    if len(set(chosen.values())) > 1:
        raise ConfigurationError(
            f"custom_strategy_adapters has several adapters for the {type(strategy).__name__} strategy "
            f"({', '.join(f'{k!r}: {c.__name__}' for k, c in chosen.items())}); keep one"
        )
    if chosen:
        return next(iter(chosen.values()))
    messages.warn(
        f"custom_strategy_adapters has no entry for the {type(strategy).__name__} strategy (keys: "
        f"{', '.join(map(repr, custom))}; it goes by {', '.join(map(repr, sorted(names)))}); using the built-in adapter"
    )
    return None


def select_adapter(
    strategy: Strategy,
    cfg: Mapping[str, Any] | None = None,
    *,
    custom: Mapping[str, type[StrategyAdapter]] | None = None,
    allow_untested: bool = False,
) -> StrategyAdapter:
    """The adapter for ``strategy``, built with ``cfg``.

    ``custom`` (strategy name -> adapter class, see :func:`strategy_names`) is looked up first, then the
    registry. A strategy neither knows is refused, or with ``allow_untested`` run with the default adapter.
    """
    chosen = _custom_adapter(strategy, custom) if custom else None
    if chosen is None:
        chosen = next((adapter for matches, adapter in _REGISTRY if matches(strategy)), None)
    if chosen is None and allow_untested:
        messages.warn(
            f"allow_untested=True: running the {type(strategy).__name__} strategy with the default StrategyAdapter "
            "(single-device behaviour); phasetune has not been tested with it."
        )
        chosen = StrategyAdapter
    if chosen is None:
        supported = "single-device and DDP strategies (ddp, ddp_spawn, ddp_notebook)"
        extra = [a.__name__ for _, a in _REGISTRY if a not in (StrategyAdapter, DDPStrategyAdapter)]
        if extra:
            supported += " and those with adapters: " + ", ".join(sorted(set(extra)))
        raise ConfigurationError(
            f"FinetuningScheduler does not support the {type(strategy).__name__} strategy yet; it supports "
            f"{supported}. Use one of those, write a StrategyAdapter for it (custom_strategy_adapters or "
            "register_adapter), or pass allow_untested=True to try the default adapter."
        )
    return chosen(**dict(cfg or {}))
