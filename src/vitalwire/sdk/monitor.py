"""The monitor client: log in, subscribe to patient streams, iterate events; resume by offset.

It remembers the last offset of every stream it has seen. When the connection drops (network,
server restart, slow-consumer close) it reconnects, authenticates again and subscribes with
``since`` = those offsets, so the caller's iteration continues with no gap and no duplicate.

Access can be taken back. A stream the server ends (``unsubscribed``: break-glass expired, taken
off the care team) is dropped, never resumed, and reported (:attr:`MonitorClient.ended`,
:attr:`MonitorClient.on_unsubscribed`); so is one that became forbidden while disconnected (the
resume then asks for the others only). A session the server closes with 4001 (the user was
disabled or deleted, or their tokens revoked) is not reconnected: :class:`AccessRevoked` says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl as ssl_module
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import websockets
from websockets.asyncio.client import ClientConnection, connect

from vitalwire import wire
from vitalwire.sdk import tls
from vitalwire.sdk.errors import ConnectFailed, LoginRefused, RequestError, connect_reason

log = logging.getLogger("vitalwire.sdk.monitor")


#: Kind of the synthetic event MonitorClient yields when an automatic resume could not replay
#: what was missed (``recovered: false``): ``data["snapshot"]`` is the picture to reload from.
RESET = "reset"


@dataclass(frozen=True, slots=True)
class StreamEvent:
    stream: str
    offset: int
    kind: str
    ts: float
    data: dict[str, Any]


class AccessRevoked(PermissionError):
    """The server ended the session because the user may no longer use it (close 4001)."""


def _base(url: str) -> str:
    return url.rstrip("/").removesuffix("/ws")


async def login(
    url: str, username: str, password: str, ssl: ssl_module.SSLContext | None = None
) -> str:
    """``POST /auth/login``; return the access token.

    Without ``ssl``, an ``https`` URL is verified with :func:`vitalwire.sdk.tls.client_context`.

    Raises:
        ConnectFailed: the server cannot be reached, or its TLS certificate is not trusted.
        LoginRefused: wrong username or password (or another refusal, named).
    """
    http = _base(url).replace("ws://", "http://").replace("wss://", "https://")
    verify = ssl if ssl is not None else tls.client_context()
    try:
        async with httpx.AsyncClient(base_url=http, timeout=10, verify=verify) as client:
            r = await client.post("/auth/login", json={"username": username, "password": password})
    except httpx.TransportError as exc:
        raise ConnectFailed(http, connect_reason(exc)) from exc
    if r.status_code != 200:
        try:
            why = str(r.json().get("message") or r.reason_phrase)
        except ValueError:
            why = r.reason_phrase
        raise LoginRefused(f"login refused for user {username!r} at {http}: {why}")
    token: str = r.json()["access_token"]
    return token


class MonitorClient:
    """A clinician-side client. ``url`` is the server's base URL (http:// or ws://)."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        reconnect: bool = True,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 5.0,
        ssl: ssl_module.SSLContext | None = None,
        batch: bool = True,
    ) -> None:
        bases = [_base(u) for u in ([url] if isinstance(url, str) else url)]
        if not bases:
            raise ValueError("url: give at least one address")
        #: Ask the server to send queued events several to a frame (cheaper on both sides).
        self.batch = batch
        #: Every address of the service (several nodes): a connection that fails or ends is
        #: followed by one to the next, which resumes each stream from its offset.
        self.ws_urls = [
            b.replace("http://", "ws://").replace("https://", "wss://") + "/ws" for b in bases
        ]
        self.http_url = bases[0].replace("ws://", "http://").replace("wss://", "https://")
        self.ws_url = self.ws_urls[0]
        #: TLS context for https/wss: certificates are always verified, by default against
        #: :func:`vitalwire.sdk.tls.client_context` (system store, SSL_CERT_FILE, --cacert)
        self.ssl = ssl
        if ssl is None and self.ws_url.startswith("wss://"):
            self.ssl = tls.client_context()
        #: Why the last connection attempt failed (``None`` after a success).
        self.last_error: str | None = None
        self._failure: BaseException | None = None
        self.token = token
        self.username = username
        self.password = password
        self.reconnect = reconnect
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.offsets: dict[str, int] = {}
        self.starts: dict[str, wire.StreamStart] = {}
        self.reconnects = 0
        self.close_codes: list[int | None] = []
        self._streams: list[str] = []
        self._ws: ClientConnection | None = None
        self._events: asyncio.Queue[StreamEvent | BaseException] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._closing = False
        #: True while a session is open; False from the moment it drops until a reconnect.
        self.connected = False
        #: Called with True on every (re)connection and False as soon as one drops.
        self.on_connection: Callable[[bool], None] | None = None
        #: Streams the server ended (or refused to resume) because access to them ended, with
        #: why; they are never asked for again unless subscribed to anew.
        self.ended: dict[str, str] = {}
        #: Called with the streams and the reason each time the server ends some.
        self.on_unsubscribed: Callable[[list[str], str], None] | None = None
        self._resuming: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MonitorClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, timeout: float = 10.0) -> None:
        """Log in (unless given a token), open the WebSocket and authenticate.

        Raises:
            ConnectFailed: the server cannot be reached, or its TLS certificate is not trusted
                (at once; an unreachable server only after ``timeout`` when ``reconnect``).
            PermissionError: wrong credentials (:class:`LoginRefused`) or a refused token.
            TimeoutError: no session within ``timeout`` and no error to name.
        """
        if self.token is None:
            if self.username is None or self.password is None:
                raise ValueError("MonitorClient needs a token or a username and password")
            self.token = await login(self.http_url, self.username, self.password, self.ssl)
        task = self._task = asyncio.create_task(self._run())
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            await asyncio.wait({ready, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self._ready.is_set():
            return
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if self._failure is not None:
            raise self._failure
        if self.last_error is not None:
            raise ConnectFailed(self.ws_url, self.last_error)
        raise TimeoutError(f"no session with {self.ws_url} within {timeout} s")

    async def close(self) -> None:
        self._closing = True
        if self._resuming is not None:
            self._resuming.cancel()
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    async def drop_connection(self) -> None:
        """Abort the connection (tests); it reconnects and resumes."""
        if self._ws is not None:
            self._ws.transport.abort()

    async def subscribe(
        self, streams: list[str], since: dict[str, int] | None = None, timeout: float = 10.0
    ) -> dict[str, wire.StreamStart]:
        """Subscribe; return where each stream starts (snapshot, offset, recovered)."""
        for s in streams:
            self.ended.pop(s, None)
            if s not in self._streams:
                self._streams.append(s)
        reply = await self.request(
            wire.Subscribe(streams=streams, since=since, batch=self.batch), timeout
        )
        if isinstance(reply, wire.Error):
            raise RequestError(reply.code, reply.message, reply.field)
        assert isinstance(reply, wire.Subscribed)
        return self._started(reply)

    async def unsubscribe(self, streams: list[str], timeout: float = 10.0) -> None:
        """Stop following ``streams``: a resume no longer asks for them, and the server (when
        connected) stops sending them. Events of theirs already received may still be yielded."""
        for s in streams:
            if s in self._streams:
                self._streams.remove(s)
            self.offsets.pop(s, None)
            self.starts.pop(s, None)
        if self._ws is not None:
            reply = await self.request(wire.Unsubscribe(streams=streams), timeout)
            if isinstance(reply, wire.Error):
                raise ValueError(f"{reply.code}: {reply.message}")

    def _started(self, reply: wire.Subscribed) -> dict[str, wire.StreamStart]:
        out = {}
        for start in reply.streams:
            out[start.stream] = start
            self.starts[start.stream] = start
            if not start.recovered or start.stream not in self.offsets:
                # the snapshot stands for everything up to start.offset; replayed events follow
                self.offsets[start.stream] = start.offset - start.replayed
        return out

    async def request(self, msg: Any, timeout: float = 10.0) -> Any:
        """Send a request with a fresh id and wait for the reply that echoes it."""
        if self._ws is None:
            await asyncio.wait_for(self._ready.wait(), timeout)
        self._next_id += 1
        msg.id = self._next_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg.id] = fut
        assert self._ws is not None
        await self._ws.send(wire.encode_text(msg))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(msg.id, None)

    async def events(self) -> AsyncIterator[StreamEvent]:
        """Every event, in offset order per stream, across reconnects."""
        while True:
            item = await self._events.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    async def next_event(self, timeout: float = 10.0) -> StreamEvent:
        item = await asyncio.wait_for(self._events.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    # -- connection loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self.backoff_initial_s
        first = True
        while not self._closing:
            try:
                tls = self.ssl if self.ws_url.startswith("wss://") else None
                async with connect(self.ws_url, proxy=None, max_size=2**24, ssl=tls) as ws:
                    await ws.send(wire.encode_text(wire.Auth(token=self.token or "", id=0)))
                    reply = wire.decode_from_server_to_client(await ws.recv())
                    if isinstance(reply, wire.Error):
                        raise PermissionError(f"{self.ws_url} refused the token: {reply.message}")
                    self._ws = ws
                    self.last_error = None
                    if self._streams:  # resume where we were
                        since = {s: self.offsets[s] for s in self._streams if s in self.offsets}
                        resume = wire.Subscribe(self._streams, since or None, self.batch, id=-1)
                        await ws.send(wire.encode_text(resume))
                    if not first:
                        self.reconnects += 1
                    first = False
                    self._ready.set()
                    self._connection(True)
                    delay = self.backoff_initial_s
                    await self._receive(ws)
                    if ws.close_code == wire.Close.UNAUTHENTICATED:  # revoked: do not come back
                        why = ws.close_reason or "credential refused"
                        raise AccessRevoked(f"{self.ws_url} ended the session: {why}")
            except asyncio.CancelledError:
                raise
            except PermissionError as exc:
                self._failure = exc
                self._events.put_nowait(exc)
                return
            except Exception as exc:
                log.debug("monitor connection ended: %r", exc)
                if self._ws is None:  # the attempt failed before a session opened
                    self.last_error = connect_reason(exc)
                    fatal = isinstance(exc, ssl_module.SSLCertVerificationError)
                    if first and (fatal or not self.reconnect):
                        self._failure = ConnectFailed(self.ws_url, self.last_error)
                        self._events.put_nowait(self._failure)
                        return
            finally:
                self._ws = None
                self._ready.clear()
                self._connection(False)
            if self._closing or not self.reconnect:
                self._events.put_nowait(ConnectionError("connection closed"))
                return
            if len(self.ws_urls) > 1:  # the next address: this one failed or its node went away
                self.ws_url = self.ws_urls[
                    (self.ws_urls.index(self.ws_url) + 1) % len(self.ws_urls)
                ]
                if self.ws_url != self.ws_urls[0]:
                    await asyncio.sleep(self.backoff_initial_s * random.random())
                    continue
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.backoff_max_s)

    def _connection(self, up: bool) -> None:
        if up != self.connected:
            self.connected = up
            if self.on_connection is not None:
                self.on_connection(up)

    def _end(self, streams: list[str], reason: str) -> None:
        """The server ended these streams: forget them (a resume no longer asks) and say so."""
        for s in streams:
            if s in self._streams:
                self._streams.remove(s)
            self.offsets.pop(s, None)
            self.starts.pop(s, None)
            self.ended[s] = reason
        if self.on_unsubscribed is not None:
            self.on_unsubscribed(list(streams), reason)

    async def _resume_allowed(self, ws: ClientConnection, refusal: wire.Error) -> None:
        """The resume was refused (a stream became forbidden, or its patient went away, while
        disconnected: a subscribe is all or nothing). Ask the server which patients this user
        may watch now, report the streams of the others, and resume the rest."""
        try:
            watchable = await self._watchable()
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            self.last_error = f"resume refused ({refusal.message}); patient list failed: {exc!r}"
            log.warning("monitor: %s", self.last_error)
            return
        gone = [s for s in self._streams if s != "alerts" and s not in watchable]
        if not gone:  # refused for another reason: nothing to drop, do not loop
            self.last_error = f"resume refused: {refusal.code}: {refusal.message}"
            log.warning("monitor: %s", self.last_error)
            return
        self._end(gone, f"no longer allowed (resume refused: {refusal.code})")
        if self._streams:
            since = {s: self.offsets[s] for s in self._streams if s in self.offsets}
            resume = wire.Subscribe(self._streams, since or None, self.batch, id=-1)
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(wire.encode_text(resume))

    async def _watchable(self) -> set[str]:
        """``GET /patients``: the patient streams this user may watch now."""
        verify: Any = True
        if self.http_url.startswith("https://"):
            verify = self.ssl if self.ssl is not None else tls.client_context()
        headers = {"Authorization": f"Bearer {self.token}"}
        async with httpx.AsyncClient(base_url=self.http_url, timeout=10, verify=verify) as http:
            r = await http.get("/patients", headers=headers)
        r.raise_for_status()
        return {f"patient:{p['id']}" for p in r.json()}

    def _event(self, msg: wire.EventFrame) -> None:
        last = self.offsets.get(msg.stream, 0)
        if msg.offset <= last:
            return  # already delivered to the caller before a reconnect
        self.offsets[msg.stream] = msg.offset
        data = msgspec.json.decode(msg.data)
        self._events.put_nowait(StreamEvent(msg.stream, msg.offset, msg.kind, msg.ts, data))

    async def _receive(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                msg = wire.decode_from_server_to_client(raw)
                if isinstance(msg, wire.EventFrame):
                    self._event(msg)
                elif isinstance(msg, wire.Events):
                    for item in msg.items:
                        self._event(item)
                elif isinstance(msg, wire.Ping):
                    await ws.send(wire.encode_text(wire.Pong(id=msg.id, ts=msg.ts)))
                elif isinstance(msg, wire.Unsubscribed):
                    self._end(msg.streams, msg.reason)
                elif isinstance(msg, wire.Error) and msg.id == -1:  # the resume was refused
                    self._resuming = asyncio.create_task(self._resume_allowed(ws, msg))
                elif isinstance(msg, wire.Subscribed) and msg.id == -1:
                    for start in msg.streams:
                        if not start.recovered:  # the gap cannot be replayed: say so
                            self._events.put_nowait(
                                StreamEvent(
                                    start.stream,
                                    start.offset,
                                    RESET,
                                    0.0,
                                    {"snapshot": start.snapshot, "recovered": False},
                                )
                            )
                    self._started(msg)
                else:
                    req_id = getattr(msg, "id", None)
                    fut = self._pending.get(req_id) if req_id is not None else None
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_codes.append(ws.close_code)
