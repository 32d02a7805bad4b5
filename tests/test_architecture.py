"""The shape docs/architecture.md draws, checked: arrows one way, modules small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 600

# package -> the project packages it may import (besides itself)
ALLOWED = {
    "hsm": set(),
    "firmware_hooks": set(),
    "jitr": set(),
    "station": {"hsm", "firmware_hooks"},
    "api": {"station", "hsm", "firmware_hooks"},
}
# The one place the station starts the server.
STATION_TO_API = {"station/cli/serve_cmds.py"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package: str) -> None:
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        allowed = ALLOWED[package] | {package}
        if rel in STATION_TO_API:
            allowed = allowed | {"api"}
        wrong += [f"{rel} imports {m}" for m in _imports(path) & set(ALLOWED) - allowed]
    assert wrong == []


def test_no_station_module_is_over_600_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "station").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
