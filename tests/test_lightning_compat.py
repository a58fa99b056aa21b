"""phasetune.lightning._compat: patches of Lightning objects are undone, missing internals are named.

The real fits that check no patch outlives them are in tests/test_fsdp.py and tests/test_fsdp2.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import lightning
import pytest
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins import Precision
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from phasetune.lightning import _compat
from phasetune.lightning.fsdp2_adapter import ModelParallelStrategyAdapter


class Loader:
    def load_checkpoint(self, path: str) -> str:
        return f"class:{path}"


def test_a_patch_wraps_the_method_and_its_undo_leaves_the_class_method_alone():
    obj = Loader()
    undo = _compat.patch_method(obj, "load_checkpoint", lambda original, path: "patched+" + original(path))
    assert obj.load_checkpoint("a") == "patched+class:a"
    undo()
    assert "load_checkpoint" not in vars(obj) and obj.load_checkpoint("a") == "class:a"
    undo()  # twice is harmless


def test_patches_never_stack_even_when_an_earlier_one_was_not_undone():
    obj = Loader()
    _compat.patch_method(obj, "load_checkpoint", lambda original, path: "first+" + original(path))
    undo = _compat.patch_method(obj, "load_checkpoint", lambda original, path: "second+" + original(path))
    assert obj.load_checkpoint("a") == "second+class:a"
    undo()
    assert "load_checkpoint" not in vars(obj)


def test_undo_gives_back_the_users_own_instance_attribute():
    obj = Loader()

    def users(path: str) -> str:
        return f"user:{path}"

    obj.load_checkpoint = users  # type: ignore[method-assign]
    undo = _compat.patch_method(obj, "load_checkpoint", lambda original, path: "patched+" + original(path))
    assert obj.load_checkpoint("a") == "patched+user:a"
    undo()
    assert vars(obj)["load_checkpoint"] is users


def test_the_fsdp_wrap_policy_undo_restores_the_users_policy():
    strategy = FSDPStrategy(auto_wrap_policy=None)
    user = object()
    strategy.kwargs["auto_wrap_policy"] = user
    undo = _compat.set_fsdp_auto_wrap_policy(strategy, "combined")
    assert _compat.fsdp_auto_wrap_policy(strategy) == "combined"
    undo()
    assert _compat.fsdp_auto_wrap_policy(strategy) is user


def test_the_fsdp2_adapter_release_leaves_strategy_plugin_and_module_as_given():
    strategy, precision, module = ModelParallelStrategy(), Precision(), LightningModule()
    trainer = SimpleNamespace(strategy=strategy, precision_plugin=precision, lightning_module=module)
    adapter = ModelParallelStrategyAdapter()
    adapter.connect(trainer)  # type: ignore[arg-type]
    assert {"load_checkpoint"} <= set(vars(strategy)) and "clip_grad_by_norm" in vars(precision)
    assert "configure_model" in vars(module)
    adapter.release()
    assert "load_checkpoint" not in vars(strategy) and "clip_grad_by_norm" not in vars(precision)
    assert "configure_model" not in vars(module)
    adapter.connect(trainer)  # the next fit patches again
    assert "load_checkpoint" in vars(strategy)
    adapter.release()


def test_a_missing_fsdp_state_dict_type_names_the_lightning_version_instead_of_guessing():
    strategy = FSDPStrategy()
    del strategy._state_dict_type
    with pytest.raises(_compat.LightningInternalsError) as e:
        _compat.fsdp_state_dict_type(strategy)
    assert f"Lightning {lightning.__version__}" in str(e.value) and "_state_dict_type" in str(e.value)


def test_a_missing_checkpoint_metadata_name_names_the_lightning_version(monkeypatch):
    from lightning.fabric.utilities import load

    assert _compat.sharded_checkpoint_metadata_name() == "meta.pt"
    monkeypatch.delattr(load, "_METADATA_FILENAME")
    with pytest.raises(_compat.LightningInternalsError, match=r"_METADATA_FILENAME.*does not have"):
        _compat.sharded_checkpoint_metadata_name()
