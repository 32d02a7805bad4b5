"""firmware_hooks is copied onto boards as is: standard library and pyserial only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "firmware_hooks"
ALLOWED = set(sys.stdlib_module_names) | {"serial", "firmware_hooks"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_firmware_hooks_imports_only_the_standard_library_and_pyserial() -> None:
    modules = sorted(PACKAGE.glob("*.py"))
    assert len(modules) >= 7
    for module in modules:
        outside = _imported_roots(module) - ALLOWED
        assert not outside, f"{module.name} imports {outside}"
