"""The package's layers: every import between phasetune's packages points down (or sideways within a layer),
and no two packages import each other, directly or around a loop. Read from the source with ``ast``, so an
import inside a function or under ``TYPE_CHECKING`` counts as much as one at the top of a module.

Each module belongs to the package under ``phasetune`` that holds it (``phasetune.core.engine`` to ``core``;
a root module such as ``phasetune.errors`` to itself). ``phasetune/__init__.py`` is the public facade that
gathers every layer's names, so it is above every layer and nothing below imports it.
"""

from __future__ import annotations

import ast
import itertools
from collections import defaultdict
from pathlib import Path

from phasetune._aliases import new_path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC / "phasetune"

#: top to bottom; a package may import its own layer's other packages and any layer below, never one above
LAYERS: list[tuple[str, set[str]]] = [
    ("front ends", {"lightning", "hf", "loop"}),
    ("run", {"run"}),
    ("features", {"plan", "lora", "features"}),
    ("sharding", {"sharding"}),
    ("core", {"core", "lr_shapes"}),  # lr_shapes stays a root module: schedule files name it as a class path
    ("base", {"util", "errors", "_aliases"}),
]

#: package -> layer index (0 is the top)
LEVEL = {package: i for i, (_, packages) in enumerate(LAYERS) for package in packages}

#: upward imports that stay for now, each with why and the fix; (importing module, imported module)
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}

MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    """Whether ``name`` is a module or package of the source tree (an old path: where it lives now)."""
    rel = Path(*(new_path(name) or name).split("."))
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    """Every phasetune module ``path`` imports (``from phasetune import x`` is ``phasetune.x`` when x is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "phasetune")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            if base.split(".")[0] != "phasetune":
                continue
            subs = [f"{base}.{a.name}" for a in node.names if is_module(f"{base}.{a.name}")]
            out.update(subs)
            if len(subs) < len(node.names):
                out.add(base)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)
              and str(node.args[0].value).startswith("phasetune.")):
            out.add(node.args[0].value)
    return out


def package_of(module: str) -> str:
    """``phasetune.core.engine`` -> ``core``; ``phasetune.errors`` -> ``errors``; ``phasetune`` -> ``phasetune``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "phasetune"


def edges() -> list[tuple[str, str]]:
    """(importing module, imported module) for every import between two different packages."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        source = module_name(path)
        if source == "phasetune":
            continue  # the facade
        for target in sorted(imported_modules(path)):
            target = new_path(target) or target  # an old path counts where it lives now (its own test finds it)
            if package_of(source) != package_of(target):
                out.append((source, target))
    return out


def test_every_package_has_a_layer():
    packages = {package_of(module_name(p)) for p in ROOT.rglob("*.py")} - {"phasetune"}
    assert packages - set(LEVEL) == set(), "add the new package to LAYERS in tests/test_layers.py"


def test_imports_between_packages_only_point_down():
    upward = []
    for source, target in edges():
        src_pkg, dst_pkg = package_of(source), package_of(target)
        above = dst_pkg == "phasetune" or LEVEL.get(dst_pkg, -1) < LEVEL.get(src_pkg, -1)
        if above and (source, target) not in ALLOWED_UPWARD:
            where = "the phasetune facade" if dst_pkg == "phasetune" else f"layer '{LAYERS[LEVEL[dst_pkg]][0]}'"
            upward.append(f"{source} ({LAYERS[LEVEL[src_pkg]][0]}) imports {target}, in {where} above it")
    assert upward == []


def test_every_allowed_upward_import_is_still_there():
    assert set(ALLOWED_UPWARD) - set(edges()) == set(), "remove the fixed ones from ALLOWED_UPWARD"


def test_no_two_packages_import_each_other_even_around_a_loop():
    graph: dict[str, set[str]] = defaultdict(set)
    why: dict[tuple[str, str], str] = {}
    for source, target in edges():
        a, b = package_of(source), package_of(target)
        graph[a].add(b)
        why.setdefault((a, b), f"{source} -> {target}")
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                loop = [*path[path.index(nxt):], nxt]
                cycles.append(" -> ".join(loop) + " (" + "; ".join(why[(x, y)] for x, y in itertools.pairwise(loop)) + ")")
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("phasetune"):
                private = [a.name for a in node.names if a.name.startswith("_") and not is_module(f"{node.module}.{a.name}")]
                if private:
                    found.append(f"{module_name(path)} imports {', '.join(private)} from {node.module}")
    assert found == []


def test_no_module_imports_an_old_module_path():
    old = [f"{module_name(p)} imports {t} (now {new_path(t)})" for p in sorted(ROOT.rglob("*.py"))
           for t in sorted(imported_modules(p)) if new_path(t)]
    assert old == []


def test_no_module_is_over_the_line_limit():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in sorted(ROOT.rglob("*.py"))}
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}
