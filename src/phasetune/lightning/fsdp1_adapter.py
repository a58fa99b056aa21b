"""FSDPStrategyAdapter: scheduled fine-tuning under Lightning's FSDPStrategy (FSDP1, FullyShardedDataParallel).

What the strategy needs beyond the default adapter:

- **Wrapping that follows the schedule.** ``awp_overrides`` (module names or regexes) are wrapped in their
  own units besides what the strategy's ``auto_wrap_policy`` wraps; ``min_num_params`` adds size-based
  wrapping (see :mod:`phasetune.sharding.fsdp1_alignment`). Both are ignored, with a warning, when the model is
  wrapped by hand in ``configure_model``.
- **Logical names.** FSDP renames parameters and, with ``use_orig_params=False``, replaces each unit's by
  one ``FlatParameter``. The schedule, logs, snapshots and checkpoints use the unwrapped names; the
  :class:`~phasetune.sharding.fsdp1_alignment.ParamIndex` built after wrapping translates both ways. The engine
  thaws and groups the tensors the index gives (a unit's FlatParameter once, however many names share it).
  Wrapping replaces every parameter, so the schedule is resolved at ``on_fit_start``.
- **Checks before training** (all problems in one error): with ``use_orig_params=False`` every unit's
  parameters belong to one phase; phase 0 holds a parameter FSDP wraps; ``awp_overrides`` entries match
  modules. With ``use_orig_params=True`` mixed units are fine; ranks holding no shard of phase 0's
  parameters are reported at DEBUG level.
- **Checkpoints.** Full checkpoints hold the optimizer state consolidated on rank 0 and keyed by logical
  names (Lightning re-keys it by parameter index, which fails with FlatParameters and depends on the
  group order phases change). The strategy loads optimizer state before restoring callbacks, so the
  saved phase is rebuilt first (``FinetuningScheduler.resume_early``). Restore-best snapshots hold each
  rank's shards; checkpoints (written by rank 0) keep every rank's part.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn

from phasetune.errors import ConfigurationError
from phasetune.lightning import _compat
from phasetune.lightning.adapters import register_adapter
from phasetune.lightning.sharded import ShardedStrategyAdapter
from phasetune.sharding import fsdp1_alignment as fsdp1
from phasetune.util import dist as _dist

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger("phasetune")


class FSDPStrategyAdapter(ShardedStrategyAdapter):
    """Adapter for ``FSDPStrategy``; ``strategy_adapter_cfg`` takes ``awp_overrides`` and ``min_num_params``.

    Args (through ``strategy_adapter_cfg``):
        awp_overrides: module names, or regexes matching whole module names, to wrap in their own FSDP units
            in addition to what the strategy's ``auto_wrap_policy`` wraps. Names matching no module are an
            error before training.
        min_num_params: also wrap every module holding at least this many parameters not already in a
            smaller unit (the size-based auto-wrap of FairScale and torch).
    """

    config_keys = ("awp_overrides", "min_num_params")

    def __init__(self, **cfg: Any) -> None:
        super().__init__(**cfg)
        problems = []
        overrides = cfg.get("awp_overrides") or []
        if isinstance(overrides, str) or not all(isinstance(o, str) and o for o in overrides):
            problems.append(
                f"strategy_adapter_cfg awp_overrides must be a list of module names or regexes, got {overrides!r}"
            )
            overrides = []
        min_num_params = cfg.get("min_num_params")
        if min_num_params is not None and (
            isinstance(min_num_params, bool) or not isinstance(min_num_params, int) or min_num_params < 1
        ):
            problems.append(f"strategy_adapter_cfg min_num_params must be a positive integer, got {min_num_params!r}")
            min_num_params = None
        if problems:
            raise ConfigurationError(problems)
        self.awp_overrides: list[str] = list(overrides)
        self.min_num_params: int | None = min_num_params
        self.user_policy: Any = None
        self.policy: fsdp1.AlignedWrapPolicy | None = None
        self.index: fsdp1.ParamIndex | None = None
        #: ranks that held no shard of phase 0's parameters at the last check (use_orig_params=True)
        self.empty_phase0_ranks: list[int] = []
        self._fts: Any = None

    # -- wiring -------------------------------------------------------------------------------------
    def connect(self, trainer: pl.Trainer) -> None:
        super().connect(trainer)
        self.index = None
        strategy = trainer.strategy
        pl_module = trainer.lightning_module
        if pl_module is not None and fsdp1.fsdp_units(pl_module):
            raise ConfigurationError(
                f"{type(pl_module).__name__} already contains FullyShardedDataParallel modules before the FSDP "
                "strategy set it up (wrapped outside configure_model, or left wrapped by an earlier fit). Wrap it "
                "in LightningModule.configure_model or let the strategy's auto_wrap_policy (plus awp_overrides) "
                "do it, and pass a fresh, unwrapped module to each fit."
            )
        user = _compat.fsdp_auto_wrap_policy(strategy)
        if isinstance(user, fsdp1.AlignedWrapPolicy):  # left by an earlier fit that never reached teardown
            user = user.user_policy
            _compat.set_fsdp_auto_wrap_policy(strategy, user)  # repaired for good: nothing to undo
        self.user_policy = user
        self.policy = None

        # The combined policy is given to the strategy right after the module's own configure_model: wrap()
        # calls made there by hand keep seeing only the user's policy.
        def configure_model(original: Any) -> None:
            original()
            if self.awp_overrides or self.min_num_params:
                self.policy = fsdp1.AlignedWrapPolicy(user, self.awp_overrides, self.min_num_params)
                self.keep_undo(_compat.set_fsdp_auto_wrap_policy(strategy, self.policy))

        self.hook_module(pl_module, "configure_model", configure_model)

        # Full checkpoints: the strategy's own optimizer_state re-keys by parameter index (fails with
        # FlatParameters); key it by logical name instead. load_checkpoint: rebuild the saved phase first.
        state_dict_type = _compat.fsdp_state_dict_type(strategy)

        def optimizer_state(original: Any, optimizer: torch.optim.Optimizer) -> Any:
            if state_dict_type != "full":
                return original(optimizer)
            return fsdp1.full_optimizer_state(strategy.model, optimizer)

        self.keep_undo(_compat.replace_optimizer_state(strategy, optimizer_state))
        self.route_checkpoint_loads(strategy)
        self.route_checkpoint_saves(strategy)  # sharded checkpoints appear complete or not at all

    def file_weights_only(self, weights_only: bool | None) -> bool | None:
        return _compat.fsdp_full_checkpoint_weights_only(weights_only)

    # -- names ----------------------------------------------------------------------------------------
    def _root(self) -> torch.nn.Module | None:
        """The strategy's model once it holds FSDP units (the root unit, or the LightningModule when the model
        was wrapped by hand in ``configure_model``), else None."""
        model = self.trainer.strategy.model if self.trainer is not None else None
        return model if model is not None and fsdp1.fsdp_units(model) else None

    def param_index(self) -> fsdp1.ParamIndex | None:
        """Both views of the wrapped model's parameters (None before wrapping)."""
        if self.index is None:
            root = self._root()
            self.index = fsdp1.ParamIndex.build(root) if root is not None else None
        return self.index

    def named_parameters(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        index = self.param_index()
        return dict(index.tensors) if index is not None else dict(pl_module.named_parameters())

    def param_shapes(self, pl_module: pl.LightningModule) -> dict[str, tuple[int, ...]]:
        index = self.param_index()
        if index is None:
            return super().param_shapes(pl_module)
        return {n: index.shapes[n] for n in index.tensors}

    def named_buffers(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {fsdp1.logical_name(n): b for n, b in pl_module.named_buffers()}

    def structure_module(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        index, root = self.param_index(), self._root()
        return fsdp1.logical_skeleton(root, index) if index is not None and root is not None else pl_module

    def fsdp_names(self, logical: list[str]) -> list[str]:
        """FSDP's names (what the optimizer holds) for logical parameter names."""
        index = self.param_index()
        return index.to_fsdp(logical) if index is not None else list(logical)

    def logical_names(self, fsdp_names: list[str]) -> list[str]:
        """Logical parameter names for FSDP's names (a FlatParameter stands for all of its unit's)."""
        index = self.param_index()
        return index.to_logical(fsdp_names) if index is not None else list(fsdp_names)

    # -- checks ---------------------------------------------------------------------------------------
    def check(self, fts: Any, trainer: pl.Trainer) -> list[str]:
        """Wrap/schedule alignment and configuration problems (returned); warnings and DEBUG notes (logged)."""
        self._fts = fts
        index = self.param_index()
        if index is None:
            return ["FSDPStrategyAdapter found no FullyShardedDataParallel root; is the strategy an FSDPStrategy?"]
        run = fts.run
        phase_of = {n: k for k, phase in enumerate(run.schedule.phases) for n in phase.params}
        problems = []
        if self.policy is not None and self.policy.plan is None:
            rank_zero_warn(
                "strategy_adapter_cfg awp_overrides/min_num_params are ignored: the model was wrapped by hand in "
                "configure_model, so FSDP applied no auto_wrap_policy. Wrap those modules yourself, or let the "
                "policy wrap the model."
            )
        elif self.policy is not None and self.policy.plan is not None and self.policy.plan.unmatched:
            modules = [fsdp1.logical_name(n) for n, _ in trainer.lightning_module.named_modules() if n]
            problems.append(
                f"strategy_adapter_cfg awp_overrides entries {self.policy.plan.unmatched} match no module of "
                f"{type(trainer.lightning_module).__name__} (entries are module names, or regexes matching whole "
                f"module names, e.g. {modules[:3]}); fix or remove them"
            )
        if len(index.units) <= 1 and self.policy is None and self.user_policy is None:
            rank_zero_warn(
                "FSDPStrategy has no auto_wrap_policy and the model was not wrapped in configure_model, so the whole "
                "model is one FSDP unit: it is gathered whole for every forward and backward (no memory saved by "
                "sharding) and, with use_orig_params=False, all its parameters are frozen or thawed together. Pass "
                "FSDPStrategy(auto_wrap_policy={YourBlock}) and/or strategy_adapter_cfg={'awp_overrides': [...]}."
            )
        problems += fsdp1.root_problems(index)
        problems += fsdp1.alignment_problems(index, phase_of)
        if run.no_decay and not index.use_orig_params:
            problems.append(
                f"{type(trainer.lightning_module).__name__}.no_decay needs use_orig_params=True under FSDP: with "
                "use_orig_params=False a unit's parameters share one FlatParameter and so one weight decay"
            )
        unmanaged = fsdp1.unmanaged_scheduled(index, phase_of)
        if unmanaged:
            rank_zero_warn(
                f"{len(unmanaged)} scheduled parameter(s) are in modules FSDP ignores (e.g. {unmanaged[0]!r}); FSDP "
                "does not synchronise their gradients, so they may train differently on each rank"
            )
        if index.use_orig_params:
            self._report_phase0_shards(index, run.schedule[0].params, trainer)
        return problems

    def _report_phase0_shards(self, index: fsdp1.ParamIndex, phase0: Any, trainer: pl.Trainer) -> None:
        counts = _dist.all_gather_object(fsdp1.local_numel(index, phase0))
        self.empty_phase0_ranks = [r for r, c in enumerate(counts) if c == 0]
        if self.empty_phase0_ranks and trainer.is_global_zero:
            log.debug(
                "phasetune: ranks %s hold no shard of phase 0's parameters (elements per rank: %s); their optimizer "
                "has nothing to update in phase 0. Wrapping phase 0's modules in their own unit (awp_overrides) "
                "spreads them over all ranks.",
                self.empty_phase0_ranks, counts,
            )


register_adapter(lambda s: isinstance(s, FSDPStrategy), FSDPStrategyAdapter)
