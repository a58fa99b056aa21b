"""ModelParallelStrategyAdapter: scheduled fine-tuning under Lightning's ModelParallelStrategy (FSDP2).

What the strategy needs beyond the default adapter:

- **Sharding by plan.** ``fsdp_plan`` (module names/regexes -> ``fully_shard`` kwargs) and
  ``fsdp_default_kwargs`` are applied right after the LightningModule's own ``configure_model`` and before
  ``configure_optimizers`` (see :mod:`phasetune.sharding.plan`); the root is sharded last. Sharding
  replaces parameters by DTensors, so the schedule is resolved at ``on_fit_start``, on logical names.
- **Checks before training** (:meth:`ModelParallelStrategyAdapter.check`): every parameter that will train
  in one ``fully_shard`` unit must share a dtype (an error); optimizer groups that would mix meshes,
  DTensors and plain tensors, or dtypes are split (a note); scheduled parameters left in the root unit
  (a memory hint).
- **Gradient clipping** with ``gradient_clip_val``: one global norm across meshes and plain tensors.
- **Resume.** The strategy loads optimizer state together with the model, before callbacks are restored,
  and DCP only loads into an optimizer shaped like the saved one. The adapter reads the callback's saved
  state first, rebuilds the saved phase (thawed set and groups), gives the optimizer state for exactly the
  parameters the checkpoint has state for (:mod:`phasetune.sharding.optim_state`), and only then lets the
  strategy load.
- **Per-rank snapshots.** Restore-best snapshots hold each rank's shards; each rank keeps its own in a file
  that checkpoints (written by rank 0) reference, never gathered.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

from phasetune.lightning import _compat
from phasetune.lightning.adapters import register_adapter
from phasetune.lightning.sharded import ShardedStrategyAdapter
from phasetune.sharding import clip, export, groups, optim_state
from phasetune.sharding import plan as fsdp_plan
from phasetune.sharding.names import logical_name, logical_view, param_units

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger("phasetune")


class ModelParallelStrategyAdapter(ShardedStrategyAdapter):
    """Adapter for ``ModelParallelStrategy``; ``strategy_adapter_cfg`` takes ``fsdp_plan`` and ``fsdp_default_kwargs``.

    Both are validated when the adapter is built (every problem at once); plan names are matched against
    the model after ``configure_model``.
    """

    config_keys = ("fsdp_plan", "fsdp_default_kwargs")

    def __init__(self, **cfg: Any) -> None:
        super().__init__(**cfg)
        self.default_kwargs: dict[str, Any] = dict(cfg.get("fsdp_default_kwargs") or {})
        self.entries = fsdp_plan.parse_plan(cfg.get("fsdp_plan"), self.default_kwargs)
        self.plan_report: fsdp_plan.PlanReport | None = None
        self.group_notes: list[str] = []
        self._fts: Any = None

    # -- wiring -------------------------------------------------------------------------------------
    def connect(self, trainer: pl.Trainer) -> None:
        super().connect(trainer)
        pl_module = trainer.lightning_module
        strategy = trainer.strategy

        # configure_model is a public hook: the plan runs right after the class's own configure_model.
        def configure_model(original: Any) -> None:
            original()
            if pl_module.device_mesh is not None:  # a later fit under another strategy: nothing to shard over
                self.apply_plan(pl_module)

        self.hook_module(pl_module, "configure_model", configure_model)

        # gradient_clip_val: clip with one global norm across meshes and plain tensors.
        precision = trainer.precision_plugin

        def clip_grad_by_norm(original: Any, optimizer: torch.optim.Optimizer, clip_val: float) -> None:
            clip.clip_grad_norm_(list(precision.main_params(optimizer)), clip_val)

        self.keep_undo(_compat.replace_clip_grad_by_norm(precision, clip_grad_by_norm))
        # The strategy loads optimizer state in load_checkpoint, before callbacks are restored: rebuild the
        # saved phase first (see the module docstring).
        self.route_checkpoint_loads(strategy)
        self.route_checkpoint_saves(strategy)  # sharded checkpoints appear complete or not at all

    def mesh(self, pl_module: pl.LightningModule) -> Any:
        """The mesh plan entries shard over: the strategy's ``data_parallel`` mesh."""
        mesh = pl_module.device_mesh
        if mesh is None:
            return None
        names = mesh.mesh_dim_names or ()
        return mesh["data_parallel"] if "data_parallel" in names else mesh

    def apply_plan(self, pl_module: pl.LightningModule) -> fsdp_plan.PlanReport:
        """Shard ``pl_module`` by the plan (modules already sharded are skipped); the root last."""
        first = self.plan_report is None
        report = fsdp_plan.apply_plan(
            pl_module, self.entries, mesh=self.mesh(pl_module), default_kwargs=self.default_kwargs, shard_root=True
        )
        self.plan_report = report if first or report.sharded else self.plan_report
        trainer = self.trainer
        if first and trainer is not None and trainer.is_global_zero:
            for note in report.notes:
                log.info("phasetune: %s", note)
            ckpt = f"; activation checkpointing on {len(report.act_ckpt)}" if report.act_ckpt else ""
            log.info("phasetune: fsdp_plan sharded %d modules (root %r last)%s", len(report.sharded), report.root, ckpt)
        return report

    # -- names ----------------------------------------------------------------------------------------
    def named_parameters(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {logical_name(n): p for n, p in pl_module.named_parameters()}

    def named_buffers(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {logical_name(n): b for n, b in pl_module.named_buffers()}

    def structure_module(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        return logical_view(pl_module)

    def after_thaw(self, trainer: pl.Trainer) -> None:
        """Free gathered parameters so the next forward gathers the restored and thawed ones.

        Units with ``reshard_after_forward=False`` (the root by default) stay gathered after a validation
        forward; restore-best writes the sharded parameters, so the gathered copies would be stale. Under a
        ``mp_policy``, units frozen at their first forward learn the thawed parameters' gradient dtypes
        (:func:`phasetune.sharding.plan.refresh_unit_dtypes`; torch 2.13 fixes them at the first forward).
        """
        fsdp_plan.reshard_all(trainer.lightning_module)
        fsdp_plan.refresh_unit_dtypes(trainer.lightning_module)

    # -- checks ---------------------------------------------------------------------------------------
    def check(self, fts: Any, trainer: pl.Trainer) -> list[str]:
        """Dtype per unit (errors); homogeneous optimizer groups (split, with a note); root-unit memory hint."""
        self._fts = fts
        run = fts.run
        pl_module = trainer.lightning_module
        units = param_units(pl_module)
        phase_of = {n: k for k in range(run.final_depth + 1) for n in run.schedule[k].params}
        problems = dtype_problems(run.params, units, phase_of)
        self._split_groups(fts, trainer)
        hint = root_unit_hint(units, phase_of, self.plan_report.root if self.plan_report else None)
        if hint and trainer.is_global_zero:
            rank_zero_warn(hint)
        return problems

    def _split_groups(self, fts: Any, trainer: pl.Trainer) -> None:
        run = fts.run
        name_of = run.name_of
        optimizer = trainer.optimizers[0]
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        notes = [f"phase 0: {n}" for n in groups.split_optimizer_groups(optimizer, schedulers, name_of)]
        for k in range(1, run.final_depth + 1):
            raw = run.groups_for(k)
            _, split_notes = groups.split_groups(raw, name_of, label=lambda i, k=k: f"phase {k} group {i}")
            notes.extend(split_notes)
        run.split_groups_with(lambda gs: groups.split_groups(gs, name_of)[0])
        self.group_notes = notes
        if notes and trainer.is_global_zero:
            rank_zero_warn(
                "phasetune split optimizer param groups so each holds one dtype and one device mesh (foreach/fused "
                "optimizer kernels and gradient clipping reject mixed groups); the parts keep the group's "
                "hyperparameters and lr:\n  - " + "\n  - ".join(notes)
            )

    # -- resume -------------------------------------------------------------------------------------------
    def checkpoint_load(self, checkpoint_path: Any, weights_only: bool | None) -> AbstractContextManager[Any]:
        """Rebuild the checkpoint's phase, then shape the optimizer's state like the checkpoint's for the
        strategy's load (see :mod:`phasetune.sharding.optim_state`): parameters whose phase began right
        before the save have no saved state and start fresh, as in the uninterrupted run."""
        trainer = self.trainer
        if not self.resume_from(checkpoint_path, weights_only) or trainer is None or not trainer.optimizers:
            return nullcontext()
        fs, path = url_to_fs(str(checkpoint_path))
        key = _compat.model_parallel_optimizer_key(0)
        saved = optim_state.saved_state_names(path, key) if isinstance(fs, LocalFileSystem) else None
        params = self.named_parameters(trainer.lightning_module)
        return optim_state.shaped_like_checkpoint(trainer.optimizers[0], saved, params)


# ------------------------------------------------------------------------------------------------ checks


def dtype_problems(
    params: Mapping[str, torch.Tensor], units: Mapping[str, str | None], phase_of: Mapping[str, int]
) -> list[str]:
    """One problem per parameter whose dtype differs from the rest of its unit's future-trainable parameters.

    FSDP2 reduce-scatters a unit's gradients in one dtype, fixed when the unit first runs; a parameter of
    another dtype thawed later in the same unit breaks that.
    """
    by_unit: dict[str, list[str]] = {}
    for n in phase_of:
        unit = units.get(n)
        if unit is not None:
            by_unit.setdefault(unit, []).append(n)
    problems = []
    for unit, names in by_unit.items():
        counts: dict[torch.dtype, int] = {}
        for n in names:
            counts[params[n].dtype] = counts.get(params[n].dtype, 0) + 1
        if len(counts) < 2:
            continue
        main = max(counts, key=lambda d: counts[d])
        for n in names:
            dt = params[n].dtype
            if dt != main:
                problems.append(
                    f"parameter {n!r} (phase {phase_of[n]}) is {_dt(dt)} but the other parameters that will train in "
                    f"its fully_shard unit {unit or '<root>'!r} are {_dt(main)}; FSDP2 needs one dtype per unit for "
                    f"trainable parameters: cast it to {_dt(main)} in configure_model, or give its module its own "
                    "fsdp_plan entry"
                )
    return problems


def root_unit_hint(units: Mapping[str, str | None], phase_of: Mapping[str, int], root: str | None) -> str | None:
    """A memory hint when scheduled parameters are left in the root unit (None when there are none)."""
    if root is None:
        return None
    left = [n for n in phase_of if units.get(n) == root]
    if not left:
        return None
    phases = sorted({phase_of[n] for n in left})
    return (
        f"fsdp_plan leaves {len(left)} scheduled parameter(s) of phase(s) {phases} in the root unit {root or '<root>'!r} "
        f"(e.g. {left[0]!r}); the root unit is gathered for the whole forward and backward and is not resharded after "
        "forward by default, so these parameters cost unsharded memory in every phase. Give their modules fsdp_plan "
        "entries to shard them separately."
    )


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------ checkpoints


def export_full_model(
    trainer_or_module: Any, out_dir: str | Path, *, submodule: torch.nn.Module | None = None
) -> Path | None:
    """Write the full (unsharded) weights of a trained model; call it on every rank (it gathers).

    Pass the trainer (its LightningModule is exported) or a module. ``submodule`` -- e.g. the Hugging Face
    model inside the LightningModule -- is what gets saved; Hugging Face models get ``save_pretrained``
    (``config.json`` + ``model.safetensors``). Returns the directory on rank 0, None elsewhere.
    """
    module = getattr(trainer_or_module, "lightning_module", trainer_or_module)
    return export.save_full_model(module, out_dir, submodule=submodule)


register_adapter(lambda s: isinstance(s, ModelParallelStrategy), ModelParallelStrategyAdapter)

__all__ = ["ModelParallelStrategyAdapter", "export_full_model"]
