"""FSDP2Strategy: fully sharded data-parallel training for plain PyTorch loops (torchrun + ``fully_shard``).

One object holds what a loop needs around the model: the process group and device, sharding (by transformer
block classes or an ``fsdp_plan``, shared with the Lightning adapter through :mod:`phasetune.sharding`),
homogeneous optimizer groups, gradient accumulation, one global gradient norm for clipping, sharded DCP
checkpoints with rotation, full-weights export and optimizer-state offload. It drives nothing by itself:
the loop stays yours (see ``docs/plain_pytorch.md``).

The class holds the training step; its units without a plan come from :mod:`phasetune.sharding.units`,
what its checkpoints hold from :mod:`phasetune.loop.strategy.checkpoint_io`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.optim import Optimizer

from phasetune.errors import ConfigurationError
from phasetune.loop.strategy import checkpoint_io, optim_offload
from phasetune.loop.strategy.distributed import DistEnv, init_distributed
from phasetune.loop.strategy.materialize import (
    has_meta_params,
    materialize,
    materialize_problems,
    params_on_meta,
)
from phasetune.run.lora_glue import sharding_problems
from phasetune.run.memory_check import note_shape
from phasetune.sharding import clip_grad_norm_, grad_norm, save_full_model, split_groups
from phasetune.sharding.names import root_name
from phasetune.sharding.plan import apply_plan, match_plan, parse_plan, strategy_defaults
from phasetune.sharding.units import block_plan, unit_dtype_problems
from phasetune.util.dist import barrier
from phasetune.util.files import PARTIAL_PREFIX, remove_leftovers, remove_path, replace_path
from phasetune.util.text import few

log = logging.getLogger("phasetune")


class FSDP2Strategy:
    """Sharded training with FSDP2 in your own loop, on one process or many (``torchrun``).

    Args:
        seed: seeds Python and torch now and again when a model is built in :meth:`init_model_context`,
            so every rank starts from the same weights.
        max_norm: clip gradients to this global norm (one norm over all parameters and meshes); 0: no clipping.
        micro_batch_size: samples per rank per forward/backward.
        global_batch_size: samples per optimizer step over all ranks; must be a multiple of
            ``micro_batch_size * world_size``. The ratio is the number of accumulation micro-steps.
        bf16: compute in bfloat16 (parameters gathered as bf16, gradients reduced in fp32, fp32 master weights).
        optimizer_offload: :meth:`maybe_offload_optimizer` / :meth:`maybe_load_optimizer` move optimizer
            state to CPU and back (they do nothing when False).
        reshard_after_forward: free gathered parameters after forward (less memory, one more all-gather in
            backward); ``None``: FSDP2's default (True for every unit but the root, whose parameters backward
            needs first).
        backend, device: override the process-group backend (``nccl``/``gloo``) and this rank's device.
    """

    def __init__(
        self,
        seed: int = 42,
        max_norm: float = 0.0,
        micro_batch_size: int = 1,
        global_batch_size: int = 1,
        bf16: bool = False,
        *,
        optimizer_offload: bool = False,
        reshard_after_forward: bool | None = None,
        backend: str | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        problems = []
        if not (isinstance(max_norm, (int, float)) and max_norm >= 0 and math.isfinite(max_norm)):
            problems.append(f"max_norm must be a finite number >= 0 (0 disables clipping), got {max_norm!r}")
        for name, v in (("micro_batch_size", micro_batch_size), ("global_batch_size", global_batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be an integer >= 1, got {v!r}")
        if problems:
            raise ConfigurationError(problems)
        self.env: DistEnv = init_distributed(backend, device)
        per_step = micro_batch_size * self.env.world_size
        if global_batch_size % per_step:
            self.teardown()
            lower = max(per_step, global_batch_size // per_step * per_step)
            raise ConfigurationError(
                f"global_batch_size={global_batch_size} is not a multiple of micro_batch_size * world_size = "
                f"{micro_batch_size} * {self.env.world_size} = {per_step}; use {lower} or {lower + per_step}, or "
                "change micro_batch_size"
            )
        self.seed = seed
        self.max_norm = float(max_norm)
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.accumulation_steps = global_batch_size // per_step
        self.bf16 = bf16
        self.optimizer_offload = optimizer_offload
        self.reshard_after_forward = reshard_after_forward
        self.micro_step = 0
        self.global_step = 0
        self.skipped_steps = 0
        self.last_grad_norm: float | None = None
        self._offloaded: dict[int, dict[int, dict[str, torch.device]]] = {}
        self._units: dict[int, list[FSDPModule]] = {}
        _seed_everything(seed)

    # ------------------------------------------------------------------ where we run
    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def all_reduce(self, value: float | torch.Tensor, op: str = "mean") -> float:
        """``value`` reduced over all ranks (``"mean"``, ``"sum"``, ``"max"`` or ``"min"``), as a float."""
        ops = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if op not in ops:
            raise ValueError(f"op must be one of {', '.join(ops)}, got {op!r}")
        t = torch.as_tensor(value, dtype=torch.float64).detach().clone().to(self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=ops[op])
        if op == "mean":
            t /= self.world_size
        return float(t)

    def teardown(self) -> None:
        """Destroy the process group if this strategy created it."""
        if self.env.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ model
    @contextlib.contextmanager
    def init_model_context(self, meta_init: bool = False) -> Iterator[None]:
        """Build the model inside: seeded identically on every rank, on the meta device with ``meta_init``.

        With ``meta_init`` parameters take no memory until :meth:`prepare_model` materializes each rank's
        shards from a state dict; buffers are created for real (non-persistent ones are in no checkpoint).
        """
        _seed_everything(self.seed)
        if meta_init:
            with params_on_meta():
                yield
        elif self.device.type != "cpu":
            with torch.device(self.device):
                yield
        else:
            yield

    def prepare_model(
        self,
        model: nn.Module,
        *,
        block_classes: Sequence[str | type[nn.Module]] | None = None,
        fsdp_plan: Mapping[str, Any] | None = None,
        fsdp_default_kwargs: Mapping[str, Any] | None = None,
        state_dict: Mapping[str, Any] | None = None,
        broadcast_from_rank0: bool = False,
        schedule: str | os.PathLike[str] | Mapping[Any, Any] | None = None,
    ) -> nn.Module:
        """Shard ``model`` with ``fully_shard``, embeddings and output head as their own units, the root last.

        Units come from ``fsdp_plan`` (module name or regex -> ``fully_shard`` kwargs, with the ``act_ckpt``
        and ``cpu_offload_policy`` aliases; the same format as the Lightning adapter's) or, without a plan,
        from transformer block classes: ``block_classes`` (names or types) or the model's
        ``_no_split_modules``. A meta-initialized model is then materialized from the full ``state_dict``
        (only rank 0's is read with ``broadcast_from_rank0``); a real one loads it if given. ``schedule``: the
        LoRA adapters its ``peft`` section asks for are injected first, and each unit is checked to train one dtype.
        """
        defaults = strategy_defaults(fsdp_default_kwargs, param_dtype=torch.bfloat16 if self.bf16 else None,
                                     reshard_after_forward=self.reshard_after_forward)
        if fsdp_plan is not None and block_classes is not None:
            raise ConfigurationError("give prepare_model either fsdp_plan or block_classes, not both")
        if fsdp_plan is None:
            fsdp_plan = block_plan(model, block_classes)
        entries = parse_plan(fsdp_plan, defaults)
        units = [n for _, names in match_plan(model, entries) for n in names] + [root_name(model)]
        lora = sharding_problems(model, schedule, units)  # LoRA adapters injected before fully_shard
        problems = (unit_dtype_problems(model, units) if lora is None else lora) + materialize_problems(
            model, state_dict, broadcast_from_rank0)
        if problems:
            raise ConfigurationError(problems)
        meta = has_meta_params(model)
        if not meta and self.device.type != "cpu":
            model.to(self.device)
        report = apply_plan(model, entries, mesh=None, default_kwargs=defaults)
        note_shape(model, strategy="fsdp2", world_size=self.world_size, fsdp_plan=fsdp_plan, fsdp_default_kwargs=defaults,
                   mixed_precision="bf16" if self.bf16 else None, micro_batch=self.micro_batch_size,
                   accumulation=self.accumulation_steps)  # for the memory check of the loop that trains it
        for note in report.notes:
            log.info("phasetune: %s", note)
        if self.is_main:
            log.info("phasetune: sharded %d unit(s) over %d rank(s): %s", len(report.sharded), self.world_size,
                     few([n or "<root>" for n in report.sharded], 4, quote=False))
        if meta:
            materialize(model, self.device, state_dict, broadcast_from_rank0)
        elif state_dict is not None or broadcast_from_rank0:
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast_from_rank0)
            set_model_state_dict(model, dict(state_dict or {}), options=options)
        return model

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(
        self,
        model: nn.Module,
        optimizer_cls: type[Optimizer] = torch.optim.AdamW,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> Optimizer:
        """An optimizer over the trainable parameters, grouped so each group has one dtype and one mesh.

        Biases and norm weights (parameters with fewer than 2 dimensions) get ``weight_decay=0``.
        """
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigurationError(f"{type(model).__name__} has no trainable parameters to optimize")
        decay = [p for n, p in named if decays(n, p)]
        no_decay = [p for n, p in named if not decays(n, p)]
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        groups, _ = split_groups(groups)
        return optimizer_cls(groups, lr=lr, weight_decay=weight_decay, **kwargs)

    # ------------------------------------------------------------------ stepping
    @property
    def is_accumulating(self) -> bool:
        """True between the first and the last micro-step of an accumulation cycle."""
        return self.micro_step % self.accumulation_steps != 0

    def backward(self, loss: torch.Tensor, model: nn.Module, optimizer: Optimizer | None = None) -> None:
        """Backward of ``loss / accumulation_steps``; gradients are synchronised only on the cycle's last micro-step."""
        last = (self.micro_step + 1) % self.accumulation_steps == 0
        for unit in self._outer_units(model):
            unit.set_requires_gradient_sync(last)
        (loss / self.accumulation_steps).backward()

    def _outer_units(self, model: nn.Module) -> list[FSDPModule]:
        """The outermost FSDP modules of ``model`` (``model`` itself when it is one), looked up once."""
        if isinstance(model, FSDPModule):
            return [model]
        units = self._units.get(id(model))
        if units is None:
            units, inner = [], set()
            for m in model.modules():
                if isinstance(m, FSDPModule) and id(m) not in inner:
                    units.append(m)
                    inner.update(id(x) for x in m.modules())
            self._units[id(model)] = units
        return units

    def optimizer_step(self, optimizer: Optimizer, model: nn.Module, scheduler: Any = None) -> bool:
        """Count a micro-step; at the end of an accumulation cycle clip, step, zero the gradients and step
        ``scheduler``. Returns True when the optimizer stepped.

        The gradient norm (:attr:`last_grad_norm`) is one norm over every parameter of every mesh. When it is
        not finite the step is skipped (gradients dropped, ``scheduler`` not stepped) with a warning.
        """
        self.micro_step += 1
        if self.is_accumulating:
            return False
        params = [p for g in optimizer.param_groups for p in g["params"]]
        total = clip_grad_norm_(params, self.max_norm) if self.max_norm > 0 else grad_norm(params)
        self.last_grad_norm = float(total)
        if not math.isfinite(self.last_grad_norm):
            self.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            log.warning("phasetune: optimizer step %d skipped: the gradient norm is %s (gradients dropped; %d "
                        "step(s) skipped so far)", self.global_step, self.last_grad_norm, self.skipped_steps)
            return False
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        self.global_step += 1
        return True

    # ------------------------------------------------------------------ optimizer offload
    def maybe_offload_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """With ``optimizer_offload``, move the optimizer state to CPU (e.g. around generation in RL loops)."""
        if self.optimizer_offload and id(optimizer) not in self._offloaded:
            self._offloaded[id(optimizer)] = optim_offload.offload_state(optimizer)
        return optimizer

    def maybe_load_optimizer(self, optimizer: Optimizer, device: str | torch.device | None = None) -> Optimizer:
        """Bring state moved by :meth:`maybe_offload_optimizer` back where it was (accelerator state to ``device``
        if given)."""
        if self.optimizer_offload and id(optimizer) in self._offloaded:
            devices = self._offloaded.pop(id(optimizer))
            optim_offload.load_state(optimizer, devices, self.device, override=device)
        return optimizer

    # ------------------------------------------------------------------ checkpoints
    def save_ckpt(
        self,
        model: nn.Module,
        save_dir: str | os.PathLike[str],
        tag: str | None = None,
        *,
        optimizer: Optimizer | None = None,
        scheduler: Any = None,
        finetuning: Any = None,
        client_state: Mapping[str, Any] | None = None,
        max_num: int = 3,
        max_mem: float = 1000,
    ) -> Path:
        """Save a sharded checkpoint ``save_dir/tag`` atomically; keep at most ``max_num`` using ``max_mem`` GiB.

        Saves the model, the optimizer and lr scheduler (``finetuning``'s current ones unless given), the
        :class:`~phasetune.loop.ScheduledFinetuning` state, RNG states, step counters and ``client_state``
        (plain containers of numbers, strings and tensors). Every rank must call it. Optimizer state of
        parameters a transition just added is not: they have none yet (see :mod:`phasetune.sharding.optim_state`).
        """
        if max_num < 1 or not max_mem > 0:
            raise ConfigurationError(f"save_ckpt needs max_num >= 1 and max_mem > 0 (GiB), got max_num={max_num}, "
                                     f"max_mem={max_mem}")
        if self.is_accumulating:
            raise RuntimeError(
                f"save_ckpt called at micro-step {self.micro_step % self.accumulation_steps} of an accumulation cycle "
                f"of {self.accumulation_steps}; accumulated gradients are not saved, so save after optimizer_step "
                "returned True"
            )
        optimizer, schedulers = checkpoint_io.resolve_optim(optimizer, scheduler, finetuning)
        if optimizer is not None and id(optimizer) in self._offloaded:
            raise RuntimeError("save_ckpt: the optimizer state is offloaded; call maybe_load_optimizer first")
        counters = {"global_step": self.global_step, "micro_step": self.micro_step, "skipped_steps": self.skipped_steps}
        return checkpoint_io.save(model, save_dir, tag or f"step_{self.global_step}", env=self.env, optimizer=optimizer,
                                  schedulers=schedulers, finetuning=finetuning, client_state=client_state,
                                  counters=counters, max_num=max_num, max_mem=max_mem)

    def load_ckpt(
        self,
        model: nn.Module,
        load_dir: str | os.PathLike[str],
        *,
        optimizer: Optimizer | None = None,
        scheduler: Any = None,
        finetuning: Any = None,
        tag: str | None = None,
        load_module_strict: bool = True,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
    ) -> tuple[Path | None, dict[str, Any]]:
        """Load the latest complete checkpoint under ``load_dir`` (or ``load_dir/tag``, or ``load_dir`` itself).

        ``finetuning`` first replays its saved phase (thawing, groups, optimizer, scheduler), so the optimizer
        state of every phase's parameters has somewhere to go; pass a freshly built one. Returns the
        checkpoint directory and the ``client_state`` saved with it, or ``(None, {})`` when there is none.
        """
        path, client_state, counters = checkpoint_io.load(
            model, load_dir, env=self.env, optimizer=optimizer, scheduler=scheduler, finetuning=finetuning, tag=tag,
            load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=load_lr_scheduler_states)
        if path is not None:
            self.global_step = counters["global_step"]
            # saved between cycles; with other batch sizes or world size the next cycle still starts fresh
            self.micro_step = counters["micro_step"] - counters["micro_step"] % self.accumulation_steps
            self.skipped_steps = counters["skipped_steps"]
        return path, client_state

    # ------------------------------------------------------------------ export
    def save_model(self, model: nn.Module, output_dir: str | os.PathLike[str], tokenizer: Any = None) -> Path:
        """Write the full weights on rank 0: ``save_pretrained`` (safetensors) for Hugging Face models, else
        ``model.safetensors``; plus ``tokenizer`` if given. ``output_dir`` appears complete or not at all."""
        out = Path(output_dir)
        tmp = out.with_name(f"{PARTIAL_PREFIX}{out.name}")
        if self.is_main:
            remove_path(tmp)  # left by an export that died
        barrier()
        save_full_model(model, tmp)
        if self.is_main:
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            replace_path(tmp, out)
            remove_leftovers(out.parent, out.name)
        barrier()
        return out


# ---------------------------------------------------------------------------------------------- helpers


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether a parameter gets weight decay: not biases, not norm weights (parameters with fewer than 2 dims)."""
    return p.dim() >= 2 and not name.endswith("bias")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
