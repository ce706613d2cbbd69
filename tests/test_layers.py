"""Which modules may import which, read from the source with `ast` (every import, also those inside functions):
pages (portal.ui) call domain functions, never the REST API's modules (portal.api); ood_app imports portal, never the
other way round; connection.json's owner (portal.connection) needs nothing but the standard library."""
import ast
import sys
from pathlib import Path

from tests.conftest import REPO


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set:
    """The absolute names a module imports: `from a import b` gives a and a.b (b may be a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return found


def modules(package: str) -> dict:
    return {module_name(path): imports_of(path) for path in sorted((REPO / package).rglob("*.py"))}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_import_scan_sees_relative_and_absolute_imports():
    portal = modules("portal")
    assert "portal.cluster.cluster_overview" in portal["portal.ui.catalog"]  # from ..cluster import cluster_overview
    assert "portal.ui.login" in portal["portal.ui"]  # from . import ..., login, ...
    assert "portal.connection" in modules("ood_app")["ood_app.launch"]  # from portal.connection import ...


def test_pages_never_import_the_api_modules():
    offending = {module: sorted(name for name in names if within(name, "portal.api"))
                 for module, names in modules("portal").items() if within(module, "portal.ui")}
    assert not {module: names for module, names in offending.items() if names}


def test_ood_app_imports_portal_and_portal_never_imports_ood_app():
    offending = {module: sorted(name for name in names if within(name, "ood_app"))
                 for module, names in modules("portal").items()}
    assert not {module: names for module, names in offending.items() if names}
    assert any(within(name, "portal") for names in modules("ood_app").values() for name in names)


def test_connection_json_has_one_owner_that_needs_only_the_standard_library():
    names = imports_of(REPO / "portal" / "connection.py")
    outside = sorted(name for name in names if name.split(".")[0] not in sys.stdlib_module_names)
    assert not outside
    readers = sorted(str(path.relative_to(REPO)) for package in ("portal", "ood_app")
                     for path in (REPO / package).rglob("*.py")
                     if '"connection.json"' in path.read_text() and path.name != "connection.py")
    assert not readers  # everyone else goes through portal.connection
