"""Login: the throttle's policy (a table, an injected clock), and end to end on a real server:
429 with Retry-After, audited once; locks that end; password checks off the event loop, in a
pool whose backlog is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.conftest import RunningServer, start_server, stop_server, wait_until
from vitalwire import wire
from vitalwire.core.errors import InvalidMessage
from vitalwire.core.throttle import Throttle, ThrottlePolicy
from vitalwire.services import auth

# ------------------------------------------------------------------------------------------------
# the policy (core/throttle.py): pure, time is an argument
# ------------------------------------------------------------------------------------------------

POLICY = ThrottlePolicy(free=3, base_s=1.0, max_s=10.0, forget_s=100.0)


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(0, 0.0), (1, 0.0), (3, 0.0), (4, 1.0), (5, 2.0), (6, 4.0), (7, 8.0), (8, 10.0), (500, 10.0)],
)
def test_delay_doubles_after_the_free_failures_up_to_the_cap(failures: int, delay: float) -> None:
    assert POLICY.delay_s(failures) == delay


# each step: (seconds since the start, what happens, what retry_after then says)
STEPS: dict[str, list[tuple[float, str, int]]] = {
    "free failures, then a lock that grows": [
        (0, "fail", 0),
        (0, "fail", 0),
        (0, "fail", 0),
        (0, "fail", 1),  # the 4th failure: locked 1 s
        (0.5, "check", 1),  # rounded up to a whole second
        (1, "check", 0),  # the lock ended
        (1, "fail", 2),  # the next failure doubles it
        (3, "fail", 4),
        (7, "fail", 8),
        (15, "fail", 10),  # the cap
        (25, "fail", 10),
    ],
    "a success forgets the failures": [
        (0, "fail", 0),
        (0, "fail", 0),
        (0, "fail", 0),
        (0, "fail", 1),
        (1, "clear", 0),
        (1, "fail", 0),  # counted from zero again
    ],
    "a quiet key is forgotten": [
        (0, "fail", 0),
        (0, "fail", 0),
        (0, "fail", 0),
        (0, "fail", 1),
        (101, "check", 0),
        (101, "fail", 0),  # forget_s passed since the last failure: the count started again
    ],
}


@pytest.mark.parametrize("name", list(STEPS))
def test_throttle_steps(name: str) -> None:
    throttle = Throttle(POLICY, capacity=10)
    for at, action, expect in STEPS[name]:
        if action == "fail":
            throttle.failed("k", at)
        elif action == "clear":
            throttle.clear("k")
        assert throttle.retry_after("k", at) == expect, (at, action)


def test_failed_returns_the_lock_it_starts() -> None:
    throttle = Throttle(POLICY, capacity=10)
    assert [throttle.failed("k", 0.0) for _ in range(6)] == [0, 0, 0, 1, 2, 4]


def test_memory_is_bounded_least_recent_key_goes_first() -> None:
    throttle = Throttle(POLICY, capacity=3)
    for key in ("a", "b", "c"):
        for _ in range(4):
            throttle.failed(key, 0.0)
    assert throttle.retry_after("a", 0.0) == 1  # "a" is now the most recent
    for i in range(1000):  # an attacker rotating names
        throttle.failed(f"x{i}", 0.0)
    assert len(throttle) == 3
    assert throttle.retry_after("a", 0.0) == 0  # forgotten, as the oldest


@pytest.mark.parametrize(
    "args",
    [(0, 1.0, 10.0, 1.0), (3, 0.0, 10.0, 1.0), (3, 2.0, 1.0, 1.0), (3, 1.0, 10.0, 0.0)],
)
def test_policy_refuses_nonsense(args: tuple[int, float, float, float]) -> None:
    with pytest.raises(ValueError, match="free must be at least 1"):
        ThrottlePolicy(*args)


# ------------------------------------------------------------------------------------------------
# end to end: a real server; its clock is injected, so a lock ends when the test says so
# ------------------------------------------------------------------------------------------------


class ManualClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def _server(
    tmp_path: Path, clock: ManualClock | None = None, **settings: Any
) -> AsyncIterator[RunningServer]:
    srv, task = await start_server(tmp_path, clock=clock, **settings)
    try:
        yield srv
    finally:
        await stop_server(srv, task)


def _client(srv: RunningServer, address: str = "127.0.0.1") -> httpx.AsyncClient:
    """An HTTP client whose connections come from ``address`` (any of 127.0.0.0/8 on Linux)."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(base_url=srv.url, transport=transport, timeout=30)


async def _login(http: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    return await http.post("/auth/login", json={"username": username, "password": password})


async def _audit(srv: RunningServer, action: str) -> list[dict[str, Any]]:
    await srv.services.writer.flush()
    rows = await srv.services.store.audit_log(1000)
    return [r for r in rows if r["action"] == action]


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads every password check ran in (the real check still runs)."""
    ran: list[str] = []
    real = auth.verify_password

    def counted(password_hash: str | None, password: str) -> bool:
        ran.append(threading.current_thread().name)
        return real(password_hash, password)

    monkeypatch.setattr(auth, "verify_password", counted)
    return ran


class Gate:
    """Every password check waits here until the test opens it (then runs for real): a check
    held as long as the test needs. Were a check on the event loop, the loop would wait too."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.waiting = 0  # checks that reached the gate
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            self.waiting += 1
        self.opened.wait(10)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    held = Gate()
    real = auth.verify_password

    def check(password_hash: str | None, password: str) -> bool:
        held.hold()
        return real(password_hash, password)

    monkeypatch.setattr(auth, "verify_password", check)
    try:
        yield held
    finally:
        held.opened.set()


async def test_wrong_passwords_from_one_address_get_429_with_retry_after_audited_once(
    tmp_path: Path, hashes: list[str]
) -> None:
    clock = ManualClock()
    async with _server(tmp_path, clock, login_address_free=3, login_account_free=100) as srv:
        user, password = srv.user("clinician")
        async with _client(srv, "127.0.0.2") as attacker, _client(srv, "127.0.0.3") as other:
            # the attacker rotates account names: the address is what gives it away
            for i in range(4):
                r = await _login(attacker, f"guess-{i}", "wrong-password")
                assert r.status_code == 401, r.text
            assert len(hashes) == 4
            for i in range(4, 20):
                r = await _login(attacker, f"guess-{i}", "wrong-password")
                assert r.status_code == 429, r.text
                assert r.headers["Retry-After"] == "1"
                assert r.json() == {
                    "code": "rate_limited",
                    "message": "too many failed logins from this address: try again in 1 s",
                    "field": None,
                }
            assert len(hashes) == 4  # a refused attempt never reaches the hasher
            # someone else, from another address, for another account: in at once
            viewer, viewer_password = srv.user("viewer")
            r = await _login(other, viewer, viewer_password)
            assert r.status_code == 200, r.text
            # and the attacker's own address, once its lock ended, has one more try only
            clock.now += 1
            assert (await _login(attacker, user, "wrong-password")).status_code == 401
            r = await _login(attacker, user, password)
            assert r.status_code == 429 and r.headers["Retry-After"] == "2"
        throttled = await _audit(srv, "login_throttled")
        assert [(r["actor"], r["origin"], json.loads(r["detail"])) for r in throttled] == [
            (user, "127.0.0.2", {"scope": "address", "retry_after_s": 2}),
            ("guess-3", "127.0.0.2", {"scope": "address", "retry_after_s": 1}),
        ]
        failed = await _audit(srv, "login_failed")
        assert len(failed) == 5 and {r["origin"] for r in failed} == {"127.0.0.2"}
        assert [r["actor"] for r in await _audit(srv, "login")] == [viewer]


async def test_an_account_lock_ends_and_spares_the_address_it_logged_in_from(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    async with _server(tmp_path, clock, login_account_free=2, login_account_max_delay_s=30) as srv:
        user, password = srv.user("clinician")
        async with (
            _client(srv, "127.0.0.4") as ward,
            _client(srv, "127.0.0.5") as attacker,
            _client(srv, "127.0.0.6") as laptop,
        ):
            assert (await _login(ward, user, password)).status_code == 200  # their workstation
            clock.now += 1
            for _ in range(3):
                assert (await _login(attacker, user, "wrong-password")).status_code == 401
            for http in (attacker, laptop):  # the account is locked: from a new address too
                r = await _login(http, user, password)
                assert r.status_code == 429 and r.headers["Retry-After"] == "1", r.text
                assert r.json()["field"] == "username"
            # the lock ends when Retry-After said, and the clinician's laptop gets in
            clock.now += 1
            assert (await _login(laptop, user, password)).status_code == 200
            # the success forgot the account's failures: the attacker starts from zero...
            for _ in range(3):
                assert (await _login(attacker, user, "wrong-password")).status_code == 401
            async with _client(srv, "127.0.0.7") as stranger:
                assert (await _login(stranger, user, password)).status_code == 429
            # ...and the account's lock does not hold the addresses it logged in from
            assert (await _login(ward, user, password)).status_code == 200
            assert (await _login(laptop, user, password)).status_code == 200
        throttled = await _audit(srv, "login_throttled")
        assert [json.loads(r["detail"]) for r in throttled] == [
            {"scope": "account", "retry_after_s": 1}
        ] * 2


async def test_the_event_loop_runs_while_passwords_are_checked(tmp_path: Path, gate: Gate) -> None:
    """4 logins held in their password check: /healthz and a WebSocket ping are answered
    meanwhile, then all 4 logins succeed."""
    async with _server(tmp_path, login_workers=2) as srv:
        user, password = srv.user("clinician")
        token = await _token_without_check(srv, user)
        async with _client(srv) as http:
            ws = await connect(srv.ws_url + "/ws", proxy=None)
            await ws.send(wire.encode_text(wire.Auth(token=token, id=0)))
            reply = wire.decode_from_server_to_client(await asyncio.wait_for(ws.recv(), 10))
            assert isinstance(reply, wire.Result) and reply.ok, reply
            logins = [asyncio.create_task(_login(http, user, password)) for _ in range(4)]
            # two checks in the pool's two threads, two waiting for one
            await wait_until(
                lambda: gate.waiting == 2 and srv.services.login.in_pool == 4, 10, "4 checks held"
            )
            health = await asyncio.wait_for(http.get("/healthz"), 10)
            await ws.send(wire.encode_text(wire.Ping(id=7)))
            pong = wire.decode_from_server_to_client(await asyncio.wait_for(ws.recv(), 10))
            assert health.status_code == 200 and pong == wire.Pong(id=7)
            assert not any(t.done() for t in logins)  # all 4 still being checked
            gate.opened.set()
            answers = await asyncio.wait_for(asyncio.gather(*logins), 30)
            assert [r.status_code for r in answers] == [200] * 4
            await ws.close()


async def test_a_full_backlog_answers_429_at_once(tmp_path: Path, gate: Gate) -> None:
    async with _server(tmp_path, login_workers=1, login_queue=1) as srv:
        user, password = srv.user("clinician")
        async with _client(srv) as http:
            held = [asyncio.create_task(_login(http, user, password)) for _ in range(2)]
            await wait_until(lambda: srv.services.login.in_pool == 2, 10, "the pool full")
            r = await asyncio.wait_for(_login(http, user, password), 10)
            assert r.status_code == 429 and r.headers["Retry-After"] == "1", r.text
            assert r.json()["code"] == "rate_limited"
            assert not any(t.done() for t in held)  # refused while the others still wait
            gate.opened.set()
            assert [x.status_code for x in await asyncio.gather(*held)] == [200, 200]
        # a full pool is not the user's failure
        assert await _audit(srv, "login_failed") == []


async def test_checks_run_in_the_pool_threads(tmp_path: Path, hashes: list[str]) -> None:
    async with _server(tmp_path) as srv:
        user, password = srv.user("clinician")
        async with _client(srv) as http:
            assert (await _login(http, user, password)).status_code == 200
            assert (await _login(http, user, "wrong-password")).status_code == 401
        assert len(hashes) == 2
        assert all(name.startswith("vitalwire-login") for name in hashes), hashes


async def test_a_disabled_user_can_neither_log_in_nor_refresh(tmp_path: Path) -> None:
    async with _server(tmp_path) as srv:
        user, password = srv.user("clinician")
        async with _client(srv) as http:
            r = await _login(http, user, password)
            assert r.status_code == 200
            refresh = r.json()["refresh_token"]
            await srv.services.store.update_user(user, disabled=True)
            await srv.services.access.refresh()  # as the server does on the change
            r = await _login(http, user, password)
            assert r.status_code == 401 and r.json()["field"] == "username", r.text
            r = await http.post("/auth/refresh", json={"refresh_token": refresh})
            assert r.status_code == 401, r.text


async def test_refresh_refuses_a_revoked_generation_and_login_gets_the_new_one(
    tmp_path: Path,
) -> None:
    async with _server(tmp_path) as srv:
        user, password = srv.user("clinician")
        async with _client(srv) as http:
            old = (await _login(http, user, password)).json()["refresh_token"]
            await srv.services.store.update_user(user, revoke_tokens=True)  # a password reset
            await srv.services.access.refresh()  # as the server does on the change
            r = await http.post("/auth/refresh", json={"refresh_token": old})
            assert r.status_code == 401, r.text
            new = (await _login(http, user, password)).json()["refresh_token"]
            r = await http.post("/auth/refresh", json={"refresh_token": new})
            assert r.status_code == 200, r.text
            token = r.json()["access_token"]
            r = await http.get("/patients", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"username": "clinician\n", "password": "x"}, "username"),
        ({"username": "\x1b[2Jclinician", "password": "x"}, "username"),
        ({"username": "u" * 65, "password": "x"}, "username"),
        ({"username": "clinician", "password": "p" * 1025}, "password"),
    ],
)
async def test_login_fields_are_bounded_and_a_bad_one_is_not_audited(
    tmp_path: Path, body: dict[str, str], field: str
) -> None:
    async with _server(tmp_path) as srv:
        async with _client(srv) as http:
            r = await http.post("/auth/login", json=body)
        assert r.status_code == 422 and r.json()["field"] == field, r.text
        assert await _audit(srv, "login_failed") == []


async def _token_without_check(srv: RunningServer, user: str) -> str:
    """An access token for ``user`` issued by the server's own token service (no login)."""
    svc = srv.services
    row = await svc.store.get_user(user)
    assert row is not None
    return svc.tokens.issue(auth.Principal(user, row["role"]), svc.clock())


async def test_hash_password_async_hashes_in_the_pool(tmp_path: Path, hashes: list[str]) -> None:
    async with _server(tmp_path) as srv:
        login = srv.services.login
        digest = await login.hash_password_async("a-long-password")
        assert await login.verify_password(digest, "a-long-password")
        assert not await login.verify_password(digest, "another-password")
        assert all(name.startswith("vitalwire-login") for name in hashes) and len(hashes) == 2
        with pytest.raises(InvalidMessage, match="at least 8 characters"):
            await login.hash_password_async("short")
        assert login.in_pool == 0
