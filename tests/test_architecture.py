"""docs/architecture.md matches the tree, modules stay small, and no two modules import each other in a cycle."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

DOC = (REPO / "docs" / "architecture.md").read_text()
PORTAL = REPO / "portal"
MAX_LINES = 420
ALLOWED_CYCLES = [{"portal.db", "portal.models", "portal.batches.records"}]  # the database handle and its tables


def modules():
    """Module name -> file, for every Python file of the portal (migration revisions included)."""
    found = {}
    for path in sorted(PORTAL.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def test_every_path_the_map_names_exists():
    named = set(re.findall(r"`((?:portal|tests|templates|ood_app|docs|benchmarks|static|template)/[\w./<>-]*)`", DOC))
    assert named, "docs/architecture.md names no paths"
    missing = [path for path in sorted(named) if "<" not in path and not (REPO / path).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_every_module_is_on_the_map():
    unnamed = []
    for path in modules().values():
        rel = path.relative_to(REPO).as_posix()
        if path.name == "__init__.py" and rel != "portal/__init__.py":
            continue  # a package is named by its folder
        in_folder = f"`{path.parent.relative_to(REPO).as_posix()}/`" in DOC and f"`{path.name}`" in DOC
        if f"`{rel}`" not in DOC and not in_folder:
            unnamed.append(rel)
    assert not unnamed, f"modules missing from docs/architecture.md: {unnamed}"


def test_modules_stay_small():
    large = {path.relative_to(REPO).as_posix(): n for path in modules().values()
             if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not large, f"modules over {MAX_LINES} lines: {large}"


def imports_of(name: str, path: Path, known: dict) -> set:
    """The portal modules `name` imports anywhere in its file (at the top or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix
                       for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_cycles():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 and component not in ALLOWED_CYCLES:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, f"modules importing each other in a cycle: {cycles}"
