"""The command line: admin commands on a store; demo and watch as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.conftest import wait_until
from vitalwire import wire
from vitalwire.cli import app
from vitalwire.sdk import MonitorClient

runner = CliRunner()


def test_admin_creates_patient_device_binding_and_user(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'admin.db'}"
    r = runner.invoke(app, ["admin", "create-patient", "P9", "--name", "Jo Bloggs", "--db", db])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["admin", "create-device", "ox-9", "--kind", "oximeter", "--db", db])
    assert r.exit_code == 0, r.output
    cred = json.loads(r.output)
    assert cred["device_id"] == "ox-9" and len(cred["secret"]) >= 40
    r = runner.invoke(app, ["admin", "bind", "ox-9", "P9", "--db", db])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "admin",
            "create-user",
            "nurse",
            "--role",
            "clinician",
            "--password",
            "s3cret-pass",
            "--db",
            db,
        ],
    )
    assert r.exit_code == 0 and json.loads(r.output) == {"username": "nurse", "role": "clinician"}
    r = runner.invoke(app, ["admin", "list-patients", "--db", db])
    assert re.search(r"P9\s+ward-a\s+Jo Bloggs\s+ox-9", r.output), r.output


def test_admin_errors_name_the_problem(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'admin.db'}"
    assert (
        runner.invoke(app, ["admin", "create-patient", "P1", "--name", "A", "--db", db]).exit_code
        == 0
    )
    r = runner.invoke(app, ["admin", "create-patient", "P1", "--name", "A", "--db", db])
    assert r.exit_code == 1 and "patient P1 already exists" in r.output
    r = runner.invoke(app, ["admin", "bind", "ghost", "P1", "--db", db])
    assert r.exit_code == 1 and "device ghost does not exist" in r.output
    r = runner.invoke(
        app,
        [
            "admin",
            "create-user",
            "u1",
            "--role",
            "janitor",
            "--password",
            "long-enough",
            "--db",
            db,
        ],
    )
    assert r.exit_code == 1 and "role must be one of admin, clinician, viewer" in r.output
    r = runner.invoke(app, ["admin", "create-patient", "bad id!", "--name", "A", "--db", db])
    assert r.exit_code == 1 and "patient_id must be" in r.output


def test_provision_ward_writes_credentials(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'w.db'}"
    out = tmp_path / "creds.json"
    r = runner.invoke(
        app, ["admin", "provision-ward", "--patients", "4", "--out", str(out), "--db", db]
    )
    assert r.exit_code == 0, r.output
    creds = json.loads(out.read_text())
    assert [d["patient_id"] for d in creds["devices"]] == ["P001", "P002", "P003", "P004"]


def _spawn(args: list[str], tmp_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "vitalwire.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=env,
    )


class Output:
    """Lines a child process prints, read by a thread so none is missed or blocks the test."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        assert proc.stdout is not None
        stream = proc.stdout

        def pump() -> None:
            for line in stream:
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def until(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"{pattern!r} not printed; output was:\n{''.join(self.seen)}")

    def rest(self, timeout: float = 10) -> str:
        out = []
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                break
            if line is None:
                break
            out.append(line)
        return "".join(out)


def test_demo_serves_a_live_ward_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    proc = _spawn(["demo", "--port", "0", "--db", f"sqlite:///{tmp_path / 'demo.db'}"], tmp_path)
    try:
        out = Output(proc)
        url = out.until(r"Health\s+(http://127\.0\.0\.1:\d+)/healthz").group(1)
        out.until(r"clinician\s+clinician / vitalwire-clinician")

        async def watch_ward() -> set[str]:
            async with MonitorClient(
                url, username="clinician", password="vitalwire-clinician"
            ) as m:
                streams = [f"patient:P{i:03d}" for i in range(1, 13)]
                await m.subscribe(streams)
                seen: set[str] = set()
                while len(seen) < 12:
                    e = await m.next_event(timeout=20)
                    if e.kind == "reading":
                        seen.add(e.stream)
                return seen

        assert len(asyncio.run(watch_ward())) == 12

        watch = subprocess.run(
            [sys.executable, "-m", "vitalwire.cli", "watch", "--url", url, "--once"],
            capture_output=True,
            text=True,
            timeout=60,
            env={  # the demo's login, as its banner says to export it
                **os.environ,
                "COLUMNS": "200",
                "VITALWIRE_USER": "clinician",
                "VITALWIRE_PASSWORD": "vitalwire-clinician",
            },
        )
        assert watch.returncode == 0, watch.stderr
        assert len(re.findall(r"P0(0[1-9]|1[0-2])", watch.stdout)) == 12
        assert "online" in watch.stdout and "NEWS2" in watch.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("demo did not stop within 30 s of Ctrl-C")
    rest = out.rest()
    assert proc.stdout is not None
    proc.stdout.close()
    assert code == 0, rest
    assert "vitalwire demo stopped" in rest


async def _cli(*args: str, timeout: float = 60) -> tuple[int, str]:
    """Run the CLI in a child process without blocking the in-process server's loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vitalwire.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def test_alarms_report_prints_the_burden_table() -> None:
    from tests.conftest import need_data

    r = runner.invoke(app, ["alarms-report", str(need_data())])
    assert r.exit_code == 0, r.output
    rows = [line for line in r.output.splitlines() if line.startswith("| bidmc_")]
    assert len(rows) == 5
    assert "spo2_low" in next(line for line in rows if "bidmc_32" in line)


async def test_limits_observe_and_command_through_a_running_server(server: Any) -> None:
    from vitalwire.simulator import SimDevice, SimState, run_device

    did, secret, pid = server.device(0)
    base = ["--url", server.url, "--user", "clinician", "--password", "vitalwire-clinician"]
    code, out = await _cli("limits", "set", pid, "spo2.low=88", *base)
    assert code == 0 and json.loads(out)["spo2"]["low"] == 88, out
    code, out = await _cli("limits", "set", pid, "spo2.low=abc", *base)
    assert code != 0 and "spo2.low must be a number" in out
    code, out = await _cli("limits", "show", pid, *base)
    assert code == 0 and json.loads(out)["spo2"]["low"] == 88
    code, out = await _cli("observe", pid, "--on-oxygen", "--scale", "2", *base)
    assert code == 0 and json.loads(out) == {"on_oxygen": True, "scale": 2}, out

    state = SimState()
    stop = asyncio.Event()
    sim = asyncio.create_task(
        run_device(server.url, SimDevice(did, secret, pid), rate_hz=5, stop=stop, state=state)
    )
    try:
        await wait_until(lambda: did in server.services.ingest.sessions, 10, "device online")
        code, out = await _cli("command", pid, "set_interval", "interval_s=0.5", *base)
        assert code == 0, out
        assert re.search(r"cmd-\w+ completed", out) and state.interval_s == 0.5
        assert "offline" not in out and len(re.findall(r" queued", out)) == 1, out
        code, out = await _cli("command", pid, "silence", "duration_s=600", *base)
        assert code == 1 and "duration_s must be between 1 and 120, got 600" in out
        code, out = await _cli("command", pid, "reset", *base)
        assert code == 0 and "completed" in out, out
        await wait_until(
            lambda: state.resets == 1 and did in server.services.ingest.sessions,
            10,
            "device back after reset",
        )
        code, out = await _cli(
            "command",
            pid,
            "reset",
            "--user",
            "viewer",
            "--password",
            "vitalwire-viewer",
            "--url",
            server.url,
        )
        assert code == 1 and "role viewer may not command" in out
    finally:
        stop.set()
        client = await asyncio.wait_for(sim, 30)
    assert client.connections >= 2  # reset really reconnected


def test_watch_view_shows_vitals_news2_and_the_top_alert() -> None:
    from rich.console import Console

    from vitalwire.watch import WardView

    view = WardView([{"id": "P001", "name": "Ada"}])
    view.start(
        "P001",
        5,
        {
            "vitals": {"spo2": {"value": 84.0, "ts": 1.0, "device": "d", "offset": 2}},
            "devices": {"d": {"status": "online", "ts": 1.0, "reason": None}},
            "alerts": [
                {
                    "alert_id": "a",
                    "priority": "high",
                    "condition": "spo2_low",
                    "state": "active",
                    "raised_at": 1.0,
                },
                {
                    "alert_id": "b",
                    "priority": "low",
                    "condition": "low_battery",
                    "state": "active",
                    "raised_at": 2.0,
                },
            ],
            "news2": {"total": 7, "band": "high"},
        },
    )
    console = Console(width=200, record=True)
    console.print(view.table())
    text = console.export_text()
    assert "84" in text and "7 high" in text and "high: spo2_low (+1)" in text


async def test_command_to_an_offline_device_says_it_waits_and_until_when(server: Any) -> None:
    from vitalwire.sdk import DeviceClient

    did, secret, pid = server.device(0)
    base = ["--url", server.url, "--user", "clinician", "--password", "vitalwire-clinician"]
    before = time.time()
    code, out = await _cli("command", pid, "identify", "--ttl", "2", *base)
    lines = out.strip().splitlines()
    assert code == 2, out
    cid = lines[0].split()[0]
    assert lines[0] == f"{cid} queued"
    m = re.fullmatch(
        rf"{cid} waits: device {did} is offline; it is sent when the device reconnects, "
        r"or expires at (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \S+ \(in ([12]) s\)",
        lines[1],
    )
    assert m is not None, out
    at = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))  # local time, as printed
    assert before + 1 <= at <= time.time() + 2
    assert lines[2:] == [f"{cid} expired time to live passed before delivery"], out

    code, out = await _cli("command", pid, "identify", "--no-wait", *base)
    assert code == 0, out
    cid = out.split()[0]
    assert out.splitlines()[0] == f"{cid} queued"
    assert f"device {did} is offline" in out.splitlines()[1] and "(in 300 s)" in out, out
    got: asyncio.Queue[wire.Command] = asyncio.Queue()
    dev = DeviceClient(server.url, did, secret)
    dev.on_command("identify", lambda cmd: got.put_nowait(cmd) or {})
    async with dev:  # it comes back: the command waited for it
        assert (await asyncio.wait_for(got.get(), 10)).command_id == cid


async def test_command_reply_says_whether_the_device_is_connected_and_when_it_expires(
    server: Any,
) -> None:
    """What the CLI's offline note comes from: the server's ``device_connected``, ``expires_at``."""
    from vitalwire.sdk import DeviceClient

    did, secret, pid = server.device(0)
    user, password = server.user()
    async with MonitorClient(server.url, username=user, password=password) as mon:
        msg = wire.SendCommand(patient_id=pid, name="identify", ttl_s=60)
        offline = (await mon.request(msg)).data["command"]
        assert offline["status"] == "queued" and offline["device_connected"] is False
        assert offline["expires_at"] == offline["at"] + 60
        async with DeviceClient(server.url, did, secret):
            online = await mon.request(wire.SendCommand(patient_id=pid, name="report_now"))
            assert online.data["command"]["device_connected"] is True
            assert online.data["command"]["expires_at"] == online.data["command"]["at"] + 300


async def test_serve_and_demo_help_show_every_default() -> None:
    expected = {
        "serve": {
            "--host": "127.0.0.1",
            "--port": "8000",
            "--db": "sqlite:///./vitalwire.db",
            "--bus": "memory://",
            "--certfile": "none: plain http/ws",
            "--keyfile": "none",
            "--log-level": "info",
            "--upstream": "none: not an edge node",
            "--node-id": "none",
            "--upstream-secret-file": "none",
            "--cluster": "one node",
        },
        "demo": {
            "--host": "127.0.0.1",
            "--port": "8000",
            "--db": "sqlite:///./vitalwire.db",
            "--patients": "12",
            "--rate": "1.0",
            "--open": "open",
        },
    }
    for name, defaults in expected.items():
        code, out = await _cli(name, "--help")
        assert code == 0, out
        options = {
            m.group(1): line for line in out.splitlines() if (m := re.search(r"(--[\w-]+)", line))
        }
        assert set(options) == {*defaults, "--help"}, out
        for option, default in defaults.items():
            assert re.search(rf"\[default: \(?{re.escape(default)}\)?\]", options[option]), (
                f"{name} {option}: no default {default!r} in\n{out}"
            )


def _own_terminal() -> None:
    """In the child: a new session whose controlling terminal is its stdin (a pty), so that the
    password prompt reads from it and turns its echo off, as in a user's terminal."""
    import fcntl
    import termios

    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


async def test_client_commands_ask_for_the_password_hidden_on_a_terminal(server: Any) -> None:
    import pty

    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITALWIRE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vitalwire.cli",
        "limits",
        "show",
        "P001",
        "--url",
        server.url,
        "--user",
        "clinician",
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**env, "COLUMNS": "200"},
        preexec_fn=_own_terminal,
    )
    os.close(slave)
    seen = b""

    def read_until(marker: bytes) -> bytes:
        nonlocal seen
        while marker not in seen:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        return seen

    try:
        # the space after the colon is written once echo is off (typing sooner would be lost)
        prompt = await asyncio.wait_for(asyncio.to_thread(read_until, b"clinician: "), 60)
        assert b"password for clinician: " in prompt, prompt
        os.write(master, b"vitalwire-clinician\n")
        out = await asyncio.wait_for(asyncio.to_thread(read_until, b"\x00never"), 60)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(master)
    assert b'"spo2"' in out
    assert b"vitalwire-clinician" not in out  # hidden input: never echoed
