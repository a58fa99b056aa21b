"""Full (unsharded) weights out of a sharded model: gather on rank 0, write safetensors.

A sharded model's ``state_dict`` holds each rank's shards (DTensors). For inference or the Hugging Face hub
you want the plain full tensors: :func:`full_state_dict` gathers them (a collective: every rank calls it;
by default only rank 0 receives them, on CPU), :func:`save_full_model` writes them -- with
``save_pretrained`` (safetensors) for Hugging Face models, else ``model.safetensors``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from phasetune.sharding.names import logical_name
from phasetune.util.dist import initialized, rank
from phasetune.util.files import PARTIAL_PREFIX, remove_leftovers, remove_path, replace_path


def _prefix_of(module: nn.Module, submodule: nn.Module | None) -> str:
    if submodule is None or submodule is module:
        return ""
    for name, m in module.named_modules():
        if m is submodule:
            return logical_name(name) + "."
    raise ValueError(f"{type(submodule).__name__} is not a submodule of {type(module).__name__}")


def full_state_dict(
    module: nn.Module, *, submodule: nn.Module | None = None, rank0_only: bool = True
) -> dict[str, torch.Tensor]:
    """The full state dict of ``module`` (or of its ``submodule``, with names relative to it) on CPU.

    Names are logical (no wrapper segments). With ``rank0_only`` the other ranks get ``{}`` and no rank
    ever holds the full model on its accelerator. Every rank must call this when the model is sharded.
    """
    prefix = _prefix_of(module, submodule)
    sharded = any(getattr(p, "device_mesh", None) is not None for p in module.parameters())
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True) if rank0_only else StateDictOptions(full_state_dict=True)
        sd = get_model_state_dict(module, options=opts)
        sd = {logical_name(k): v.cpu() for k, v in sd.items()}
    else:
        sd = {logical_name(k): v.detach().cpu() for k, v in module.state_dict().items()}
        if rank0_only and rank() != 0:
            sd = {}
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def save_full_model(
    module: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    submodule: nn.Module | None = None,
) -> Path | None:
    """Gather the full weights and write them on rank 0; returns the directory written (None on other ranks).

    ``submodule`` (e.g. the Hugging Face model inside a LightningModule) is what gets saved; with a
    ``save_pretrained`` method it writes ``config.json`` + ``model.safetensors`` loadable by
    ``from_pretrained``, otherwise ``model.safetensors`` with the state dict. Every rank must call this.

    The files are written to a hidden ``.partial-<name>`` directory next to ``out_dir`` and renamed into it once
    all are complete: a process killed while exporting leaves the previous export's files as they were (and
    the hidden directory, which the next export removes). Other files in ``out_dir`` are kept.
    """
    target = submodule if submodule is not None else module
    sd = full_state_dict(module, submodule=submodule, rank0_only=True)
    out = Path(out_dir)
    written = None
    if rank() == 0:
        tmp = out.with_name(f"{PARTIAL_PREFIX}{out.name}")
        remove_path(tmp)  # left by an export that died
        tmp.mkdir(parents=True)
        if hasattr(target, "save_pretrained"):
            target.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"))
        _move_into(tmp, out)
        written = out
    if initialized():
        torch.distributed.barrier()
    return written


def _move_into(new: Path, out: Path) -> None:
    """Move every file and subdirectory of the complete directory ``new`` into ``out``, each in one rename
    (:func:`phasetune.util.files.replace_path`: each appears whole, replacing the one of its name; other files in ``out``
    stay), then remove ``new``."""
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(new.iterdir()):
        is_dir = f.is_dir()
        for written in sorted(g for g in f.rglob("*") if g.is_file()) if is_dir else [f]:
            with open(written, "rb") as fh:  # the data on disk before the rename makes it visible
                os.fsync(fh.fileno())
        replace_path(f, out / f.name)
        if is_dir:  # what an export killed while replacing this subdirectory left (replace_path's fallback)
            remove_leftovers(out, f.name)
    new.rmdir()


__all__ = ["full_state_dict", "save_full_model"]
