"""The WebSocket and HTTP edge under a hostile peer (issue 25): bounds before authentication,
credentials kept out of logs, the Origin check, invalid UTF-8, the request-body cap, security
headers, a client that never reads, and the bus history's byte bound.

Real servers on port 0 and raw sockets: each test writes the bytes an attacker would.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RunningServer, start_server, stop_server, wait_until
from tests.rawws import StalledClient
from vitalwire.app import HttpEdge
from vitalwire.bus.base import History, event_cost
from vitalwire.bus.memory import MemoryBus
from vitalwire.sdk import DeviceClient
from vitalwire.transports.common import Socket, origin_allowed
from vitalwire.transports.wsserver import LeanWebSocketProtocol
from vitalwire.wire import Event

# -- raw WebSocket helpers ------------------------------------------------------------------------


class Raw:
    """A WebSocket connection made by hand: any handshake header, any frame, any source address."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int):
        self.reader = reader
        self.writer = writer
        #: The handshake's HTTP status (101: accepted).
        self.status = status
        self.head = b""

    @classmethod
    async def open(
        cls,
        srv: RunningServer,
        path: str = "/ws/device",
        headers: dict[str, str] | None = None,
        source: str | None = None,
    ) -> Raw:
        port = int(srv.url.rsplit(":", 1)[1])
        local = (source, 0) if source else None
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local)
        fields = {
            "Host": f"127.0.0.1:{port}",
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Sec-WebSocket-Version": "13",
            **(headers or {}),
        }
        request = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        writer.write(request.encode() + b"\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        raw = cls(reader, writer, int(head.split()[1]))
        raw.head = head
        return raw

    def send(self, payload: bytes | str, opcode: int = 1) -> None:
        self.writer.write(frame(opcode, payload))

    async def next_frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The server's next frame: (opcode, payload)."""

        async def _read() -> tuple[int, bytes]:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.reader.readexactly(8), "big")
            return b0 & 0x0F, await self.reader.readexactly(n)

        return await asyncio.wait_for(_read(), timeout)

    async def text(self, timeout: float = 5.0) -> dict[str, Any]:
        while True:
            opcode, payload = await self.next_frame(timeout)
            if opcode == 1:
                return dict(json.loads(payload))
            assert opcode != 8, f"closed {int.from_bytes(payload[:2], 'big')}"

    async def close_code(self, timeout: float = 5.0) -> int:
        """The code of the server's close frame (frames before it are skipped)."""
        while True:
            opcode, payload = await self.next_frame(timeout)
            if opcode == 8:
                return int.from_bytes(payload[:2], "big")

    async def hello(self, srv: RunningServer, i: int = 0) -> None:
        did, secret, _ = srv.device(i)
        self.send(json.dumps({"type": "hello", "device_id": did, "secret": secret}))
        assert (await self.text())["type"] == "welcome"

    def close(self) -> None:
        self.writer.transport.abort()


def frame(opcode: int, payload: bytes | str, length: int | None = None) -> bytes:
    """A masked client frame; ``length`` announces another length than the payload's."""
    data = payload.encode() if isinstance(payload, str) else payload
    n = len(data) if length is None else length
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(data))


@asynccontextmanager
async def running(tmp_path: Path, **settings: Any) -> AsyncIterator[RunningServer]:
    srv, task = await start_server(tmp_path, patients=3, **settings)
    try:
        yield srv
    finally:
        await stop_server(srv, task)


async def token(srv: RunningServer) -> str:
    user, pw = srv.user()
    async with httpx.AsyncClient(base_url=srv.url) as http:
        r = await http.post("/auth/login", json={"username": user, "password": pw})
    return str(r.json()["access_token"])


@contextmanager
def captured(*names: str, level: int = logging.DEBUG) -> Iterator[list[logging.LogRecord]]:
    """Every record the named loggers (and the root) handle, whatever their propagation."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level)
    loggers = [logging.getLogger(n) for n in ("", *names)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.name != "root":
            lg.setLevel(level)
    try:
        yield records
    finally:
        for lg, old in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(old)


# -- 1. pre-authentication bounds -----------------------------------------------------------------

MIB = 1_048_576


@pytest.mark.parametrize("path", ["/ws/device", "/ws"])
async def test_a_large_frame_header_before_auth_is_refused_at_once_with_1009(
    tmp_path: Path, path: str
) -> None:
    async with running(tmp_path) as srv:
        raw = await Raw.open(srv, path)
        try:
            assert raw.status == 101
            # the header of a 1 MiB text frame (the hard limit: allowed after auth), no payload
            raw.writer.write(frame(1, b"", length=MIB))
            assert await raw.close_code() == 1009
        finally:
            raw.close()


async def test_after_auth_frames_past_the_pre_auth_bound_are_read(tmp_path: Path) -> None:
    async with running(tmp_path, pre_auth_frame_bytes=1024) as srv:
        raw = await Raw.open(srv)
        try:
            await raw.hello(srv)
            padded = '{"type":"ping","id":5}' + " " * 20_000  # past 1 KiB, under 64 KiB
            raw.send(padded)
            assert await raw.text() == {"type": "pong", "id": 5}
        finally:
            raw.close()


async def test_unauthenticated_connections_are_capped_per_address_and_in_total(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, pre_auth_per_address=3, pre_auth_total=5) as srv:
        held: list[Raw] = []
        try:
            for _ in range(3):
                held.append(await Raw.open(srv, source="127.0.0.1"))
            assert [r.status for r in held] == [101] * 3
            refused = await Raw.open(srv, source="127.0.0.1")
            refused.close()
            assert refused.status == 429 and b"retry-after: 5" in refused.head.lower()
            for _ in range(2):
                held.append(await Raw.open(srv, source="127.0.0.2"))
            assert held[-1].status == 101
            full = await Raw.open(srv, "/ws", source="127.0.0.3")
            full.close()
            assert full.status == 503
            # authenticating lifts the bound: one more from the first address gets in
            await held[0].hello(srv)
            again = await Raw.open(srv, source="127.0.0.1")
            assert again.status == 101
            held.append(again)
            # so does a connection that ends
            held.pop(1).close()
            await wait_until(lambda: _pre_auth(srv).count == 4, 5, "the closed one released")
            held.append(await Raw.open(srv, "/ws", source="127.0.0.3"))
            assert held[-1].status == 101
        finally:
            for r in held:
                r.close()


async def test_behind_a_trusted_proxy_the_bound_counts_the_forwarded_client(
    tmp_path: Path,
) -> None:
    """Behind a proxy every socket comes from the proxy's address: the per-address bound
    counts the client the trusted proxy names in X-Forwarded-For (uvicorn's
    ``forwarded_allow_ips``: 127.0.0.1 by default), never what an untrusted peer claims."""
    async with running(tmp_path, pre_auth_per_address=3, pre_auth_total=50) as srv:
        held: list[Raw] = []
        try:
            for i in range(6):  # six clients through the proxy (127.0.0.1): none is refused
                fwd = {"X-Forwarded-For": f"10.1.0.{i}"}
                held.append(await Raw.open(srv, headers=fwd, source="127.0.0.1"))
            assert [r.status for r in held] == [101] * 6
            one = {"X-Forwarded-For": "10.1.0.9"}
            for _ in range(3):
                held.append(await Raw.open(srv, headers=one, source="127.0.0.1"))
            refused = await Raw.open(srv, headers=one, source="127.0.0.1")
            refused.close()
            assert refused.status == 429  # one client past its bound, through the proxy
            # an untrusted peer's header is not believed: it counts as itself
            for i in range(3):
                fwd = {"X-Forwarded-For": f"10.2.0.{i}"}
                held.append(await Raw.open(srv, headers=fwd, source="127.0.0.2"))
            forged = await Raw.open(
                srv, headers={"X-Forwarded-For": "10.2.0.99"}, source="127.0.0.2"
            )
            forged.close()
            assert forged.status == 429
        finally:
            for r in held:
                r.close()


def _pre_auth(srv: RunningServer) -> Any:
    return srv.server.config.ws.pre_auth  # type: ignore[attr-defined]


# -- 2. query strings in logs ---------------------------------------------------------------------


async def test_credentials_in_a_query_string_never_reach_the_access_log(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        with captured("uvicorn.access", "uvicorn.error", level=logging.INFO) as records:
            async with httpx.AsyncClient(base_url=srv.url) as http:
                await http.get("/healthz?token=SECRET-A&verbose=1")
                await http.post("/auth/login?password=SECRET-B", json={})
                await http.get("/patients?limit=5&api_key=SECRET-C")
            raw = await Raw.open(srv, "/ws?token=SECRET-D")
            raw.close()
            await wait_until(
                lambda: any("/ws" in r.getMessage() for r in records), 5, "the WebSocket line"
            )
        lines = [r.getMessage() for r in records]
        assert not [line for line in lines if "SECRET" in line], lines
        assert any("/healthz?token=REDACTED&verbose=1" in line for line in lines), lines
        assert any("/patients?limit=5&api_key=REDACTED" in line for line in lines), lines
        assert any('"POST /auth/login HTTP' in line for line in lines), lines  # query dropped
        assert any('"WebSocket /ws"' in line for line in lines), lines


# -- 3. Origin ------------------------------------------------------------------------------------


async def test_origin_is_checked_against_the_servers_own_origins_not_the_host_header(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, allowed_origins=["https://ward.example"]) as srv:
        port = srv.url.rsplit(":", 1)[1]
        cases = [
            # a DNS-rebinding page: its name now resolves to this server; Host and Origin agree
            ({"Host": "attacker.example", "Origin": "http://attacker.example"}, 403),
            (
                {"Host": f"attacker.example:{port}", "Origin": f"http://attacker.example:{port}"},
                403,
            ),
            ({"Origin": f"https://127.0.0.1:{port}"}, 403),  # the wrong scheme: no TLS here
            ({"Origin": "http://127.0.0.1:1"}, 403),  # another port
            ({"Origin": "https://ward.example"}, 101),  # configured
            ({"Origin": "https://ward.example/"}, 101),
            ({"Origin": f"http://127.0.0.1:{port}"}, 101),  # the server's own
            ({"Origin": f"http://localhost:{port}"}, 101),  # bound to loopback: its names too
            ({"Origin": f"http://[::1]:{port}"}, 101),
            ({}, 101),  # no Origin: not a browser (devices, SDK, CLI)
        ]
        for path in ("/ws/device", "/ws"):
            for headers, status in cases:
                raw = await Raw.open(srv, path, headers)
                raw.close()
                assert raw.status == status, (path, headers)


def test_the_public_url_is_an_allowed_origin() -> None:
    def socket(origin: str) -> Socket:
        scope = {
            "type": "websocket",
            "scheme": "ws",
            "server": ("10.0.0.5", 8000),
            "headers": [(b"origin", origin.encode()), (b"host", b"vitalwire.ward.example")],
        }
        return Socket(scope, None, None)  # type: ignore[arg-type]

    public = "https://vitalwire.ward.example/"
    assert origin_allowed(socket("https://vitalwire.ward.example"), [], public)
    assert not origin_allowed(socket("http://vitalwire.ward.example"), [], public)
    assert not origin_allowed(socket("https://vitalwire.ward.example"), [])
    assert origin_allowed(socket("http://10.0.0.5:8000"), [])  # the address it was reached at
    assert not origin_allowed(socket("http://localhost:8000"), [])  # not bound to loopback


# -- 4. invalid UTF-8 -----------------------------------------------------------------------------


@pytest.mark.parametrize("authenticated", [False, True])
async def test_invalid_utf8_closes_1007_without_an_error_in_the_log(
    tmp_path: Path, authenticated: bool
) -> None:
    async with running(tmp_path) as srv:
        with captured("uvicorn", "uvicorn.error", "vitalwire") as records:
            raw = await Raw.open(srv)
            try:
                if authenticated:
                    await raw.hello(srv)
                raw.send(b'{"type":"ping","id":"\xff\xfe"}')
                assert await raw.close_code() == 1007
            finally:
                raw.close()
            await wait_until(lambda: not srv.services.ingest.sessions, 5, "the session ended")
        errors = [r for r in records if r.levelno >= logging.WARNING or r.exc_info]
        assert errors == [], [r.getMessage() for r in errors]


# -- 5. the HTTP edge: body cap, security headers -------------------------------------------------


async def _http(srv: RunningServer, head: str, body: bytes = b"") -> tuple[int, bytes, bytes]:
    """Send ``head`` and ``body`` raw, without finishing the body; the response (status, headers,
    body) and what follows it (b"" when the server closed the connection)."""
    port = int(srv.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(re.search(rb"content-length: (\d+)", response, re.I).group(1))  # type: ignore[union-attr]
        content = await asyncio.wait_for(reader.readexactly(length), 5)
        after = await asyncio.wait_for(reader.read(), 5)  # the server closes the connection
        return int(response.split()[1]), response, content + after
    finally:
        writer.transport.abort()


async def test_a_body_announced_past_the_cap_gets_413_at_once(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        head = (
            "POST /auth/login HTTP/1.1\nHost: x\nContent-Type: application/json\n"
            "Content-Length: 52428800\n"
        )
        status, headers, body = await _http(srv, head, b'{"username":')
        assert status == 413
        assert json.loads(body) == {
            "code": "frame_too_large",
            "message": "request body must be at most 65536 bytes",
            "field": "body",
        }
        assert b"connection: close" in headers.lower()
        assert b"x-content-type-options: nosniff" in headers.lower()


async def test_a_chunked_body_growing_past_the_cap_is_cut_with_413(tmp_path: Path) -> None:
    async with running(tmp_path, max_body_bytes=4096) as srv:
        head = (
            "POST /auth/login HTTP/1.1\nHost: x\nContent-Type: application/json\n"
            "Transfer-Encoding: chunked\n"
        )
        chunk = b"x" * 1000
        chunks = b"".join(b"3e8\r\n" + chunk + b"\r\n" for _ in range(6))  # 6,000 bytes, no end
        status, _, body = await _http(srv, head, chunks)
        assert status == 413
        assert json.loads(body)["message"] == "request body must be at most 4096 bytes"
        # a body under the cap is still served
        async with httpx.AsyncClient(base_url=srv.url) as http:
            r = await http.post("/auth/login", json={"username": "nobody", "password": "x" * 9})
        assert r.status_code == 401


async def test_every_http_response_carries_the_security_headers(tmp_path: Path) -> None:
    async with running(tmp_path) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        for path in ("/healthz", "/patients", "/nowhere", "/openapi.json", "/docs"):
            r = await http.get(path)
            assert r.headers["x-content-type-options"] == "nosniff", path
            assert r.headers["referrer-policy"] == "no-referrer", path
            assert r.headers["x-frame-options"] == "DENY", path
            assert "strict-transport-security" not in r.headers, path  # no TLS here
            csp = r.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in csp, path
            if path != "/docs":
                assert csp == "default-src 'none'; frame-ancestors 'none'", path
        docs = await http.get("/docs")
    # Swagger UI: its scripts from this server, its one inline script by hash, nothing else
    csp = dict(p.strip().split(" ", 1) for p in docs.headers["content-security-policy"].split(";"))
    (inline,) = re.findall(r"<script>(.*?)</script>", docs.text, flags=re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
    assert csp["script-src"] == f"'self' 'sha256-{digest}'"
    assert "unsafe-inline" not in csp["script-src"] and "unsafe-eval" not in csp["script-src"]
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'"
    assert docs.headers["content-security-policy"].count("content-security-policy") == 0
    assert len(docs.headers.get_list("content-security-policy")) == 1


async def test_with_tls_responses_carry_strict_transport_security() -> None:
    edge = HttpEdge(65_536, tls=True)
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/healthz", "headers": []}
    await edge(scope, None, send, app)  # type: ignore[arg-type]
    headers = dict(sent[0]["headers"])
    assert headers[b"strict-transport-security"] == b"max-age=31536000"
    assert headers[b"x-frame-options"] == b"DENY"


# -- 6. a client that pings and never reads -------------------------------------------------------


async def test_a_client_that_pings_but_never_reads_is_cut_within_the_documented_bound(
    tmp_path: Path,
) -> None:
    heartbeat = 1.0
    async with running(tmp_path, heartbeat_s=heartbeat) as srv:
        bearer = await token(srv)
        stalled = StalledClient(srv.ws_url + "/ws")
        start = time.monotonic()
        await stalled.connect()
        stalled.send({"type": "auth", "token": bearer})
        assert stalled.writer is not None
        # WebSocket pings, whose pongs (12 MB) would fill the server's buffers, the kernel's and
        # then the transport's, since this client never reads
        for _ in range(500):
            for _ in range(200):
                stalled.proto.send_ping(os.urandom(4) + b"p" * 121)
            stalled._flush()
            await stalled.writer.drain()

        async def json_pings() -> None:
            """Frames every 0.2 s: the 4004 silence rule never fires; only a cut ends it."""
            n = 0
            while True:
                n += 1
                stalled.send({"type": "ping", "id": n})
                await stalled.writer.drain()  # type: ignore[union-attr]
                await asyncio.sleep(0.2)

        pinger = asyncio.create_task(json_pings())
        try:
            await wait_until(lambda: len(srv.services.clients) == 1, 5, "the client")

            async def gone() -> None:
                async with httpx.AsyncClient(base_url=srv.url) as http:
                    while (await http.get("/metrics.json")).json()["client_connections"]:
                        await asyncio.sleep(0.05)

            # the first WebSocket ping goes out after one interval; unanswered for 4 more: cut
            bound = 5 * heartbeat + 1.5
            await asyncio.wait_for(gone(), bound - (time.monotonic() - start))
            # and the connection itself is gone (aborted), not waiting on a buffer to drain
            await wait_until(lambda: not _ws_protocols(srv), 2, "the transport aborted")
        finally:
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)
            stalled.abort()


def _ws_protocols(srv: RunningServer) -> list[Any]:
    return [p for p in srv.server.server_state.connections if isinstance(p, LeanWebSocketProtocol)]


# -- 7. the bus history's byte bound --------------------------------------------------------------


def _event(stream: str, offset: int) -> Event:
    """An event whose cost does not depend on its offset."""
    return Event.new(stream, offset, "reading", 1767225600.0 + offset, {"hr": 70})


def _held(history: History, stream: str) -> list[int]:
    return [e.offset for e in history.ring(stream) or ()]


def test_the_history_byte_bound_evicts_the_oldest_events_across_streams() -> None:
    cost = event_cost(_event("patient:A", 1))
    history = History(size=4, max_bytes=cost * 5)
    for offset in range(1, 4):
        history.add(_event("patient:A", offset))
        history.add(_event("patient:B", offset))
    # six added, five fit: the oldest of all (A 1) went first
    assert (_held(history, "patient:A"), _held(history, "patient:B")) == ([2, 3], [1, 2, 3])
    assert history.bytes == cost * 5 and len(history) == 5
    assert history.after("patient:A", 0) is None  # does not reach back: replay reads the store
    assert [e.offset for e in history.after("patient:A", 1) or ()] == [2, 3]
    history.add(_event("patient:C", 1))  # next oldest: B 1
    assert (_held(history, "patient:A"), _held(history, "patient:B")) == ([2, 3], [2, 3])


def test_the_per_stream_bound_and_the_byte_bound_agree_on_what_is_oldest() -> None:
    cost = event_cost(_event("patient:A", 1))
    history = History(size=2, max_bytes=cost * 4)
    for offset in range(1, 4):  # A 1 goes by the per-stream bound
        history.add(_event("patient:A", offset))
    for offset in range(1, 4):  # B 1 too
        history.add(_event("patient:B", offset))
    assert (_held(history, "patient:A"), _held(history, "patient:B")) == ([2, 3], [2, 3])
    history.add(_event("patient:C", 1))  # past the bytes: the oldest held is A 2, not A 3
    assert [_held(history, f"patient:{s}") for s in "ABC"] == [[3], [2, 3], [1]]
    assert history.bytes == cost * 4


def test_the_history_order_is_compacted_when_the_stream_bound_does_the_evicting() -> None:
    history = History(size=2, max_bytes=10**9)
    for offset in range(1, 5001):
        history.add(_event("patient:A", offset))
    assert len(history) == 2
    assert len(history._order) < 2100  # stale entries do not pile up


async def test_memory_bus_history_is_bounded_in_bytes() -> None:
    cost = event_cost(_event("patient:A", 1))
    bus = MemoryBus(history_size=1000, history_bytes=cost * 10)
    await bus.open(lambda events: None)
    await bus.publish([_event(f"patient:{i % 4}", i // 4 + 1) for i in range(40)])
    assert len(bus.recent) == 10 and bus.recent.bytes == cost * 10
    assert await bus.history("patient:0", 0) is None
    assert [e.offset for e in await bus.history("patient:3", 7) or ()] == [8, 9, 10]


async def test_replay_is_complete_from_the_store_when_the_byte_bound_evicted_it(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as srv:
        recent = srv.services.bus.recent  # type: ignore[attr-defined]
        recent.max_bytes = event_cost(_event("patient:P001", 1)) * 20  # a small bound for the test
        streams = []
        for i in range(3):
            did, secret, pid = srv.device(i)
            streams.append(f"patient:{pid}")
            async with DeviceClient(srv.url, did, secret) as dev:
                for _ in range(30):
                    dev.send(hr=70 + i)
                await dev.flush()
        await srv.services.writer.flush()
        assert recent.bytes <= recent.max_bytes
        first = streams[0]
        assert await srv.services.bus.history(first, 0) is None  # evicted from memory
        got = await _replay(srv, first)
        assert got == list(range(1, len(got) + 1)) and len(got) >= 30


async def _replay(srv: RunningServer, stream: str) -> list[int]:
    """Offsets a client gets subscribing to ``stream`` from the start."""
    raw = await Raw.open(srv, "/ws")
    try:
        raw.send(json.dumps({"type": "auth", "token": await token(srv), "id": 1}))
        assert (await raw.text())["type"] == "result"
        raw.send(json.dumps({"type": "subscribe", "streams": [stream], "since": {stream: 0}}))
        reply = await raw.text()
        while reply["type"] != "subscribed":
            reply = await raw.text()
        (entry,) = reply["streams"]
        assert entry["recovered"] and entry["replayed"] == entry["offset"]
        offsets: list[int] = []
        while len(offsets) < entry["replayed"]:
            msg = await raw.text()
            if msg["type"] == "event" and msg["stream"] == stream:
                offsets.append(msg["offset"])
        return offsets
    finally:
        raw.close()
