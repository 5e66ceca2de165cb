"""The README's walk-through, followed word for word against a running `vitalwire demo`.

The commands come from README.md itself (its "Five minutes" section, every ```sh and ```python
block in order), so the test cannot drift from what a reader types. Each runs as a child process,
as a user runs it, with three substitutions: the demo's URL for ``http://127.0.0.1:8000`` (the
demo here listens on a free port), ``watch --once`` for the interactive ``watch``, and the secret
``admin create-device`` printed for the snippet's placeholder. A snippet that streams forever runs
for a few seconds and must not have failed. The store is a fresh SQLite file the demo and the
``admin``/``simulate`` commands share through ``VITALWIRE_DB``, as ``./vitalwire.db`` is shared
in a clone.

Throughout, a clinician's MonitorClient follows the demo's twelve patients: their monitors
(mon-001..mon-012) must never go offline or be replaced, P001 must only ever get readings from
mon-001 and none stamped after the moment it arrives, and at the end every monitor is online and
still sending.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import DATA_DIR, need_data
from vitalwire.sdk import MonitorClient
from vitalwire.store import open_store

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_URL = "http://127.0.0.1:8000"
CLI = [sys.executable, "-m", "vitalwire.cli"]
#: Commands that talk to a running server (``--url``); the others work on the store.
CLIENT_COMMANDS = frozenset({"watch", "limits", "observe", "command", "simulate"})
SECRET_PLACEHOLDER = "the secret create-device printed"
DEMO = {f"patient:P{i:03d}": f"mon-{i:03d}" for i in range(1, 13)}
#: How long a snippet that streams forever runs before it is stopped.
STREAMING_SNIPPET_S = 4.0
COMMAND_TIMEOUT_S = 90.0

FENCE = re.compile(r"^ *```(sh|python)\n(.*?)^ *```$", re.M | re.S)


def walkthrough() -> list[tuple[str, str]]:
    """The walk-through's code blocks in order: (``sh`` or ``python``, dedented text)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Five minutes with vitalwire", 1)[1].split("\n## ", 1)[0]
    return [(lang, textwrap.dedent(body)) for lang, body in FENCE.findall(section)]


def shell_commands(block: str) -> list[list[str]]:
    """A ```sh block's commands, one per line (a trailing backslash continues it)."""
    joined = block.replace("\\\n", " ")
    return [t for t in (shlex.split(line, comments=True) for line in joined.splitlines()) if t]


def test_every_python_block_in_the_readme_compiles() -> None:
    blocks = re.findall(r"^ *```python\n(.*?)^ *```$", README.read_text("utf-8"), re.M | re.S)
    assert len(blocks) >= 3
    for i, block in enumerate(blocks, 1):
        compile(textwrap.dedent(block), f"README.md python block {i}", "exec")


def test_the_walkthrough_is_what_this_test_follows() -> None:
    """The blocks the walk-through test relies on are there (so a README edit that drops one
    fails here, by name, rather than by a silent gap in the walk-through)."""
    steps = walkthrough()
    commands = [" ".join(c) for lang, b in steps if lang == "sh" for c in shell_commands(b)]
    assert commands[0] == "export VITALWIRE_USER=clinician VITALWIRE_PASSWORD=vitalwire-clinician"
    for needed in ("watch", "command P002", "admin create-device ox-100", "simulate --replay"):
        assert any(needed in c for c in commands), needed
    snippets = [b for lang, b in steps if lang == "python"]
    assert len(snippets) == 5 and SECRET_PLACEHOLDER in snippets[2]
    assert ".snapshot" in snippets[1] and "async for" in snippets[1]
    assert "/vitals" in snippets[3] and "patientEvents" in snippets[4]


@dataclass
class Guard:
    """Watches the demo's twelve patients for everything the walk-through must not do."""

    problems: list[str] = field(default_factory=list)
    readings: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DEMO, 0))
    p001_readings: int = 0

    def see(self, stream: str, kind: str, data: dict[str, Any]) -> None:
        if stream not in DEMO:
            return
        own = DEMO[stream]
        if kind == "device_status" and data.get("device") == own and data["status"] != "online":
            self.problems.append(f"{own} went {data['status']} ({data.get('reason')})")
        elif kind == "alert" and data.get("condition") == "device_offline":
            self.problems.append(f"device_offline on {stream}: {data.get('message')}")
        elif kind == "reading":
            self.readings[stream] += 1
            if data["device"] != own:
                self.problems.append(f"{stream} got a reading from {data['device']}")
            if data["ts"] > time.time():
                self.problems.append(f"{stream} got a reading stamped in the future: {data}")
            if stream == "patient:P001":
                self.p001_readings += 1

    async def follow(self, mon: MonitorClient) -> None:
        async for e in mon.events():
            self.see(e.stream, e.kind, e.data)

    async def all_sending(self, timeout: float) -> None:
        """Wait until every demo patient has a reading newer than now."""
        marks = dict(self.readings)

        async def wait() -> None:
            while any(self.readings[s] <= marks[s] for s in DEMO):
                await asyncio.sleep(0.05)

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            silent = [DEMO[s] for s in DEMO if self.readings[s] <= marks[s]]
            raise AssertionError(f"no reading within {timeout} s from {silent}") from None


@dataclass
class Walk:
    """Runs the walk-through's commands against the demo at ``url``."""

    url: str
    cwd: Path
    env: dict[str, str]
    secret: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)

    async def command(self, tokens: list[str]) -> None:
        line = shlex.join(tokens)
        if tokens[0] == "export":
            for assignment in tokens[1:]:
                name, _, value = assignment.partition("=")
                self.env[name] = value
            return
        if tokens[0] == "curl":
            self.outputs[line] = await self.curl(tokens)
            return
        assert tokens[0] == ".venv/bin/vitalwire", f"README command not understood: {line}"
        args = [a.replace(README_URL, self.url) for a in tokens[1:]]
        if args[0] in CLIENT_COMMANDS and "--url" not in args:
            args += ["--url", self.url]  # the README's default URL is the demo's
        if args[0] == "watch":
            args.append("--once")
        code, out = await self.run([*CLI, *args], COMMAND_TIMEOUT_S)
        assert code == 0 and "Traceback" not in out, f"{line} exited {code}:\n{out}"
        self.outputs[line] = out
        if args[:2] == ["admin", "create-device"]:
            self.secret = json.loads(out)["secret"]

    async def curl(self, tokens: list[str]) -> str:
        tokens = [t.replace(README_URL, self.url) for t in tokens]
        if shutil.which("curl"):
            code, out = await self.run(tokens, 30)
            assert code == 0, out
            return out
        # no curl here: make the same request (-X METHOD, -H header, -d body, the URL)
        method, headers, body, url = "GET", {}, None, None
        it = iter(tokens[1:])
        for t in it:
            if t == "-X":
                method = next(it)
            elif t == "-H":
                name, _, value = next(it).partition(":")
                headers[name.strip()] = value.strip()
            elif t == "-d":
                body = next(it)
            elif not t.startswith("-"):
                url = t
        assert url is not None
        async with httpx.AsyncClient() as http:
            r = await http.request(method, url, headers=headers, content=body)
        return r.text

    async def snippet(self, n: int, source: str, until_lines: int | None = None) -> str:
        """Run a snippet; one that streams runs for STREAMING_SNIPPET_S, or, with
        ``until_lines``, until it has printed that many lines (at most COMMAND_TIMEOUT_S)."""
        if SECRET_PLACEHOLDER in source:
            assert self.secret is not None, "the device snippet runs after admin create-device"
            source = source.replace(SECRET_PLACEHOLDER, self.secret)
        path = self.cwd / f"snippet{n}.py"
        path.write_text(source.replace(README_URL, self.url))
        streams = "async for" in source
        if streams and until_lines is not None:
            code, out = await self.run_until(
                [sys.executable, str(path)], until_lines, COMMAND_TIMEOUT_S
            )
        else:
            code, out = await self.run(
                [sys.executable, str(path)], STREAMING_SNIPPET_S if streams else COMMAND_TIMEOUT_S
            )
        if streams:  # still running when stopped, nothing on stderr: it did not fail
            assert code is None and "Traceback" not in out, f"snippet {n}:\n{out}"
        else:
            assert code == 0 and "Traceback" not in out, f"snippet {n} exited {code}:\n{out}"
        return out

    async def run_until(
        self, argv: list[str], lines: int, timeout: float
    ) -> tuple[int | None, str]:
        """Run ``argv`` until it has printed ``lines`` lines, then stop it (exit status None);
        its exit status if it ends first; fails at ``timeout``."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=self.cwd,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert proc.stdout is not None
        got: list[bytes] = []

        async def read() -> None:
            while len(got) < lines:
                line = await proc.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    return
                got.append(line)

        try:
            await asyncio.wait_for(read(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"{lines} lines not printed within {timeout} s: {got}") from None
        if proc.returncode is None and len(got) == lines:
            proc.kill()
            rest, _ = await proc.communicate()
            return None, b"".join(got).decode()
        rest, _ = await proc.communicate()
        return proc.returncode, (b"".join(got) + rest).decode()

    async def run(self, argv: list[str], timeout: float) -> tuple[int | None, str]:
        """Run ``argv``; its exit status (None: stopped at ``timeout``) and its output."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=self.cwd,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
            return proc.returncode, out.decode()
        except TimeoutError:
            proc.kill()
            out, _ = await proc.communicate()
            return None, out.decode()


async def start_demo(
    cwd: Path, db: str, env: dict[str, str]
) -> tuple[asyncio.subprocess.Process, str, list[str]]:
    """``vitalwire demo --port 0``: the process, its URL and its banner."""
    demo = await asyncio.create_subprocess_exec(
        *CLI,
        "demo",
        "--port",
        "0",
        "--db",
        db,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert demo.stdout is not None
    banner: list[str] = []

    async def read_banner() -> None:
        while not banner or "Stop:" not in banner[-1]:
            line = (await demo.stdout.readline()).decode()  # type: ignore[union-attr]
            assert line, "demo exited:\n" + "".join(banner)
            banner.append(line)

    await asyncio.wait_for(read_banner(), 60)
    m = re.search(r"^\s*URL\s+(http://127\.0\.0\.1:\d+)\s*$", "".join(banner), re.M)
    assert m, "".join(banner)
    return demo, m.group(1), banner


async def test_the_readme_walkthrough_leaves_the_demo_healthy(tmp_path: Path) -> None:
    need_data()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bidmc").symlink_to(DATA_DIR)  # the README's paths, as in a clone
    db = f"sqlite:///{tmp_path / 'vitalwire.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("VITALWIRE_USER", "VITALWIRE_PASSWORD")}
    env |= {"VITALWIRE_DB": db, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    demo, url, banner = await start_demo(tmp_path, db, env)
    drain: asyncio.Task[bytes] | None = None
    try:
        assert demo.stdout is not None
        drain = asyncio.create_task(demo.stdout.read())  # never let the demo block on its pipe
        export = "export VITALWIRE_USER=clinician VITALWIRE_PASSWORD=vitalwire-clinician"
        assert any(line.strip() == export for line in banner), "".join(banner)

        guard = Guard()
        async with MonitorClient(url, username="clinician", password="vitalwire-clinician") as mon:
            await mon.subscribe(list(DEMO))
            follow = asyncio.create_task(guard.follow(mon))
            try:
                await guard.all_sending(30)  # the demo's ward is up
                walk = Walk(url, tmp_path, env)
                snippets = 0
                printed: list[str] = []
                for lang, block in walkthrough():
                    if lang == "python":
                        snippets += 1
                        # the GraphQL subscription (step 8): until three events arrived; the
                        # client socket (step 5): until the snapshot and an event are printed
                        lines = 3 if "patientEvents" in block else None
                        if ".snapshot" in block:
                            lines = 2
                        printed.append(await walk.snippet(snippets, block, lines))
                        continue
                    for tokens in shell_commands(block):
                        await walk.command(tokens)
                await guard.all_sending(15)  # every demo monitor is still sending
            finally:
                follow.cancel()
        assert guard.problems == []
        assert guard.p001_readings > 0
        # step 8: the REST trend printed P001's SpO2 buckets; the GraphQL subscription printed
        # P002's events with contiguous offsets
        assert re.search(r"^\d\d:\d\d SpO2 min \d+", printed[3], re.M), printed[3]
        offsets = [int(m) for m in re.findall(r"^(\d+) [a-z_0-9]+ ", printed[4], re.M)]
        assert offsets and offsets == list(range(offsets[0], offsets[0] + len(offsets))), printed[4]

        out = walk.outputs
        checks = 0
        for line, text in out.items():
            if " watch" in line:
                assert "P012" in text and "online" in text, text
                checks += 1
            elif " command P002 identify" in line:
                assert re.search(r"cmd-\S+ completed", text), text
                checks += 1
            elif line.startswith("curl"):
                assert "access_token" in json.loads(text), text
                checks += 1
            elif " simulate --replay" in line:
                m = re.search(
                    r"replayed (\d+) readings .* on sim-mon-001 .*, (\d+) acknowledged", text
                )
                assert m and m.group(1) == m.group(2) != "0", text
                checks += 1
            elif " simulate " in line:
                m = re.search(r"(\d+) devices sent (\d+) readings, (\d+) acknowledged", text)
                assert m and m.group(2) == m.group(3) != "0", text
                checks += 1
            elif " alarms-report" in line:
                assert "| **total** |" in text, text
                checks += 1
        assert checks == 6, list(out)

        # afterwards: every demo monitor online, the simulated patients in the clinician's view,
        # no secret rotated
        async with MonitorClient(url, username="clinician", password="vitalwire-clinician") as mon:
            starts = await mon.subscribe([*DEMO, "patient:sim-P001", "patient:sim-P004"])
        for stream, did in DEMO.items():
            assert starts[stream].snapshot["devices"][did]["status"] == "online", stream
        assert "sim-mon-001" in starts["patient:sim-P001"].snapshot["devices"]
        store = open_store(db)
        await store.open()
        try:
            audit = await store.audit_log(10_000)
            replayed = await store.events_after("patient:sim-P001", 0, 100_000)
        finally:
            await store.close()
        assert [r for r in audit if r["action"] == "rotate_device_secret"] == []
        # the replay (and the scenario after it) stamped readings when sending them: none is
        # stamped after the server's clock when it arrived (the event's ts)
        readings = [e for e in replayed if e.kind == "reading"]
        assert len(readings) > 481
        assert {e.data["device"] for e in readings} == {"sim-mon-001"}
        ahead = [(e.data["ts"], e.ts) for e in readings if e.data["ts"] > e.ts]
        assert ahead == [], ahead[:5]
    finally:
        if demo.returncode is None:
            demo.send_signal(signal.SIGINT)
        try:
            code = await asyncio.wait_for(demo.wait(), 30)
        except TimeoutError:
            demo.kill()
            raise AssertionError("the demo did not stop within 30 s of Ctrl-C") from None
        rest = (await drain).decode() if drain is not None else ""
    assert code == 0, rest
    assert "vitalwire demo stopped" in rest
