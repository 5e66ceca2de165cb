"""Shared fixtures: a real vitalwire server on port 0 with a fresh SQLite file per test."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from vitalwire.app import Server, create_app, make_server
from vitalwire.provision import WardCredentials, provision_ward
from vitalwire.services.container import Services
from vitalwire.settings import Settings

#: The BIDMC recordings the repository ships (data/bidmc); VITALWIRE_VITALS_DIR points elsewhere.
DATA_DIR = Path(
    os.environ.get("VITALWIRE_VITALS_DIR") or Path(__file__).resolve().parents[1] / "data" / "bidmc"
)
REQUIRE_SERVICES = os.environ.get("VITALWIRE_REQUIRE_SERVICES") == "1"


@pytest.fixture(autouse=True, scope="session")
def _cheap_password_hashes() -> Iterator[None]:
    """argon2id at argon2's cheapest cost in this process. At the production cost each hash or
    check takes 0.1 s of CPU (near a second on a busy machine), and every in-process server
    hashes its users' passwords and every login checks one: minutes over the suite. The code
    under test is the same; child processes (``vitalwire serve``, the demo) keep the default."""
    from argon2 import PasswordHasher

    from vitalwire.services import auth

    cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(auth, "_hasher", cheap)
        mp.setattr(auth, "_DUMMY_HASH", cheap.hash("vitalwire-no-such-user"))
        yield


def need_data() -> Path:
    """The recordings' folder; a test fails (never skips) when it is missing: the clone has it."""
    if not sorted(DATA_DIR.glob("*_Numerics.csv")):
        pytest.fail(
            f"recorded vitals not found in {DATA_DIR} (the repository ships them in data/bidmc; "
            "VITALWIRE_VITALS_DIR names another folder)"
        )
    return DATA_DIR


@dataclass
class RunningServer:
    url: str
    ws_url: str
    services: Services
    creds: WardCredentials
    server: Server

    def device(self, i: int = 0) -> tuple[str, str, str]:
        d = self.creds.devices[i]
        return d["device_id"], d["secret"], d["patient_id"]

    def user(self, role: str = "clinician") -> tuple[str, str]:
        u = next(u for u in self.creds.users if u["role"] == role)
        return u["username"], u["password"]


async def login_token(srv: RunningServer, role: str) -> str:
    """An access token of the provisioned user with ``role``, from ``POST /auth/login``."""
    user, pw = srv.user(role)
    async with httpx.AsyncClient(base_url=srv.url) as http:
        r = await http.post("/auth/login", json={"username": user, "password": pw})
    assert r.status_code == 200, r.text
    token: str = r.json()["access_token"]
    return token


async def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Wait for ``predicate()`` to hold, checking on every loop turn, failing after ``timeout``."""

    async def _wait() -> None:
        while not predicate():
            await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(_wait(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def start_server(
    tmp_path: Path, patients: int = 3, clock: Any = None, **overrides: Any
) -> tuple[RunningServer, asyncio.Task[None]]:
    # load tests push devices far past a real device's message rate; rate-limit tests lower it
    overrides.setdefault("device_msgs_per_s", 1e6)
    overrides.setdefault("device_msgs_burst", 10**6)
    settings = Settings(
        db=f"sqlite:///{tmp_path / 'vitalwire.db'}",
        port=0,
        jwt_secret="test-secret-" + "x" * 40,
        **overrides,
    )
    app = create_app(settings) if clock is None else create_app(settings, clock)
    server = make_server(settings, app, "warning")
    server.install_signal_handlers = False  # type: ignore[attr-defined]
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started or task.done(), 20, "server start")
    if task.done():
        await task
    port = server.servers[0].sockets[0].getsockname()[1]
    svc: Services = app.state.services
    # a restart on the same store gives the ward's devices new secrets (audited), as the demo does
    creds = await provision_ward(
        svc.store, patients=patients, registry=svc.registry, rotate_secrets=True, actor="tests"
    )
    await svc.access.refresh()
    await svc.writer.flush()
    url = f"http://127.0.0.1:{port}"
    return RunningServer(url, f"ws://127.0.0.1:{port}", svc, creds, server), task


async def stop_server(running: RunningServer, task: asyncio.Task[None]) -> None:
    running.server.should_exit = True
    await asyncio.wait_for(task, 20)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running, task = await start_server(tmp_path)
    try:
        yield running
    finally:
        await stop_server(running, task)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def provision_db(db_url: str, patients: int = 3) -> WardCredentials:
    """Provision a store before a server process starts on it."""
    from vitalwire.store import open_store

    store = open_store(db_url)
    await store.open()
    try:
        return await provision_ward(store, patients=patients)
    finally:
        await store.close()


class ServerProcess:
    """``vitalwire serve`` in a child process: for kill -9 and SIGTERM."""

    def __init__(self, db_url: str, port: int, tmp_path: Path, **env: str) -> None:
        self.db_url = db_url
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = tmp_path / "server.log"
        self.env = {
            **os.environ,
            "VITALWIRE_JWT_SECRET": "test-secret-" + "y" * 40,
            "VITALWIRE_DEVICE_MSGS_PER_S": "1000000",
            "VITALWIRE_DEVICE_MSGS_BURST": "1000000",
            **{f"VITALWIRE_{k.upper()}": v for k, v in env.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vitalwire.cli",
                    "serve",
                    "--port",
                    str(self.port),
                    "--db",
                    self.db_url,
                    "--log-level",
                    "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        async with httpx.AsyncClient(base_url=self.url) as http:

            async def ready() -> None:
                while True:
                    assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
                    try:
                        if (await http.get("/healthz")).status_code == 200:
                            return
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)

            await asyncio.wait_for(ready(), 30)

    async def signal(self, sig: int) -> int:
        """Send ``sig`` and wait for the exit without blocking the event loop."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return await asyncio.to_thread(self.proc.wait, 30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
