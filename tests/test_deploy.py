"""The systemd unit (deploy/systemd/vitalwire.service) and its environment file: systemd's own
checker accepts the unit, its keys hold what docs/production.md promises (a dedicated user, a
restart on failure, the sandbox, descriptors for thousands of sockets, a stop timeout longer than
the server's drain), and the environment file names only real settings, with valid values.
No systemd needs to run: ``systemd-analyze verify`` reads files."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vitalwire.app import make_server
from vitalwire.services.container import drain
from vitalwire.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "systemd" / "vitalwire.service"
ENV_FILE = ROOT / "deploy" / "systemd" / "vitalwire.env"
#: The hospital shape of docs/benchmarks.md: 10,000 devices and 1,000 clients on one node.
SOCKETS = 11_000


def unit_keys(text: str) -> dict[str, dict[str, list[str]]]:
    """``[Section] Key=value`` lines: every value of a key, in order (systemd allows repeats)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"a key before any section: {raw}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    """A systemd time span of the forms this unit uses: ``45s``, ``2min``, ``90``."""
    for suffix, scale in (("min", 60.0), ("ms", 0.001), ("s", 1.0)):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * scale
    return float(value)


def env_values() -> dict[str, str]:
    """The file as systemd's ``EnvironmentFile=`` reads it, in the plain form it uses: one
    ``KEY=value`` a line, ``#`` comments, no quotes (which systemd and shells treat apart)."""
    values = {}
    for raw in ENV_FILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and key.isidentifier() and not any(q in value for q in "\"'\\$"), raw
        values[key] = value
    return values


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the unit's keys are checked without it)")
    # the unit as shipped, but starting this checkout's `vitalwire`: verify checks that the
    # command exists, and /opt/vitalwire is where the guide installs it, not where tests run
    command = Path(sys.executable).parent / "vitalwire"
    assert command.exists(), command
    text = UNIT.read_text()
    assert text.count("ExecStart=/opt/vitalwire/bin/vitalwire ") == 1
    unit = tmp_path / UNIT.name
    unit.write_text(
        text.replace("ExecStart=/opt/vitalwire/bin/vitalwire ", f"ExecStart={command} ")
    )
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    # verify exits 0 on an unknown key or a value it cannot parse, only saying so: any line
    # about this unit is a failure
    about_unit = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    assert done.returncode == 0 and about_unit == [], done.stdout + done.stderr


def test_the_unit_runs_sandboxed_as_its_own_user_and_restarts_on_failure() -> None:
    service = unit_keys(UNIT.read_text())["Service"]
    assert service["User"] == ["vitalwire"] and service["Group"] == ["vitalwire"]
    assert service["EnvironmentFile"] == ["/etc/vitalwire/vitalwire.env"]
    assert service["ExecStart"] == ["/opt/vitalwire/bin/vitalwire serve --log-level warning"]
    assert service["Restart"] == ["on-failure"]
    for key, value in (
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
        ("CapabilityBoundingSet", ""),
    ):
        assert service[key] == [value], key
    # the only writable place is the state directory, where the SQLite store's URL points
    assert service["StateDirectory"] == ["vitalwire"]
    assert service["ReadWritePaths"] == ["/var/lib/vitalwire"]
    sqlite = "VITALWIRE_DB=sqlite:////var/lib/vitalwire/vitalwire.db"
    assert f"#   {sqlite}\n" in ENV_FILE.read_text()
    assert int(service["LimitNOFILE"][0]) >= SOCKETS


def test_the_stop_timeout_outlasts_the_servers_drain() -> None:
    """SIGTERM drains (commit, then close the sockets, each bounded by ``drain``'s timeout), then
    uvicorn's graceful timeout: systemd must not SIGKILL before all three are over."""
    service = unit_keys(UNIT.read_text())["Service"]
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["KillMode"] == ["mixed"]  # the signal to the server, not to its threads
    drain_timeout = inspect.signature(drain).parameters["timeout"].default
    graceful = make_server(Settings(port=0), log_level="warning").config.timeout_graceful_shutdown
    assert isinstance(graceful, int | float)
    assert seconds(service["TimeoutStopSec"][0]) > 2 * drain_timeout + graceful


def test_the_environment_file_names_only_settings_with_valid_values() -> None:
    values = env_values()
    assert values, ENV_FILE
    ours = {k: v for k, v in values.items() if k.startswith("VITALWIRE_")}
    fields = {f"VITALWIRE_{name.upper()}" for name in Settings.model_fields}
    assert sorted(set(ours) - fields) == []  # a misspelt name would be ignored silently
    # uvicorn's own variable is the only other one
    assert sorted(set(values) - set(ours)) == ["FORWARDED_ALLOW_IPS"]
    settings = Settings(**{k.removeprefix("VITALWIRE_").lower(): v for k, v in ours.items()})
    assert settings.db.startswith("postgresql://")
    assert len(settings.jwt_secret) >= 32
