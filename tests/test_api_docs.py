"""docs/api.md's examples, run as its top says: every ``sh`` block with ``bash -e`` in document
order on one server, every ``python`` block as a script with the same environment; ``sh norun`` and
``python norun`` blocks are shown only. A failing block fails the test with its heading, its text,
its stdout and its stderr."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import (
    REQUIRE_SERVICES,
    RunningServer,
    login_token,
    start_server,
    stop_server,
    wait_until,
)
from vitalwire.sdk import DeviceClient

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"
#: The sections that must hold at least one runnable block (once they are written).
SECTIONS = ("REST", "Administration", "GraphQL", "FHIR R4")
#: Longest one block may run.
BLOCK_TIMEOUT_S = 60

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_HEADING = re.compile(r"^(#{2,4}) +(.+?)\s*$", re.MULTILINE)


@dataclass
class Block:
    section: str  # the "## " section it is in
    heading: str  # the nearest heading above it
    lang: str
    runnable: bool
    text: str
    line: int


def blocks(markdown: str) -> list[Block]:
    """The fenced ``sh`` and ``python`` blocks of ``markdown``, in document order."""
    headings = [(m.start(), len(m.group(1)), m.group(2)) for m in _HEADING.finditer(markdown)]
    found = []
    for m in _FENCE.finditer(markdown):
        info = m.group(1).split()
        if not info or info[0] not in ("sh", "python"):
            continue
        above = [h for h in headings if h[0] < m.start()]
        section = next((t for _, level, t in reversed(above) if level == 2), "")
        heading = above[-1][2] if above else ""
        found.append(
            Block(
                section,
                heading,
                info[0],
                "norun" not in info[1:],
                m.group(2),
                markdown.count("\n", 0, m.start()) + 1,
            )
        )
    return found


def test_blocks_are_found_in_order() -> None:
    md = "## A\n\n```sh\necho 1\n```\n\n### B\n\n```python norun\nx\n```\n\n```json\n{}\n```\n"
    got = blocks(md)
    assert [(b.section, b.heading, b.lang, b.runnable, b.text) for b in got] == [
        ("A", "A", "sh", True, "echo 1\n"),
        ("A", "B", "python", False, "x\n"),
    ]


async def _ward(tmp_path: Path) -> tuple[RunningServer, asyncio.Task[None], DeviceClient]:
    srv, task = await start_server(tmp_path, patients=3)
    did, secret, _ = srv.device(0)
    dev = DeviceClient(srv.url, did, secret)
    await dev.start()
    now = time.time()
    for i in range(60):  # a minute of readings at 1 Hz
        dev.send({"hr": 72.0 + i % 7, "spo2": 97.0, "rr": 16.0, "temp_c": 36.9}, ts=now - 60 + i)
    dev.send(temp_c=40.5)  # past the temperature limit: an active alert to list and acknowledge
    await dev.flush()
    await wait_until(lambda: bool(srv.services.alerts._alert_patient), 10, "an alert raised")
    await srv.services.writer.flush()
    return srv, task, dev


async def _run(block: Block, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    if block.lang == "sh":
        argv = ["bash", "-e", "-c", block.text]
    else:
        script = cwd / f"block_{block.line}.py"
        script.write_text(block.text)
        argv = [sys.executable, str(script)]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), BLOCK_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        err += f"\n(killed after {BLOCK_TIMEOUT_S} s)".encode()
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


#: What the examples call besides python (a reader of docs/api.md has them; so does CI).
TOOLS = ("bash", "curl", "jq")


async def test_every_example_of_api_md_runs(tmp_path: Path) -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        reason = f"docs/api.md's examples need {', '.join(missing)} (apt-get install them)"
        if REQUIRE_SERVICES:
            pytest.fail(reason)
        pytest.skip(reason)
    found = blocks(API_MD.read_text())
    runnable = [b for b in found if b.runnable]
    assert runnable, "docs/api.md has no runnable example"
    # every section that is written (has any text besides a placeholder) runs at least one block
    text = API_MD.read_text()
    for section in SECTIONS:
        body = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
        assert body is not None, f"docs/api.md has no '## {section}' section"
        written = re.sub(r"<!--.*?-->|^#+ .*$|\s", "", body.group(1), flags=re.M | re.S)
        if written:
            assert any(b.section == section for b in runnable), f"no runnable block in {section}"

    srv, task, dev = await _ward(tmp_path)
    try:
        did, _, pid = srv.device(0)
        venv_bin = str(Path(sys.executable).parent)
        env = {
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            "HOME": str(tmp_path),
            "LANG": "C.UTF-8",
            "VW": srv.url,
            "TOKEN": await login_token(srv, "clinician"),
            "ADMIN_TOKEN": await login_token(srv, "admin"),
            "VIEWER_TOKEN": await login_token(srv, "viewer"),
            "PATIENT": pid,
            "DEVICE": did,
            "NO_PROXY": "*",
        }
        for block in runnable:
            rc, out, err = await _run(block, env, tmp_path)
            assert rc == 0, (
                f"docs/api.md line {block.line} ({block.section} / {block.heading}), "
                f"{block.lang} block exited {rc}:\n{block.text}\n--- stdout:\n{out}\n"
                f"--- stderr:\n{err}"
            )
    finally:
        await dev.close()
        await stop_server(srv, task)
