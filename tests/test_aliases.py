"""Old module paths keep working: every row of ``phasetune._aliases.ALIASES`` imports the very module object of its
new path with a DeprecationWarning that names it, ``phasetune.lr_shapes`` (a class path in schedule files) imports
silently from where it always was, and every name in ``phasetune.__all__`` is there."""

from __future__ import annotations

import importlib
import pickle
import pkgutil
import re
import sys
import warnings
from pathlib import Path

import pytest
import yaml

import phasetune
from phasetune._aliases import ALIASES, new_path
from phasetune.core import specs

ROOT = Path(__file__).resolve().parents[1]


def import_fresh(name: str):
    """Import ``name`` as if for the first time in this process (it is dropped from sys.modules first)."""
    sys.modules.pop(name, None)
    return importlib.import_module(name)


@pytest.mark.parametrize("old", sorted(ALIASES))
def test_an_old_path_is_the_new_module_and_warns_with_the_new_path(old):
    new = importlib.import_module(ALIASES[old])
    with pytest.warns(DeprecationWarning, match=re.escape(f"{old} moved to {ALIASES[old]}")):
        module = import_fresh(old)
    assert module is new
    assert sys.modules[old] is new  # later imports of the old path find the same object without a warning


@pytest.mark.parametrize("old", sorted(o for o in ALIASES if hasattr(importlib.import_module(ALIASES[o]), "__path__")))
def test_a_module_under_an_old_package_path_is_the_one_under_the_new_path(old):
    package = importlib.import_module(ALIASES[old])
    subs = [m.name for m in pkgutil.iter_modules(package.__path__)]
    assert subs, f"{ALIASES[old]} is a package with no modules"
    for sub in subs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            assert import_fresh(f"{old}.{sub}") is importlib.import_module(f"{ALIASES[old]}.{sub}")


def test_from_import_of_an_old_path_gives_the_new_modules_names():
    from phasetune.util.files import load_yaml

    with pytest.warns(DeprecationWarning, match=r"phasetune\.io moved to phasetune\.util\.files"):
        sys.modules.pop("phasetune.io", None)
        from phasetune.io import load_yaml as old_load_yaml
    assert old_load_yaml is load_yaml


def test_an_old_module_path_as_an_attribute_of_the_package_is_the_new_module():
    from phasetune.core import engine

    sys.modules.pop("phasetune.engine", None)
    vars(phasetune).pop("engine", None)
    with pytest.warns(DeprecationWarning, match=r"phasetune\.engine moved to phasetune\.core\.engine"):
        assert phasetune.engine is engine


def test_a_path_that_never_existed_is_still_an_error():
    assert new_path("phasetune.not_a_module") is None
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("phasetune.not_a_module")


def test_lr_shapes_never_moved_and_imports_without_a_warning():
    assert not any(o == "phasetune.lr_shapes" or o.startswith("phasetune.lr_shapes.") for o in ALIASES)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        module = import_fresh("phasetune.lr_shapes")
    assert Path(module.__file__).name == "lr_shapes.py" and Path(module.__file__).parent.name == "phasetune"


def schedule_class_paths() -> list[str]:
    """Every ``class_path`` naming a phasetune class in the YAML files of examples/ and tests/."""
    found = set()
    for path in [*ROOT.glob("examples/**/*.yaml"), *ROOT.glob("tests/**/*.yaml")]:
        found.update(re.findall(r"class_path:\s*(phasetune\.[\w.]+)", path.read_text()))
    return sorted(found)


@pytest.mark.parametrize("class_path", schedule_class_paths())
def test_class_paths_in_the_example_and_test_files_resolve_without_a_warning(class_path):
    module, _, name = class_path.rpartition(".")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert isinstance(getattr(importlib.import_module(module), name), type)


def test_a_schedule_lr_shape_class_path_resolves_as_schedule_files_write_it():
    from phasetune.lr_shapes import WarmupLinearDecay

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        spec = specs.parse_class_spec({"class_path": "phasetune.lr_shapes.WarmupLinearDecay",
                                       "init_args": {"warmup_steps": 1, "total_steps": 4}}, specs.LR_SCHEDULER_BASES)
        assert specs.import_class(spec.class_path, specs.LR_SCHEDULER_BASES) is WarmupLinearDecay


def test_an_object_pickled_under_an_old_module_path_loads_as_the_new_class():
    from phasetune.features.audit.result import Finding

    finding = Finding("refrozen", ["layer.weight"])
    text = pickle.dumps(finding, protocol=0)  # protocol 0 names the class as text: "c<module>\n<name>\n"
    old = text.replace(b"cphasetune.features.audit.result\n", b"cphasetune.audit_result\n")
    assert old != text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = pickle.loads(old)
    assert type(loaded) is Finding and loaded == finding


def test_old_paths_in_yaml_class_paths_resolve_too():
    sys.modules.pop("phasetune.snapshots", None)
    cfg = yaml.safe_load("class_path: phasetune.snapshots.Snapshot")
    module, _, name = cfg["class_path"].rpartition(".")
    with pytest.warns(DeprecationWarning, match=r"phasetune\.features\.snapshots"):
        cls = getattr(importlib.import_module(module), name)
    from phasetune.features.snapshots import Snapshot

    assert cls is Snapshot


@pytest.mark.parametrize("name", sorted(phasetune.__all__))
def test_every_public_name_imports_from_the_package(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(?!phasetune)")  # third parties'
        assert getattr(phasetune, name) is not None


def test_the_sources_prose_names_modules_by_their_new_paths():
    # docstrings and messages point readers at modules: an old path there sends them through the alias table
    old = re.compile(r"(?<![\w.])(" + "|".join(re.escape(o) for o in sorted(ALIASES, key=len, reverse=True)) + r")\b")
    found = []
    for path in sorted((ROOT / "src" / "phasetune").rglob("*.py")):
        if path.name == "_aliases.py" or path == ROOT / "src" / "phasetune" / "__init__.py":  # they name them on purpose
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            found += [f"{path.relative_to(ROOT)}:{lineno}: {m.group(1)} -> {new_path(m.group(1))}" for m in old.finditer(line)]
    assert found == []
