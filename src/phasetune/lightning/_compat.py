"""The only place phasetune touches Lightning internals or patches Lightning objects; each use says why.

Every entry pins phasetune to something that may change in a Lightning minor release, so each one is the
smallest access that does the job, with a comment on why nothing public does. A private name that is
missing raises :class:`LightningInternalsError` (naming the installed Lightning and what phasetune expected)
instead of falling back to a guess. Every patch of an instance returns an :data:`Undo` that puts the
object back as it was; the strategy adapters run them when a fit ends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from phasetune.errors import PhasetuneError

#: puts a patched object back as it was; safe to call twice, and a no-op once something else replaced the patch
Undo = Callable[[], None]

_ORIGINAL = "__phasetune_replaces__"  # on a patch: what the instance held before it (_ABSENT: nothing)
_ABSENT = object()


class LightningInternalsError(PhasetuneError, RuntimeError):
    """The installed Lightning lacks an internal phasetune relies on (it changed in a release)."""


def _lightning_version() -> str:
    import lightning

    return str(getattr(lightning, "__version__", "unknown"))


def _missing(what: str, why: str) -> LightningInternalsError:
    return LightningInternalsError(
        f"phasetune needs {what} ({why}), which the installed Lightning {_lightning_version()} does not have; "
        "install the Lightning phasetune is tested with (2.6), or report this so phasetune can follow the change"
    )


# ------------------------------------------------------------------------------------------------ patches


def patch_method(obj: Any, name: str, wrapper: Callable[..., Any]) -> Undo:
    """Replace ``obj.name`` on this instance by ``wrapper(original, *args, **kwargs)``; return its undo.

    ``original`` is what ``obj.name`` was before (the class's method, or the user's own instance attribute).
    A patch phasetune left on the instance (a fit that never reached teardown) is removed first, so patches
    never stack. The replacement is a plain function, so Lightning's ``is_overridden`` sees a hook as overridden.
    """
    before = obj.__dict__.get(name, _ABSENT)
    while before is not _ABSENT and hasattr(before, _ORIGINAL):
        before = getattr(before, _ORIGINAL)
    if before is _ABSENT:
        obj.__dict__.pop(name, None)
    else:
        obj.__dict__[name] = before
    original = getattr(obj, name)

    def patched(*args: Any, **kwargs: Any) -> Any:
        return wrapper(original, *args, **kwargs)

    setattr(patched, _ORIGINAL, before)
    obj.__dict__[name] = patched

    def undo() -> None:
        if obj.__dict__.get(name) is not patched:
            return  # undone already, or replaced by someone else since: leave theirs
        if before is _ABSENT:
            del obj.__dict__[name]
        else:
            obj.__dict__[name] = before

    return undo


def route_load_checkpoint(strategy: Any, wrapper: Callable[..., Any]) -> Undo:
    """Run ``wrapper(original, checkpoint_path, *args, **kwargs)`` as ``strategy.load_checkpoint``.

    Why: ``FSDPStrategy``/``ModelParallelStrategy`` load optimizer state in ``load_checkpoint``, before
    callbacks are restored, and Lightning has no hook in between where the saved phase could be rebuilt.
    """
    return patch_method(strategy, "load_checkpoint", wrapper)


def replace_optimizer_state(strategy: Any, wrapper: Callable[..., Any]) -> Undo:
    """Run ``wrapper(original, optimizer)`` as ``strategy.optimizer_state``.

    Why: ``FSDPStrategy.optimizer_state`` re-keys full optimizer state by parameter index, which fails with
    FlatParameters and depends on the group order phases change; there is no option to key it by name.
    """
    return patch_method(strategy, "optimizer_state", wrapper)


def replace_clip_grad_by_norm(precision_plugin: Any, wrapper: Callable[..., Any]) -> Undo:
    """Run ``wrapper(original, optimizer, clip_val)`` as ``precision_plugin.clip_grad_by_norm``.

    Why: ``gradient_clip_val`` reaches ``torch.nn.utils.clip_grad_norm_`` there, which fails on DTensors of
    several meshes; the only public alternative, ``LightningModule.configure_gradient_clipping``, is the user's.
    """
    return patch_method(precision_plugin, "clip_grad_by_norm", wrapper)


def before_train_iterator(trainer: Any, prepare: Callable[[Any], None]) -> Undo:
    """Patch ``trainer.strategy.process_dataloader`` so that each training loader's sampler gets the fit's
    epoch (``set_epoch``) and ``prepare(loader)`` runs after Lightning built the loader and before it creates
    the loader's iterator.

    Why: Lightning 2.6's ``fit_loop.setup_data`` builds the loader (which may draw from the generators), loads
    a stateful loader's saved position and creates its iterator before ``on_advance_start`` calls
    ``set_epoch`` and before any callback hook of the run. A sampler that computes its order as its iterator is
    made (torchdata's, and Lightning's ``DistributedSamplerWrapper``), or a fast-forward to a saved position,
    then uses epoch 0's order in a resumed run. ``strategy.process_dataloader`` is the last call on the loader
    before that, with no hook in between; the epoch is the one Lightning passes ``set_epoch`` right after (the
    fit loop's ``epoch_progress``, restored from the checkpoint), given with its private
    ``_set_sampler_epoch`` helper (the sampler, or the batch sampler's).
    """
    from lightning.fabric.utilities.data import _set_sampler_epoch

    fit_loop = trainer.fit_loop

    def process_dataloader(original: Callable[..., Any], dataloader: Any) -> Any:
        dataloader = original(dataloader)
        if trainer.training:
            _set_sampler_epoch(dataloader, fit_loop.epoch_progress.current.processed)
            prepare(dataloader)
        return dataloader

    return patch_method(trainer.strategy, "process_dataloader", process_dataloader)


def before_each_sampler_redraw(dataloader: Any, before: Callable[[], None]) -> Undo:
    """Run ``before()`` each time a sampler that Lightning wrapped for distributed training (its
    ``DistributedSamplerWrapper``) in ``dataloader`` redraws its order, until undone.

    Why: the wrapper draws the wrapped sampler's whole order as each of its iterators starts (in the private
    ``_DatasetSamplerWrapper.reset``), and torchdata's ``StatefulDataLoader``, loading a saved position, starts
    the sampler's iterator twice (as the loader's iterator is built, then again to fast-forward): two draws where
    the interrupted run made one, of which the second is used. ``before`` puts the generators back first.
    """
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    samplers = (getattr(dataloader, "sampler", None), getattr(getattr(dataloader, "batch_sampler", None), "sampler", None))
    undos = []
    for sampler in {id(s): s for s in samplers if isinstance(s, DistributedSamplerWrapper)}.values():
        def reset(original: Callable[[], None]) -> None:
            before()
            original()

        undos.append(patch_method(sampler.dataset, "reset", reset))

    def undo() -> None:
        for fn in undos:
            fn()

    return undo


def set_fsdp_auto_wrap_policy(strategy: Any, policy: Any) -> Undo:
    """Make ``FSDPStrategy`` wrap with ``policy``; return the undo that gives it back the previous policy.

    Why: the strategy keeps the ``auto_wrap_policy`` it passes to FSDP in the undocumented ``kwargs`` dict, and
    offers no way to change it after construction.
    """
    kwargs = _fsdp_kwargs(strategy)
    before = kwargs.get("auto_wrap_policy", _ABSENT)
    kwargs["auto_wrap_policy"] = policy

    def undo() -> None:
        if kwargs.get("auto_wrap_policy", _ABSENT) is not policy:
            return
        if before is _ABSENT:
            del kwargs["auto_wrap_policy"]
        else:
            kwargs["auto_wrap_policy"] = before

    return undo


def fsdp_auto_wrap_policy(strategy: Any) -> Any:
    """The ``auto_wrap_policy`` an ``FSDPStrategy`` passes to FSDP (None: none).

    Why: the strategy keeps it only in the undocumented ``kwargs`` dict (a set of classes given to the
    strategy is already turned into a ``ModuleWrapPolicy`` there).
    """
    return _fsdp_kwargs(strategy).get("auto_wrap_policy")


def _fsdp_kwargs(strategy: Any) -> dict[str, Any]:
    kwargs = getattr(strategy, "kwargs", None)
    if not isinstance(kwargs, dict):
        raise _missing(
            f"{type(strategy).__name__}.kwargs (a dict holding what the strategy passes to FSDP)",
            "to combine its auto_wrap_policy with awp_overrides and min_num_params",
        )
    return kwargs


# ------------------------------------------------------------------------------------------------ reads


def fsdp_state_dict_type(strategy: Any) -> str:
    """``"full"`` or ``"sharded"``: how an ``FSDPStrategy`` writes checkpoints.

    Why: ``FSDPStrategy(state_dict_type=...)`` keeps the choice only in the private ``_state_dict_type``;
    the FSDP1 adapter consolidates optimizer state for full checkpoints only.
    """
    value = getattr(strategy, "_state_dict_type", None)
    if value not in ("full", "sharded"):
        raise _missing(
            f"{type(strategy).__name__}._state_dict_type ('full' or 'sharded'; found {value!r})",
            "to know whether checkpoints hold consolidated optimizer state",
        )
    return str(value)


def fsdp_full_checkpoint_weights_only(weights_only: bool | None) -> bool | None:
    """The ``weights_only`` ``FSDPStrategy.load_checkpoint`` effectively reads a full (one-file) checkpoint with.

    Why: it reads full checkpoints with Lightning's private ``_lazy_load``, which unpickles everything whatever
    ``weights_only`` says, and Lightning 2.6 passes None for resumes under FSDP anyway (``trainer.fit(...,
    weights_only=...)`` is dropped for strategies that restore after setup). phasetune's read of the same file
    just before is no stricter: an explicit value is honoured, None reads it as Lightning will.
    """
    return False if weights_only is None else weights_only


def sharded_checkpoint_metadata_name() -> str:
    """The file name, inside a sharded (distributed-checkpoint) Lightning checkpoint directory, of the file
    that holds the non-tensor state (callbacks, loops, hyperparameters).

    Why: Lightning names it with the private ``_METADATA_FILENAME`` (``meta.pt``) and has no public accessor.
    """
    from lightning.fabric.utilities import load

    name = getattr(load, "_METADATA_FILENAME", None)
    if not isinstance(name, str):
        raise _missing(
            "lightning.fabric.utilities.load._METADATA_FILENAME (the name of a sharded checkpoint's meta.pt)",
            "to read the FinetuningScheduler state before the strategy loads optimizer state",
        )
    return name


def model_parallel_optimizer_key(index: int = 0) -> str:
    """The key under which ``ModelParallelStrategy`` stores optimizer ``index`` in a distributed checkpoint.

    Why: its ``save_checkpoint``/``load_checkpoint`` name it ``f"optimizer_{index}"`` inline; no public constant.
    """
    return f"optimizer_{index}"


def copy_callback(plain: Any, cls: type) -> Any:
    """An instance of ``cls`` (a subclass of ``type(plain)``) holding ``plain``'s settings and state as they are.

    Why: ``EarlyStopping``/``ModelCheckpoint`` keep settings in attributes their ``__init__`` derives from its
    arguments (some private, e.g. ``_last_global_step_saved``); there is no public way to rebuild one as a
    subclass, so the instance attributes are copied.
    """
    if not isinstance(getattr(plain, "__dict__", None), dict):
        raise _missing(f"an instance __dict__ on {type(plain).__name__}", f"to upgrade it to {cls.__name__}")
    new = cls.__new__(cls)
    new.__dict__.update(plain.__dict__)
    return new


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


def mid_epoch_position(checkpoint: Mapping[str, Any]) -> tuple[int, bool] | None:
    """For a checkpoint saved in the middle of a training epoch: the batches done in that epoch and whether the
    train DataLoader saved its position (a stateful loader); None for a checkpoint saved at an epoch's end.

    Why: Lightning keeps the loop position only in the private layout of its loops' state (``fit_loop`` ->
    ``epoch_loop.batch_progress``, and ``state_dict`` -> ``combined_loader`` for a stateful loader's position);
    there is no public accessor.
    """
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    progress = fit_loop.get("epoch_loop.batch_progress") or {}
    batches = (progress.get("current") or {}).get("ready", 0)
    if not batches or progress.get("is_last_batch", True):
        return None
    return int(batches), bool((fit_loop.get("state_dict") or {}).get("combined_loader"))


class _GlobalStep:
    """``trainer.global_step`` behind the progress counter's interface (a Lightning whose loops differ)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    @property
    def completed(self) -> int:
        return int(self.trainer.global_step)


def optimizer_steps(trainer: Any, pl_module: Any) -> Any:
    """An object whose ``completed`` is ``trainer.global_step``, read once per optimizer step by the callback.

    Why: ``trainer.global_step`` is a property chain that costs about ten times the rest of the per-step hook;
    Lightning's optimizer-step progress counter (private: ``fit_loop.epoch_loop`` -> ``automatic_optimization.
    optim_progress.optimizer.step.total``, or ``manual_optimization.optim_step_progress.total``) is the object it
    reads, updated in place (also when a checkpoint is restored). It is checked against the property once; a
    Lightning whose loops differ gets the property itself.
    """
    loop = trainer.fit_loop.epoch_loop
    try:
        counter = (loop.automatic_optimization.optim_progress.optimizer.step.total if pl_module.automatic_optimization
                   else loop.manual_optimization.optim_step_progress.total)
        if counter.completed == trainer.global_step:
            return counter
    except AttributeError:
        pass
    return _GlobalStep(trainer)


def progress_bar_integer(trainer: Any, key: str) -> Undo:
    """Show the logged value ``key`` as an integer in this fit's progress bar; return the undo.

    Why: Lightning keeps every logged value as a float tensor and its bars print floats with three decimals
    (``ft_phase: 0.000``). The bar's ``get_metrics``, the method Lightning documents for changing what a bar
    shows, is wrapped on the instance: it gives the TQDM bar an ``int`` (printed as is) and the Rich bar a
    ``str`` (it formats every number, ints too, with three decimals).
    """
    from lightning.pytorch.callbacks import RichProgressBar

    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is None or not callable(getattr(bar, "get_metrics", None)):
        return lambda: None
    as_text = isinstance(bar, RichProgressBar)

    def get_metrics(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        items = original(*args, **kwargs)
        value = items.get(key) if isinstance(items, dict) else None
        if isinstance(value, float) and value.is_integer():
            items = {**items, key: str(int(value)) if as_text else int(value)}
        return items

    return patch_method(bar, "get_metrics", get_metrics)
