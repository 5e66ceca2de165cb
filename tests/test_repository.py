"""The clone is the whole product: nothing it runs or documents needs a folder beside it."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from tests.conftest import need_data

ROOT = Path(__file__).resolve().parents[1]
#: What a user reads or runs: the code, the tests, the docs, the build.
SHIPPED = ("src", "tests", "docs", "tools", "README.md", "Makefile", "pyproject.toml", ".ci")


def _text_files() -> list[Path]:
    out: list[Path] = []
    for name in SHIPPED:
        path = ROOT / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        out += [
            f
            for f in files
            if f.suffix not in {".png", ".pyc", ".json"} and "egg-info" not in str(f)
        ]
    return out


def test_nothing_refers_to_a_folder_beside_the_clone() -> None:
    outside = re.compile(r"\.\./shared|parents\[2\]")
    offenders = [
        f"{f.relative_to(ROOT)}:{n}"
        for f in _text_files()
        if f != Path(__file__)
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert offenders == []


def test_the_recordings_ship_unmodified_with_their_licence() -> None:
    folder = need_data()
    readme = (ROOT / "data" / "bidmc" / "README.md").read_text()
    sums = dict(
        (name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.M)
    )
    assert len(sums) == 5
    for name, digest in sums.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert "ODC-By" in (ROOT / "data" / "bidmc" / "LICENSE").read_text()
