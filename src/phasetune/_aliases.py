"""Old module paths of phasetune, kept importable after the package was split into layers.

``ALIASES`` maps each module path that moved to where it lives now. Importing an old path (``import
phasetune.engine``, ``from phasetune.io import load_yaml``, a ``mock.patch("phasetune.rng.capture")`` string,
a pickle that names an old class path) gives the very module object of the new path and a
``DeprecationWarning`` naming it; nothing is loaded twice. A row for a package also covers every module
under it (``phasetune.strategy.unit_plan`` follows the ``phasetune.strategy`` row).

``phasetune.lr_shapes`` is not here: schedule files name ``phasetune.lr_shapes.WarmupLinearDecay`` as a
class path, so that module never moved.

To move another module, add one row ``"phasetune.old": "phasetune.new"``; :func:`install` (run when
``phasetune/__init__.py`` imports this module, before anything else) does the rest.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

ALIASES: dict[str, str] = {
    # util: small helpers with no phasetune imports
    "phasetune._dist": "phasetune.util.dist",
    "phasetune.io": "phasetune.util.files",
    "phasetune.report": "phasetune.util.text",
    # core: the torch-only schedule logic
    "phasetune.schedule": "phasetune.core.schedule",
    "phasetune.schedule_validation": "phasetune.core.schedule_validation",
    "phasetune.specs": "phasetune.core.specs",
    "phasetune.generate": "phasetune.core.generate",
    "phasetune.recipes": "phasetune.core.recipes",
    "phasetune.engine": "phasetune.core.engine",
    "phasetune.param_groups": "phasetune.core.param_groups",
    "phasetune.transitions": "phasetune.core.transitions",
    "phasetune.thaw": "phasetune.core.thaw",
    # features: what a run can switch on
    "phasetune.audit": "phasetune.features.audit.phase_audit",
    "phasetune.audit_probes": "phasetune.features.audit.probes",
    "phasetune.audit_result": "phasetune.features.audit.result",
    "phasetune.prefix_cache": "phasetune.features.prefix_cache.cache",
    "phasetune.prefix_index": "phasetune.features.prefix_cache.index",
    "phasetune.prefix_store": "phasetune.features.prefix_cache.store",
    "phasetune.prefix_phases": "phasetune.features.prefix_cache.phases",
    "phasetune.snapshots": "phasetune.features.snapshots",
    "phasetune.rng": "phasetune.features.random_state",
    "phasetune.compile_support": "phasetune.features.compile_support",
    "phasetune.memory": "phasetune.features.peak_memory",
    # front ends
    "phasetune.seeds": "phasetune.lightning.seed_tables",  # results over seeds, for `phasetune fit --seeds`
    # run: PhaseRun and what it is built from (its names are all on phasetune.run itself)
    "phasetune.run_types": "phasetune.run",
    "phasetune.run_view": "phasetune.run.view",
    "phasetune.run_audit": "phasetune.run.audit_glue",
    "phasetune.step_events": "phasetune.run.step_events",
    "phasetune.snapshot_store": "phasetune.run.snapshot_store",
    # loop: the plain-PyTorch front end and its FSDP2 strategy (phasetune.loop itself kept its path)
    "phasetune.strategy": "phasetune.loop.strategy",
    # sharding: the FSDP2 unit plan of a model without an fsdp_plan (used by the loop's strategy and the plan)
    "phasetune.loop.strategy.unit_plan": "phasetune.sharding.units",
    "phasetune.strategy.unit_plan": "phasetune.sharding.units",
}


def new_path(name: str) -> str | None:
    """Where the module ``name`` lives now, or None when ``name`` did not move (longest aliased prefix wins)."""
    parts = name.split(".")
    for end in range(len(parts), 1, -1):
        old = ".".join(parts[:end])
        if old in ALIASES:
            return ".".join([ALIASES[old], *parts[end:]])
    return None


class _AliasLoader(importlib.abc.Loader):
    """Puts the new module under the old name; the import system then returns whatever ``sys.modules``
    holds under that name after ``exec_module``, so the old name and the new one are one object."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # a throwaway module; exec_module replaces it in sys.modules

    def exec_module(self, module: ModuleType) -> None:
        old = module.__name__
        _warn_importer(f"{old} moved to {self.target}; import it from there ({old} will be removed in a later release)")
        sys.modules[old] = importlib.import_module(self.target)


def _warn_importer(message: str) -> None:
    """A DeprecationWarning attributed to the line that imported the old path: the first frame outside importlib
    (``import x``, ``importlib.import_module``, ``phasetune.x`` as an attribute, a pickle's class lookup), so the default filters
    show it when that line is in ``__main__`` and a ``-W`` filter on the importing module applies."""
    frame = sys._getframe(2)
    while frame.f_back is not None and ("importlib" in frame.f_code.co_filename
                                        or frame.f_globals.get("__name__") == "phasetune"):  # its __getattr__
        frame = frame.f_back
    g = frame.f_globals
    warnings.warn_explicit(message, DeprecationWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=g.get("__name__", "<unknown>"), registry=g.setdefault("__warningregistry__", {}))


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds the old paths in :data:`ALIASES` (and nothing else) before the regular finders do."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if not fullname.startswith("phasetune."):
            return None
        new = new_path(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


_FINDER = _AliasFinder()


def install() -> None:
    """Put the alias finder first on ``sys.meta_path`` (once): an old path must never reach the file
    finder, which would load a moved package's modules a second time under the old names."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _FINDER)


install()
