"""The layering of docs/design.md, checked for every module: lower layers never import higher ones.

Every import counts, also the ones inside functions (they are how heavy or optional
libraries stay lazy, not a way around the layers). A module missing from ``LAYERS``
fails the test, so a new module has to be placed in a layer (and in the table of
docs/design.md) when it is added.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "loramgr"

# Bottom first; a module may import its own layer and the layers before it. Keys are module
# names relative to the package, or "pkg.*" for every module of a subpackage.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("workspace & files", ("__init__", "errors", "workspace", "console", "filechecks", "integrity", "data.*")),
    ("models", ("models.*",)),
    ("export", ("export", "manifest")),
    ("formats", ("formats.*",)),
    ("adapter files", ("adapter_file", "adapters", "bases", "convert", "samples", "inventory", "embeddings")),
    ("merge", ("merge", "bake")),
    ("backends", ("backends.*",)),
    ("pipeline", ("pipeline.*", "runtime", "defaults")),
    ("verify & bench", ("verify.*", "bench.*")),
    ("service", ("serve.*",)),
    ("CLI", ("cli", "demo", "__main__")),
]


MODULES = {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int | None:
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])) \
                    or (pattern.endswith(".*") and module == pattern[:-2] + ".__init__"):
                return index
    return None


def _imports(module: str, path: Path, *, top_level: bool = False) -> set[str]:
    """loramgr modules ``module`` imports (relative to the package): anywhere, or only at module level."""
    package = module.split(".")[:-1]
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name.removeprefix("loramgr.") for a in node.names if a.name.startswith("loramgr.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and (node.module == "loramgr" or node.module.startswith("loramgr.")):
                base = []
                target = node.module.removeprefix("loramgr").removeprefix(".")
            else:
                continue
            for alias in node.names:  # ``from .x import y``: y is a module of package x, or a name in x
                submodule = ".".join(filter(None, [target, alias.name]))
                names.add(submodule if _resolve(submodule) else target or "__init__")
    return names


def _resolve(name: str) -> str | None:
    """The module file an import name stands for (a package resolves to its ``__init__``)."""
    for candidate in (name, f"{name}.__init__"):
        if candidate in MODULES:
            return candidate
    return None


def test_every_module_has_a_layer():
    unplaced = [m for m in MODULES if _layer(m) is None]
    assert not unplaced, f"place these modules in LAYERS (and docs/design.md's table): {unplaced}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    own = _layer(module)
    upward = []
    for name in _imports(module, MODULES[module]):
        target = _resolve(name)
        if target is None or target == module:
            continue
        if _layer(target) is not None and _layer(target) > own:
            upward.append(f"{target} ({LAYERS[_layer(target)][0]})")
    assert not upward, f"{module} ({LAYERS[own][0]}) imports a higher layer: {sorted(upward)}"


def test_no_import_cycles():
    """Module-level imports (the ones that run at import time) form no cycle."""
    graph = {module: {t for n in _imports(module, path, top_level=True)
                      if (t := _resolve(n)) and t != module}
             for module, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(nxt):], nxt]))
            if not state.get(nxt):
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module, [module])
