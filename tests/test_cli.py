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
            env={**os.environ, "COLUMNS": "200"},
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
