"""core/ must stay pure: no I/O, no framework, no clock."""

from __future__ import annotations

import ast
from pathlib import Path

import vitalwire.core

FORBIDDEN = {
    "asyncio",
    "socket",
    "ssl",
    "select",
    "selectors",
    "threading",
    "subprocess",
    "time",
    "sqlite3",
    "sqlalchemy",
    "aiosqlite",
    "asyncpg",
    "redis",
    "fastapi",
    "starlette",
    "uvicorn",
    "websockets",
    "httpx",
    "aiomqtt",
    "requests",
    "urllib",
    "http",
    "os",
    "io",
    "logging",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_imports_no_io_module() -> None:
    core = Path(vitalwire.core.__file__).parent
    files = sorted(core.rglob("*.py"))
    assert files, "core/ has no modules"
    offenders = {str(f.relative_to(core)): sorted(_imports(f) & FORBIDDEN) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_purity_check_catches_an_io_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio\nfrom sqlalchemy import select\n")
    assert _imports(bad) & FORBIDDEN == {"asyncio", "sqlalchemy"}
