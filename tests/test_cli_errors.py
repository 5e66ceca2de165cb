"""Every failure a user can fix prints one line naming the problem and exits non-zero: a table
of cases, each run as a real ``vitalwire`` process against a real server (or none)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, free_port, provision_db


@dataclass
class Live:
    url: str
    creds: Path
    folder: Path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("cli-errors")
    db = f"sqlite:///{folder / 'vitalwire.db'}"
    creds = asyncio.run(provision_db(db, patients=2))
    creds.save(folder / "creds.json")
    server = ServerProcess(db, free_port(), folder)
    asyncio.run(server.start())
    try:
        yield Live(server.url, folder / "creds.json", folder)
    finally:
        server.stop()


LOGIN = ["--user", "clinician", "--password", "vitalwire-clinician"]
ADMIN = ["--user", "admin", "--password", "vitalwire-admin"]
DEAD = "http://127.0.0.1:{dead}"
UNKNOWN = "error: unknown patient P999"

# (id, arguments, what the one line must contain); {url} is the live server, {dead} a port where
# nothing listens, {creds} the ward's credentials, {dir} a scratch folder.
CASES: list[tuple[str, list[str], str]] = [
    (
        "watch-wrong-password",
        ["watch", "--once", "--url", "{url}", "--user", "clinician", "--password", "nope"],
        "error: login refused for user 'clinician' at {url}: wrong username or password",
    ),
    *[
        (
            f"{name}-server-down",
            [*args, "--url", DEAD, *LOGIN],
            "error: cannot connect to http://127.0.0.1:{dead}: connection refused",
        )
        for name, args in [
            ("watch", ["watch", "--once"]),
            ("limits-show", ["limits", "show", "P001"]),
            ("limits-set", ["limits", "set", "P001", "spo2.low=88"]),
            ("observe", ["observe", "P001", "--on-oxygen"]),
            ("command", ["command", "P001", "identify"]),
        ]
    ],
    (
        "simulate-server-down",
        ["simulate", "--url", DEAD, "--credentials", "{creds}", "--duration", "0.2"],
        "error: cannot connect to ws://127.0.0.1:{dead}/ws/device: connection refused",
    ),
    (
        "simulate-replay-missing-file",
        ["simulate", "--url", "{url}", "--credentials", "{creds}", "--replay", "{dir}/no.csv"],
        "{dir}/no.csv",
    ),
    (
        "alarms-report-missing-folder",
        ["alarms-report", "{dir}/no-such-folder"],
        "error: {dir}/no-such-folder: no such folder of recordings",
    ),
    (
        "alarms-report-folder-without-recordings",
        ["alarms-report", "{dir}"],
        "error: {dir}: no BIDMC *_Numerics.csv recordings in this folder",
    ),
    ("serve-certfile-without-keyfile", ["serve", "--certfile", "c.pem"], "certfile needs keyfile"),
    ("serve-keyfile-without-certfile", ["serve", "--keyfile", "k.pem"], "keyfile needs certfile"),
    (
        "serve-certfile-missing",
        ["serve", "--certfile", "{dir}/c.pem", "--keyfile", "{dir}/k.pem"],
        "error: --certfile {dir}/c.pem: no such file",
    ),
    (
        "cacert-missing",
        ["limits", "show", "P001", "--url", "{url}", *LOGIN, "--cacert", "{dir}/ca.pem"],
        "error: --cacert {dir}/ca.pem: no such file",
    ),
    # the server answers not_found, or forbidden when the access check comes first: one wording
    *[
        (f"{name}-unknown-patient-{who[1]}", [*args, "--url", "{url}", *who], UNKNOWN)
        for name, args in [
            ("limits-show", ["limits", "show", "P999"]),
            ("limits-set", ["limits", "set", "P999", "spo2.low=88"]),
            ("observe", ["observe", "P999", "--on-oxygen"]),
            ("command", ["command", "P999", "identify"]),
            ("watch", ["watch", "--once", "--patients", "P999"]),
        ]
        for who in (LOGIN, ADMIN)
    ],
    *[
        (
            f"limits-set-{value}",
            ["limits", "set", "P001", f"hr.high={value}", "--url", "{url}", *LOGIN],
            f"error: hr.high must be a number (0 to 350) or 'default', got '{value}'",
        )
        for value in ("nan", "inf", "-inf")
    ],
    (
        "no-password",
        ["limits", "show", "P001", "--url", "{url}", "--user", "clinician"],
        "error: no password: give --password or set VITALWIRE_PASSWORD",
    ),
    (
        "no-user",
        ["limits", "show", "P001", "--url", "{url}", "--password", "x"],
        "error: no user: give --user NAME or set VITALWIRE_USER",
    ),
]


@pytest.mark.parametrize(("args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_fixable_failure_is_one_line(live: Live, args: list[str], expected: str) -> None:
    values = {"url": live.url, "dead": str(free_port()), "creds": str(live.creds)}
    values["dir"] = str(live.folder)
    argv = [a.format(**values) for a in args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITALWIRE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "vitalwire.cli", *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
        env={**env, "COLUMNS": "80"},  # narrow: a long message must still be one line
        cwd=live.folder,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert expected.format(**values) in lines[0], out
