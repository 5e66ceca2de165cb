"""TLS from the SDK and every client command: a server with a certificate from a test CA is
accepted with that CA (--cacert, SSL_CERT_FILE, ssl=) and refused without it, in one line."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import RunningServer, start_server, stop_server, wait_until
from vitalwire import wire
from vitalwire.sdk import ConnectFailed, DeviceClient, MonitorClient, login, tls


@dataclass
class TlsServer:
    srv: RunningServer
    https: str
    ca: Path
    creds: Path

    @property
    def login(self) -> list[str]:
        user, password = self.srv.user()
        return ["--url", self.https, "--user", user, "--password", password]


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[TlsServer]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile, cafile = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(cafile))
    srv, task = await start_server(
        tmp_path, patients=2, certfile=str(certfile), keyfile=str(keyfile)
    )
    creds = tmp_path / "creds.json"
    srv.creds.save(creds)
    port = srv.url.rsplit(":", 1)[1]
    try:
        yield TlsServer(srv, f"https://127.0.0.1:{port}", cafile, creds)
    finally:
        await stop_server(srv, task)


@pytest.fixture(autouse=True)
def _system_store() -> Iterator[None]:
    """Every test starts and ends with the system trust store as the process default."""
    tls.set_default_cafile(None)
    yield
    tls.set_default_cafile(None)


async def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """The CLI in a child process (the server runs in this one's event loop)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("VITALWIRE_", "SSL_CERT"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vitalwire.cli",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**base, "COLUMNS": "80", **(env or {})},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def _refused_in_one_line(code: int, out: str) -> None:
    assert code == 1, out
    assert "Traceback" not in out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith("error: ") and "TLS certificate is not trusted" in lines[0], out


# -- the SDK ------------------------------------------------------------------------------------


async def test_monitor_client_trusts_the_process_default_ca(tls_server: TlsServer) -> None:
    user, password = tls_server.srv.user()
    _, _, pid = tls_server.srv.device(0)
    tls.set_default_cafile(tls_server.ca)
    async with MonitorClient(tls_server.https, username=user, password=password) as mon:
        starts = await mon.subscribe([f"patient:{pid}"])
    assert starts[f"patient:{pid}"].recovered


async def test_monitor_client_without_the_ca_is_refused_in_one_line(
    tls_server: TlsServer,
) -> None:
    user, password = tls_server.srv.user()
    mon = MonitorClient(tls_server.https, username=user, password=password)
    with pytest.raises(ConnectFailed) as info:
        await mon.connect()
    message = str(info.value)
    assert message.startswith(f"cannot connect to {tls_server.https}: ")
    assert "TLS certificate is not trusted" in message and "\n" not in message


async def test_monitor_client_with_a_token_fails_at_once_without_the_ca(
    tls_server: TlsServer,
) -> None:
    """The WebSocket's own TLS failure ends connect() at once (not after its timeout)."""
    user, password = tls_server.srv.user()
    token = await login(tls_server.https, user, password, tls.client_context(str(tls_server.ca)))
    mon = MonitorClient(tls_server.https, token=token)
    with pytest.raises(ConnectFailed, match="TLS certificate is not trusted"):
        await asyncio.wait_for(mon.connect(timeout=30), 5)
    await mon.close()


async def test_device_client_sends_over_wss_with_the_ca(tls_server: TlsServer) -> None:
    did, secret, _ = tls_server.srv.device(0)
    context = tls.client_context(str(tls_server.ca))
    async with DeviceClient(tls_server.https, did, secret, ssl=context) as dev:
        assert dev.url.startswith("wss://")
        dev.send(hr=72)
        await dev.flush()
        assert dev.acked == 1


async def test_device_client_without_the_ca_gives_up_in_one_line(tls_server: TlsServer) -> None:
    did, secret, _ = tls_server.srv.device(0)
    dev = DeviceClient(tls_server.https, did, secret)
    try:
        with pytest.raises(ConnectFailed) as info:
            await asyncio.wait_for(dev.start(timeout=30), 5)  # fails at once, not at 30 s
        assert "TLS certificate is not trusted" in str(info.value)
        assert "\n" not in str(info.value)
        assert dev.failure is info.value
        dev.send(hr=72)
        with pytest.raises(ConnectFailed):
            await dev.flush(timeout=30)
    finally:
        await dev.close()


def test_cacert_that_is_not_a_file_is_refused() -> None:
    with pytest.raises(FileNotFoundError, match="no-such-ca.pem"):
        tls.set_default_cafile("no-such-ca.pem")
    assert tls.default_cafile() is None


# -- the CLI ------------------------------------------------------------------------------------


async def test_watch_once_over_https(tls_server: TlsServer) -> None:
    code, out = await _cli("watch", "--once", *tls_server.login, "--cacert", str(tls_server.ca))
    assert code == 0, out
    assert "P001" in out and "P002" in out
    _refused_in_one_line(*await _cli("watch", "--once", *tls_server.login))


async def test_limits_show_over_https(tls_server: TlsServer) -> None:
    code, out = await _cli(
        "limits", "show", "P001", *tls_server.login, "--cacert", str(tls_server.ca)
    )
    assert code == 0, out
    assert '"spo2"' in out
    _refused_in_one_line(*await _cli("limits", "show", "P001", *tls_server.login))


async def test_ssl_cert_file_is_honoured(tls_server: TlsServer) -> None:
    env = {"SSL_CERT_FILE": str(tls_server.ca)}
    code, out = await _cli("limits", "show", "P001", *tls_server.login, env=env)
    assert code == 0, out
    assert '"spo2"' in out


async def test_command_over_https(tls_server: TlsServer) -> None:
    did, secret, pid = tls_server.srv.device(0)
    context = tls.client_context(str(tls_server.ca))
    async with DeviceClient(tls_server.https, did, secret, ssl=context) as dev:

        @dev.command("identify")
        def identify(cmd: wire.Command) -> dict[str, Any]:
            return {"blinking_s": cmd.args["duration_s"]}

        code, out = await _cli(
            "command", pid, "identify", *tls_server.login, "--cacert", str(tls_server.ca)
        )
        assert code == 0, out
        assert "completed {'blinking_s': 10.0}" in out
        _refused_in_one_line(*await _cli("command", pid, "identify", *tls_server.login))


async def test_simulate_over_wss(tls_server: TlsServer) -> None:
    sim = ["simulate", "--url", tls_server.https, "--credentials", str(tls_server.creds)]
    sim += ["--devices", "2", "--rate", "5", "--duration", "1"]
    code, out = await _cli(*sim, "--cacert", str(tls_server.ca))
    assert code == 0, out
    sessions = tls_server.srv.services.ingest.sessions
    await wait_until(lambda: not sessions, 10, "simulated devices gone")
    last = out.strip().splitlines()[-1]
    assert last.startswith("2 devices sent") and not last.endswith(" 0 acknowledged"), out
    _refused_in_one_line(*await _cli(*sim))


# -- no server at all ---------------------------------------------------------------------------


async def test_a_device_that_never_reached_its_server_says_why() -> None:
    from tests.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    dev = DeviceClient(dead, "mon-x", "secret", backoff_initial_s=0.05, backoff_max_s=0.1)
    try:
        await dev.start(wait=False)
        dev.send(hr=72)
        with pytest.raises(ConnectFailed, match="connection refused") as info:
            await dev.flush(timeout=1)
        assert str(info.value).startswith(f"cannot connect to {dead.replace('http', 'ws')}")
        with pytest.raises(ConnectFailed, match="connection refused"):
            await dev.wait_connected(timeout=0.5)
    finally:
        await dev.close()


async def test_a_monitor_that_cannot_reach_its_server_says_why() -> None:
    from tests.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectFailed, match=f"cannot connect to {dead}: connection refused"):
        await MonitorClient(dead, username="u", password="p").connect()
