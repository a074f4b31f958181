"""DESIGN.md's layering, read from the code: imports point down only."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "neurond"

# What each part of the package may import from neurond (besides itself).
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "log": {"errors"},
    "validate": {"errors"},
    "faults": {"errors"},
    "messages": set(),  # journald MESSAGE_IDs: constants only
    "domain": {"errors"},
    "core": {"errors", "log", "faults", "validate", "domain", "__init__"},
    "virt": {"errors", "log", "faults", "domain", "core", "config"},
    # The sysfs/procfs adapter beside virt/: reads files, imports neither libvirt nor dbus.
    "hardware": {"errors", "log", "validate"},
    # The HTTPS adapter beside virt/: the only package that imports aiohttp.
    "downloads": {"errors", "log", "config", "core", "__init__"},
    "bus": {"errors", "log", "faults", "validate", "config", "core", "hardware", "__init__"}
    | {"downloads"},
    "daemon": {"errors", "log", "faults", "config", "core", "virt", "hardware", "bus", "__init__"}
    | {"downloads"},
    "cli": {"errors", "__init__"},
    "__main__": {"daemon"},
    "__init__": set(),
}
# Importable from every layer: they import nothing of neurond (but errors).
LAYER_ONE = {"errors", "messages"}
THIRD_PARTY = {
    "libvirt": {"virt"},
    "libvirtaio": {"virt"},
    "libvirt_qemu": {"virt"},
    "dbus_fast": {"bus", "daemon", "cli"},
    "aiohttp": {"downloads"},
}


def _part(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "neurond":
            # from neurond import log, __version__: modules, or names of the package itself
            for a in node.names:
                is_module = (PKG / a.name).is_dir() or (PKG / f"{a.name}.py").exists()
                names.add(f"neurond.{a.name}" if is_module else "neurond")
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_imports_point_down() -> None:
    problems = []
    for path in PKG.rglob("*.py"):
        part = _part(path)
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "neurond":
                target = name.split(".")[1] if "." in name else "__init__"
                if target != part and target not in ALLOWED[part] | LAYER_ONE:
                    problems.append(f"{path.relative_to(PKG)} imports {name}")
            elif top in THIRD_PARTY and part not in THIRD_PARTY[top]:
                problems.append(f"{path.relative_to(PKG)} imports {name}")
    assert not problems, problems


def test_no_shell_true_and_no_bare_except() -> None:
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        assert "shell=True" not in text, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ExceptHandler):
                assert node.type is not None, f"bare except in {path}"
