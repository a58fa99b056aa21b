"""What the plan builds and runs: a model (from a Hugging Face config or a factory), a batch and a loss.

The model is built inside the simulation's tensor mode (fake tensors: no memory, no weights), so a source is
a recipe, not a model:

- a Hugging Face **config directory** or ``config.json`` (or a ``PretrainedConfig``): the class named in
  ``architectures`` (else ``AutoModelForCausalLM``, else ``AutoModel``) built from the config; batches are
  random token ids with labels the way the class's head expects them;
- ``"package.module:factory"`` or a callable: ``factory()`` returns the ``nn.Module``; batches come from
  ``inputs`` (a callable ``(micro_batch, seq_len) -> kwargs dict or args tuple``, or ``"module:function"``),
  else from the model's own ``example_inputs(micro_batch, seq_len)``, else token ids when the model has a
  ``config.vocab_size``.

transformers is imported only when a config is given.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import importlib
import inspect
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from phasetune.errors import ConfigurationError

Inputs = Callable[[int, int], Any]
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass
class ModelSource:
    """A recipe for the model, its batches and its loss (see the module docstring)."""

    build: Callable[[], nn.Module]
    make_inputs: Inputs | None
    loss: Callable[[Any], torch.Tensor]
    description: str  # where the model comes from: a config path, 'module:factory', 'factory()'
    config: Any = None  # the Hugging Face config, when built from one

    def inputs_for(self, model: nn.Module, micro_batch: int, seq_len: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` of one forward at ``micro_batch`` x ``seq_len`` (built in the active tensor mode)."""
        inner = model.held if isinstance(model, _Holder) else model
        make = self.make_inputs or getattr(inner, "example_inputs", None)
        if make is None:
            vocab = getattr(getattr(inner, "config", None), "vocab_size", None)
            if not isinstance(vocab, int):
                raise ConfigurationError(
                    f"cannot make a batch for {self.description}: pass inputs=<callable(micro_batch, seq_len) -> kwargs "
                    "or args> (or 'module:function'), or give the model an example_inputs(micro_batch, seq_len) method"
                )
            make = _token_inputs(vocab, "")
        out = make(micro_batch, seq_len)
        if isinstance(out, dict):
            return (), out
        if isinstance(out, tuple):
            return out, {}
        return (out,), {}


def model_source(
    model: Any,
    *,
    inputs: Inputs | str | None = None,
    loss: Callable[[Any], torch.Tensor] | str | None = None,
    name_prefix: str = "",
    model_kwargs: Mapping[str, Any] | None = None,
) -> ModelSource:
    """A :class:`ModelSource` for ``model`` (a config path, ``PretrainedConfig``, ``"module:factory"`` or callable).

    ``name_prefix`` (e.g. ``"model"``) nests the model under that attribute path, so parameter names match a
    schedule written for a ``LightningModule`` that holds the model as ``self.model``. ``model_kwargs``: keyword
    arguments of the factory (``factory(**model_kwargs)``), or config fields that replace the config's
    (``{"num_hidden_layers": 2}``).
    """
    problems: list[str] = []
    if model_kwargs is not None and not (isinstance(model_kwargs, Mapping) and all(isinstance(k, str) for k in model_kwargs)):
        raise ConfigurationError(f"model_kwargs must be a dict of keyword arguments, got {model_kwargs!r}")
    kwargs = dict(model_kwargs or {})
    make = _callable(inputs, "inputs", problems) if isinstance(inputs, str) else inputs
    loss_fn = _callable(loss, "loss", problems) if isinstance(loss, str) else loss
    if name_prefix and not all(p.isidentifier() for p in name_prefix.split(".")):
        problems.append(f"name_prefix {name_prefix!r} must be dotted attribute names like 'model' or 'net.backbone'")
    source: ModelSource | None = None
    config = _as_config(model, problems)
    if config is not None:
        description = str(model) if isinstance(model, (str, os.PathLike)) else f"a {type(config).__name__}"
        if kwargs:
            config = _override(config, kwargs, description, problems)
            description += f" with {_call_args(kwargs)}"
        source = _hf_source(config, description) if not problems else None
    elif isinstance(model, str) and _FACTORY.match(model):
        factory = _callable(model, "model", problems)
        if factory is not None:
            source = ModelSource(_bind(factory, kwargs, problems), None, _default_loss, f"{model}({_call_args(kwargs)})" if kwargs else model)
    elif callable(model) and not isinstance(model, nn.Module):
        name = getattr(model, "__qualname__", repr(model))
        source = ModelSource(_bind(model, kwargs, problems), None, _default_loss, f"{name}({_call_args(kwargs)})")
    elif not problems:
        problems.append(
            f"model must be a Hugging Face config directory or config.json, a PretrainedConfig, 'module:factory' or a "
            f"zero-argument callable returning the model (built under fake tensors, so not a built module), got {model!r}"
        )
    if problems or source is None:
        raise ConfigurationError(problems)
    if make is not None:
        source.make_inputs = make
    if loss_fn is not None:
        source.loss = loss_fn
    if name_prefix:
        inner = source.build
        source.build = lambda: _nest(inner(), name_prefix)
        source.description += f" (as {name_prefix!r})"
    return source


def with_adapters(source: ModelSource, schedule: Any) -> ModelSource:
    """``source`` whose model gets the LoRA adapters ``schedule`` asks for (its ``peft`` section and the adapter
    parameters its phases name), injected after the model is built and before it is sharded, as a run does; the
    same ``source`` for a schedule without LoRA keys (or one that does not load: the plan reports its problems).

    peft makes the adapter tensors outside the plan's fake tensor mode (it moves them with ``Module.to``, which
    fake tensors refuse; they are small: rank x width each) and they join the mode afterwards.
    """
    from phasetune.core.schedule_validation import load_schedule_source
    from phasetune.lora.from_schedule import asks_for_lora, inject_adapters

    raw, _, problems = load_schedule_source(schedule)
    if problems or not asks_for_lora(raw):
        return source
    inner = source.build

    def build() -> nn.Module:
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

        model = inner()
        mode = next((p.fake_mode for p in model.parameters() if isinstance(p, FakeTensor)), None)
        with unset_fake_temporarily() if mode is not None else contextlib.nullcontext():
            inject_adapters(model, schedule)  # the source itself: its problems name the file
        if mode is not None:
            for module in model.modules():
                for name, p in list(module._parameters.items()):
                    if p is not None and not isinstance(p, FakeTensor):
                        module._parameters[name] = nn.Parameter(mode.from_tensor(p), requires_grad=p.requires_grad)
        return model

    return dataclasses.replace(source, build=build, description=f"{source.description} with the schedule's LoRA adapters")


# ---------------------------------------------------------------------------------------------- factories


def _call_args(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _bind(factory: Callable[..., nn.Module], kwargs: Mapping[str, Any], problems: list[str]) -> Callable[[], nn.Module]:
    """``factory`` with ``kwargs`` bound (a picklable partial; the factory itself when there are none); a call its
    signature refuses is a problem, named before anything is built."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: the call will tell
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as e:
            known = [n for n, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            problems.append(f"model_kwargs: {getattr(factory, '__qualname__', factory)}() cannot take them ({e}); its "
                            f"keyword arguments: {', '.join(known) or 'none'}")
    return functools.partial(factory, **kwargs) if kwargs else factory


def _override(config: Any, kwargs: Mapping[str, Any], description: str, problems: list[str]) -> Any:
    """A copy of ``config`` with the fields of ``kwargs`` replaced; a field the config lacks is a problem."""
    unknown = [k for k in kwargs if not hasattr(config, k)]
    for k in unknown:
        close = difflib.get_close_matches(k, list(config.to_dict()), n=2)
        problems.append(f"model_kwargs {k!r}: {description} has no such field" + (
            f"; did you mean {', '.join(map(repr, close))}?" if close else ""))
    if unknown:
        return config
    config = copy.deepcopy(config)
    for k, v in kwargs.items():
        setattr(config, k, v)
    return config


def _callable(path: str, what: str, problems: list[str]) -> Callable[..., Any] | None:
    if not _FACTORY.match(path):
        problems.append(f"{what} {path!r} is not of the form 'package.module:function'")
        return None
    mod_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        problems.append(f"{what} {path!r}: cannot import {mod_name!r} ({e}); is it on PYTHONPATH?")
        return None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if not callable(obj):
        problems.append(f"{what} {path!r}: {mod_name!r} has no callable {attr!r}")
        return None
    return obj


def _default_loss(output: Any) -> torch.Tensor:
    """``output.loss`` when the model computes one, else the sum of its first floating-point tensor."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    tensors = [t for t in _leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors:
        raise ConfigurationError("the model's output holds no floating-point tensor to take a loss of; pass loss=<callable>")
    return tensors[0].sum()


def _leaves(obj: Any) -> list[Any]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict) or (hasattr(obj, "values") and callable(obj.values)):
        return [x for v in obj.values() for x in _leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _leaves(v)]
    return []


class _Holder(nn.Module):
    """Holds the model under an attribute path; forward passes straight through."""

    def __init__(self, path: str, model: nn.Module) -> None:
        super().__init__()
        self.path = path
        parent: nn.Module = self
        parts = path.split(".")
        for p in parts[:-1]:
            child = nn.Module()
            parent.add_module(p, child)
            parent = child
        parent.add_module(parts[-1], model)

    @property
    def held(self) -> nn.Module:
        return self.get_submodule(self.path)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.held(*args, **kwargs)


def _nest(model: nn.Module, path: str) -> nn.Module:
    return _Holder(path, model)


# ---------------------------------------------------------------------------------------------- Hugging Face


def _as_config(model: Any, problems: list[str]) -> Any:
    """The ``PretrainedConfig`` ``model`` names, or None when it names no config."""
    if type(model).__name__.endswith("Config") and hasattr(model, "to_dict"):
        return model
    if not isinstance(model, (str, os.PathLike)) or (isinstance(model, str) and _FACTORY.match(model)):
        return None
    path = Path(model)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        problems.append(f"model {str(model)!r}: no such config file or directory (expected a folder with config.json, "
                        "a config.json, or 'module:factory')")
        return None
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        problems.append(f"model config {str(file)!r} is not readable JSON: {e}")
        return None
    if not isinstance(raw, dict) or "model_type" not in raw:
        problems.append(f"model config {str(file)!r} has no 'model_type' key; Hugging Face needs it to pick the model class")
        return None
    try:
        from transformers import AutoConfig
    except ImportError:
        problems.append("a Hugging Face config needs the transformers package: pip install transformers")
        return None
    kind = raw.pop("model_type")
    try:
        return AutoConfig.for_model(kind, **raw)
    except (ValueError, KeyError, TypeError) as e:
        problems.append(f"model config {str(file)!r}: transformers cannot build a {kind!r} config: {e}")
        return None


def _hf_class(config: Any) -> Any:
    import transformers

    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)]
    raise ConfigurationError(f"transformers has no model class for {type(config).__name__}; name one in the config's "
                             "'architectures' list or pass a 'module:factory'")


def _hf_source(config: Any, description: str) -> ModelSource:
    cls = _hf_class(config)

    def build() -> nn.Module:
        model = cls(config)
        model.train()
        return model

    vocab = getattr(config, "vocab_size", None)
    make = _token_inputs(vocab, cls.__name__) if isinstance(vocab, int) else None
    return ModelSource(build, make, _default_loss, description, config)


def _token_inputs(vocab: int, cls_name: str) -> Inputs:
    """Random token ids, with labels shaped the way the head named in ``cls_name`` takes them."""

    def make(micro_batch: int, seq_len: int) -> dict[str, Any]:
        ids = torch.randint(0, vocab, (micro_batch, seq_len))
        if cls_name.endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM")):
            return {"input_ids": ids, "labels": ids}
        if cls_name.endswith("ForTokenClassification"):
            return {"input_ids": ids, "labels": torch.zeros_like(ids)}
        if cls_name.endswith("ForSequenceClassification"):
            return {"input_ids": ids, "labels": torch.zeros(micro_batch, dtype=torch.long)}
        return {"input_ids": ids}

    return make


__all__ = ["ModelSource", "model_source"]
