"""Imports inside clfast point one way (DESIGN.md §1), read from the source, not from a run.

Every module under ``clfast/`` (and ``kernels/``, installed as ``clfast.kernels``) is parsed with ``ast``;
each import it makes, at module level or inside a function, is an arrow from its layer to the imported
module's layer, and must be one of the arrows in ``ALLOWED``. Also checked: leaf modules import nothing of
clfast; no two modules import each other, directly or round a longer loop; a ``_private`` module or name is
imported, or read off an imported module (``_dispatch._PRIORITY``), only inside the package that owns it
(a module's own ``_names`` by that module alone); nothing imports a top-level ``kernels`` (that name is
Hugging Face's package).

Violations the tree has today, each being fixed elsewhere, are listed in ``KNOWN_VIOLATIONS`` with the
reason; the test fails on any other violation, and on a listed one that is gone (delete it from the list).
``test_checker_reports_planted_imports`` plants bad modules in a copy of the tree to show each rule fires.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Module name (or package prefix) -> layer; the longest matching prefix wins.
LAYERS = {
    "clfast.kernels": "kernels",   # Triton kernels (top-level kernels/ folder)
    "clfast._C": "kernels",        # C++/CUDA kernels (csrc/, compiled)
    "clfast._ext": "ops",          # loads clfast._C for the ops' cpu/cuda backends
    "clfast._triton": "ops",       # whether the ops' triton backends can run here
    "clfast.ops": "ops",
    "clfast.backbones": "backbones",
    "clfast.methods": "methods",
    "clfast.data": "data",
    "clfast.engine": "engine",
    "clfast.info": "info",
    "clfast.cli": "cli",
    "clfast.__main__": "cli",
}

# Layer -> the other layers its modules may import (imports inside a layer are always allowed).
# kernels <- ops <- backbones <- methods <- engine <- cli/info, and data <- engine, with the short cuts the
# design asks for: methods call the ops (retrieval), the engine and `clfast info` report the ops' backends,
# the CLI lists datasets; layers below the engine are below it (the run record names the backbone's
# weights, the random-weights spellings live with the backbone loader).
ALLOWED = {
    "kernels": set(),
    "ops": {"kernels"},
    "backbones": {"ops"},
    "methods": {"backbones", "ops"},
    "data": set(),
    "engine": {"methods", "backbones", "ops", "data"},
    "info": {"ops"},
    "cli": {"engine", "data", "info"},
}

# Leaf modules: import nothing of clfast, importable from anywhere (hashing, atomic writes, seeding...).
# The package itself is one: clfast/__init__.py loads its subpackages lazily, on attribute access.
LEAVES = {"clfast", "clfast.utils", "clfast.utils.files", "clfast.utils.seeding", "clfast.utils.checkpoint_file",
          "clfast.utils.cpu"}

# Violations in today's tree, each with the reason it is there; being fixed in the same issue (12).
KNOWN_VIOLATIONS: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------------
# The checker: pure functions of {module name: (source, is_package)}, so the negative control can plant
# modules without touching the tree.
# ---------------------------------------------------------------------------------------------------


def tree_sources(root: Path = ROOT) -> dict[str, tuple[str, bool]]:
    """Every module of the installed package, by dotted name: clfast/** and kernels/*.py."""
    out = {}
    for path in sorted((root / "clfast").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path.read_text(encoding="utf-8"), is_pkg)
    for path in sorted((root / "kernels").glob("*.py")):
        out[f"clfast.kernels.{path.stem}"] = (path.read_text(encoding="utf-8"), False)
    return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve_relative(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    package = module if is_pkg else module.rpartition(".")[0]
    parts = package.split(".")
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([target] if target else []))


@functools.lru_cache(maxsize=None)
def _nodes(source: str) -> tuple[list[ast.AST], list[ast.Attribute]]:
    """The import-like nodes and the attribute nodes of ``source``, anywhere in it (parsed once)."""
    imports, attributes = [], []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.Call)):
            imports.append(node)
        elif isinstance(node, ast.Attribute):
            attributes.append(node)
    return imports, attributes


def _existing(name: str, modules: set[str]) -> str:
    """The longest prefix of ``name`` that is a module."""
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


def references(module: str, source: str, is_pkg: bool, modules: set[str]):
    """("import" | "attribute", target module, name or None, line) for what ``module`` takes from others.

    Imports: ``from a.b import c`` targets module ``a.b.c`` when that is a module, else module ``a.b``
    with name ``c``; imports inside functions count, and so does ``importlib.import_module("...")`` with a
    literal. Attributes: ``m._x`` where ``m`` was bound by importing a module (``from . import m``,
    ``import a.b as m``, ``import a.b`` then ``a.b._x``) takes the name ``_x`` of that module too."""
    imports, attributes = _nodes(source)
    bound: dict[str, str] = {}  # local name -> the module an import bound it to
    for node in imports:
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _existing(alias.name, modules)
                if alias.asname:
                    bound[alias.asname] = target
                else:
                    bound[alias.name.partition(".")[0]] = alias.name.partition(".")[0]
                yield "import", target, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, is_pkg, node.level, node.module) if node.level else node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    bound[alias.asname or alias.name] = sub
                    yield "import", sub, None, node.lineno
                else:
                    yield "import", _existing(base, modules), alias.name, node.lineno
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            yield "import", _existing(node.args[0].value, modules), None, node.lineno
    for node in attributes:
        chain, head = [], node
        while isinstance(head, ast.Attribute):
            chain.insert(0, head.attr)
            head = head.value
        if not (isinstance(head, ast.Name) and head.id in bound and bound[head.id] in modules):
            continue
        target = bound[head.id]
        for attr in chain:  # down through submodules to the first plain name
            if f"{target}.{attr}" not in modules:
                yield "attribute", target, attr, node.lineno
                break
            target = f"{target}.{attr}"
        else:
            yield "attribute", target, None, node.lineno


def layer_of(module: str) -> str | None:
    best = None
    for prefix, layer in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return best[1] if best else None


def _private(target: str, name: str | None, modules: set[str], packages: set[str]):
    """(what, scope) when the import reaches a ``_private`` module or name: scope is the package whose
    modules may import it, None when only its own module may (a module's privates are its own)."""
    if name is not None and _is_private(name):
        if target in packages:
            return f"private name of package {target}", target
        return "private name of another module", None
    parts = target.split(".")
    for i in range(1, len(parts)):
        if _is_private(parts[i]) and ".".join(parts[: i + 1]) in modules:
            package = ".".join(parts[:i])
            return f"private module of {package}", package
    return None


def find_violations(sources: dict[str, tuple[str, bool]]) -> dict[str, int]:
    """Violation -> line of the first import that shows it (0 for cycles and unassigned modules)."""
    modules = set(sources) | {"clfast._C"}
    packages = {m for m, (_, is_pkg) in sources.items() if is_pkg}
    found: dict[str, int] = {}
    graph: dict[str, set[str]] = {m: set() for m in sources}

    for module, (source, is_pkg) in sorted(sources.items()):
        src_layer = None if module in LEAVES else layer_of(module)
        if module not in LEAVES and src_layer is None:
            found.setdefault(f"{module}: in no layer (add it to LAYERS or LEAVES)", 0)
        for kind, target, name, line in references(module, source, is_pkg, modules):
            if target == "kernels" or target.startswith("kernels."):
                found.setdefault(f"{module} -> {target}: the top-level name kernels is another package's", line)
                continue
            if not (target == "clfast" or target.startswith("clfast.")):
                continue
            shown = f"{target}.{name}" if name and _is_private(name) else target
            private = _private(target, name, modules, packages)
            if private is not None:
                what, scope = private
                if scope is None or not (module == scope or module.startswith(scope + ".")):
                    found.setdefault(f"{module} -> {shown}: {what}", line)
            if kind != "import":
                continue  # the import that bound the module has been checked
            if module in LEAVES:
                found.setdefault(f"{module} -> {shown}: a leaf imports nothing of clfast", line)
            elif target not in LEAVES and src_layer is not None:
                dst_layer = layer_of(target)
                if dst_layer is not None and dst_layer != src_layer and dst_layer not in ALLOWED[src_layer]:
                    found.setdefault(f"{module} -> {shown}: {src_layer} may not import {dst_layer}", line)
            # for cycles: an import of one's own enclosing package (its __init__) is not an arrow
            if target in sources and target != module and not module.startswith(target + "."):
                graph[module].add(target)

    for cycle in _cycles(graph):
        found.setdefault("cycle: " + " -> ".join(cycle + [cycle[0]]), 0)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest loop through each strongly connected component of more than one module, rotated to
    start at its smallest name (so that the report is stable)."""
    index, low, stack, on_stack, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    loops = []
    for comp in comps:
        start = min(comp)
        paths, seen = [[start]], {start}  # breadth-first back to start, inside the component
        while paths:
            path = paths.pop(0)
            nxt = sorted(w for w in graph[path[-1]] if w in comp)
            if start in nxt:
                loops.append(path)
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return sorted(loops)


# ---------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------


def test_every_layer_has_its_table_row():
    assert set(LAYERS.values()) == set(ALLOWED), "ALLOWED needs one row per layer of LAYERS"
    for layer, allowed in ALLOWED.items():
        assert allowed <= set(ALLOWED), f"{layer} may import unknown layers {allowed - set(ALLOWED)}"


def test_imports_follow_the_layers():
    found = find_violations(tree_sources())
    new = {v: line for v, line in found.items() if v not in KNOWN_VIOLATIONS}
    gone = sorted(set(KNOWN_VIOLATIONS) - set(found))
    assert not new, "imports against DESIGN.md §1 (violation: line):\n" + \
        "\n".join(f"  {v}: line {line}" for v, line in sorted(new.items()))
    assert not gone, "fixed, so delete from KNOWN_VIOLATIONS:\n" + "\n".join(f"  {v}" for v in gone)


PLANTED = [
    # ({module: source} planted together, the one violation the checker must report)
    ({"clfast.methods._planted": "from ..engine import x\n"},
     "clfast.methods._planted -> clfast.engine: methods may not import engine"),
    ({"clfast.methods._planted": "def f():\n    from clfast.engine.trainer import Trainer\n"},
     "clfast.methods._planted -> clfast.engine.trainer: methods may not import engine"),
    ({"clfast.data._planted": "import clfast.ops\n"},
     "clfast.data._planted -> clfast.ops: data may not import ops"),
    ({"clfast.ops._planted": "from ..backbones.vit import create_vit\n"},
     "clfast.ops._planted -> clfast.backbones.vit: ops may not import backbones"),
    ({"clfast.kernels._planted": "from clfast import _ext\n"},
     "clfast.kernels._planted -> clfast._ext: kernels may not import ops"),
    ({"clfast.engine._planted": "import importlib\nimportlib.import_module('clfast.cli')\n"},
     "clfast.engine._planted -> clfast.cli: engine may not import cli"),
    ({"clfast.engine._planted": "from .metrics import _check_matrix as c\n"},
     "clfast.engine._planted -> clfast.engine.metrics._check_matrix: private name of another module"),
    ({"clfast.engine._planted": "from clfast.ops._dispatch import Backend\n"},
     "clfast.engine._planted -> clfast.ops._dispatch: private module of clfast.ops"),
    ({"clfast.engine._planted": "import kernels\n"},
     "clfast.engine._planted -> kernels: the top-level name kernels is another package's"),
    ({"clfast._planted": "x = 1\n"}, "clfast._planted: in no layer (add it to LAYERS or LEAVES)"),
    ({"clfast": "from clfast import ops\n"}, "clfast -> clfast.ops: a leaf imports nothing of clfast"),
    ({"clfast.data._a": "from ._b import x\n", "clfast.data._b": "def f():\n    from . import _a\n"},
     "cycle: clfast.data._a -> clfast.data._b -> clfast.data._a"),
]


def _planted(sources, modules):
    return {**sources, **{m: (src, m == "clfast") for m, src in modules.items()}}


@pytest.mark.parametrize("modules,expected", PLANTED, ids=[p[1].split(":")[0] for p in PLANTED])
def test_checker_reports_planted_imports(modules, expected):
    sources = tree_sources()
    found = set(find_violations(_planted(sources, modules))) - set(find_violations(sources))
    assert found == {expected}


@pytest.mark.parametrize("module,source", [
    ("clfast.engine._planted", "from ..data import Scenario\nfrom ..methods.base import Method\n"),
    ("clfast.cli", "from clfast import __version__\nfrom clfast.engine import trainer\n"),  # leaves: anywhere
    ("clfast.ops._planted", "from ._dispatch import Backend\nfrom clfast import _ext\n"),  # own package's
    ("clfast.methods._planted", "from .. import ops\nfrom ..ops import retrieve\n"),
    ("clfast.engine._planted", "from . import trainer\nfrom .. import engine\n"),  # own package: no cycle
])
def test_checker_accepts_allowed_imports(module, source):
    sources = tree_sources()
    assert set(find_violations(_planted(sources, {module: source}))) - set(find_violations(sources)) == set()
