"""Small pieces both WebSocket transports share.

Cost per connection matters here (a hospital keeps 10,000 devices and 1,000 clients connected,
nearly all idle at any instant), so the transports run on the server's raw ASGI callables
(:class:`Socket`, dispatched before the FastAPI middleware by ``app.VitalwireApp``), send from a
task that exists only while frames wait (:class:`Sender`), and ping and watch for silence from a
timer instead of a task (:class:`Heartbeat`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import ipaddress
import math
import socket
import struct
import weakref
from collections.abc import Callable
from typing import Protocol

from starlette.types import Message, Receive, Scope, Send

from vitalwire.core.errors import FrameTooLarge


class Disconnected(Exception):
    """The peer is gone (a close or disconnect arrived, or a send failed)."""


class Socket:
    """One WebSocket connection over the server's raw ASGI ``receive`` and ``send``.

    What the transports need of starlette's ``WebSocket`` and nothing more: a frame goes straight
    to the server's ``send``, with no middleware wrapper and no state machine per message.
    """

    __slots__ = ("scope", "_receive", "_send", "_send_now", "closed", "gone")

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        # the lean protocol (transports/wsserver.py) can write frames without a coroutine
        self._send_now: Callable[[list[str]], bool] | None = getattr(
            getattr(send, "__self__", None), "send_now", None
        )
        #: A close was sent, or sending failed: nothing more goes out.
        self.closed = False
        #: A disconnect was received: nothing more comes in.
        self.gone = False

    def header(self, name: bytes) -> str | None:
        """The first value of a request header (``name`` in lower case), or None."""
        for key, value in self.scope["headers"]:
            if key == name:
                return str(value.decode("latin-1"))
        return None

    @property
    def peer(self) -> str | None:
        """``host:port`` of the peer, when the server knows it."""
        client = self.scope.get("client")
        return None if client is None else f"{client[0]}:{client[1]}"

    async def accept(self) -> None:
        message = await self._receive()
        if message["type"] != "websocket.connect":
            raise RuntimeError(f"expected websocket.connect, got {message['type']!r}")
        await self._send({"type": "websocket.accept"})

    async def receive_frame(self, max_bytes: int) -> str | bytes:
        """The next text or binary frame. Raises Disconnected, or FrameTooLarge past
        ``max_bytes``."""
        if self.gone:
            raise Disconnected(1006)
        message: Message = await self._receive()
        if message["type"] == "websocket.disconnect":
            self.gone = True
            raise Disconnected(message.get("code"))
        data: str | bytes | None = message.get("text")
        if data is None:
            data = message.get("bytes") or b""
        check_size(data, max_bytes)
        return data

    def on_frames(self, take: Callable[[str | bytes], bool] | None) -> bool:
        """Have the server hand each incoming text or binary frame to ``take`` as it arrives,
        without a coroutine waiting for it (the lean protocol's ``on_frame``, transports/
        wsserver.py); ``take`` returns False to leave a frame to :meth:`receive_frame` instead.
        False when the server cannot (every frame then comes through :meth:`receive_frame`).
        ``None`` stops it; a handler must do that when it ends (the protocol would keep it).
        """
        protocol = getattr(self._send, "__self__", None)
        if protocol is None or not hasattr(protocol, "on_frame"):
            return False
        protocol.on_frame = take
        return True

    async def send_all(self, frames: list[str]) -> None:
        """Send text frames in order (the hot path: one ``send`` call per frame, nothing else);
        Disconnected when they cannot go out."""
        send = self._send
        try:
            for text in frames:
                if self.closed:
                    raise Disconnected("close already sent")
                await send({"type": "websocket.send", "text": text})
        except (OSError, RuntimeError) as exc:  # uvicorn: ClientDisconnected (an OSError)
            self.closed = True
            raise Disconnected(str(exc)) from exc

    def send_now(self, frames: list[str]) -> bool:
        """Write text frames at once, without awaiting, if the server allows it and nothing
        stands in the way (a paused transport, a close); False when nothing was written and
        :meth:`send_all` must be used."""
        if self.closed or self._send_now is None:
            return False
        return self._send_now(frames)

    async def close(self, code: int, reason: str = "") -> None:
        """Send a close frame (before ``accept``, the handshake is refused with HTTP 403)."""
        if self.closed:
            return
        self.closed = True
        await self._send({"type": "websocket.close", "code": code, "reason": reason})
        # the lean protocol cuts a peer that never answers it (transports/wsserver.py)
        after = getattr(getattr(self._send, "__self__", None), "cut_unanswered_close", None)
        if after is not None:
            after()

    def abort(self) -> bool:
        """Drop the TCP connection (:func:`cut`); False when the server does not expose its
        transport.

        uvicorn's ``send`` is a method of its protocol, which holds the transport.
        """
        transport = getattr(getattr(self._send, "__self__", None), "transport", None)
        if transport is None or not hasattr(transport, "abort"):
            return False
        cut(transport)
        return True

    def authenticated(self) -> None:
        """The peer proved who it is: lift the pre-authentication bounds (transports/wsserver.py)
        from this connection. Each endpoint calls it once, right after authentication."""
        lift = getattr(getattr(self._send, "__self__", None), "authenticated", None)
        if lift is not None:
            lift()

    def close_answered(self, code: int) -> bool:
        """Whether the peer answered our close frame with ``code``: a live peer echoes it (RFC
        6455 5.5.1); a dead connection (its device already back over another after a network
        blip or a reset) never does. uvicorn's protocol holds the websockets state machine."""
        protocol = getattr(self._send, "__self__", None)
        received = getattr(getattr(protocol, "conn", None), "close_rcvd", None)
        return received is not None and getattr(received, "code", None) == code


#: SO_LINGER on, with a timeout of 0: ``close`` resets the connection and discards what the
#: kernel still holds to send.
_LINGER_RESET = struct.pack("ii", 1, 0)


def cut(transport: asyncio.BaseTransport) -> None:
    """Drop a connection now, freeing what waits to be sent: the transport's buffer and the
    kernel's (a plain close of a socket whose peer does not read keeps its send buffer, megabytes,
    until TCP gives up)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()  # type: ignore[attr-defined]


def check_size(data: str | bytes, max_bytes: int) -> None:
    """FrameTooLarge when ``data`` is past ``max_bytes`` (UTF-8 bytes for text)."""
    size = (
        len(data) if isinstance(data, bytes) or len(data) * 4 <= max_bytes else len(data.encode())
    )
    if size > max_bytes:
        raise FrameTooLarge(f"frame must be at most {max_bytes} bytes, got {size}", field="frame")


async def close_quietly(ws: Socket, code: int, reason: str = "", timeout: float = 2.0) -> None:
    """Send a close frame; if the peer does not take it within ``timeout``, drop the connection.

    A peer that stopped reading leaves the server's socket unwritable, and ASGI cannot send the
    close frame past a full buffer; aborting the transport is then the only way to free it.
    """
    if ws.closed:
        return
    try:
        async with asyncio.timeout(timeout):
            await ws.close(code, reason[:120])
    except Exception:
        ws.abort()


def origin_allowed(ws: Socket, allowed: list[str], public_url: str | None = None) -> bool:
    """Browsers send Origin: allow the server's own origins (:func:`own_origins`), the origin of
    ``public_url`` and the ``allowed`` list, compared scheme, host and port. Never the Host
    header: a DNS-rebinding page (its name now resolving to this server) sends its own. A
    request without Origin is not from a browser (devices, SDK, CLI) and is allowed."""
    origin = ws.header(b"origin")
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if origin in own_origins(ws.scope):
        return True
    return any(origin == a.strip().rstrip("/").lower() for a in (*allowed, public_url or ""))


_DEFAULT_PORTS = {"http": 80, "https": 443}


def own_origins(scope: Scope) -> set[str]:
    """The origins a browser shows for this server: the scheme it serves (https with TLS), the
    address and port the connection arrived at, and, on a loopback address, ``localhost``,
    ``127.0.0.1`` and ``[::1]`` with that port (what ``vitalwire demo`` prints works)."""
    server = scope.get("server")
    if not server or server[1] is None:
        return set()
    scheme = "https" if scope.get("scheme") in ("wss", "https") else "http"
    host, port = str(server[0]), int(server[1])
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    hosts = {"localhost", "127.0.0.1", "[::1]"} if loopback else set()
    hosts.add(f"[{host}]" if ":" in host else host)
    suffix = "" if _DEFAULT_PORTS[scheme] == port else f":{port}"
    return {f"{scheme}://{h.lower()}{suffix}" for h in hosts}


class Sender:
    """Sends the frames a source hands over, in order, with no task while the socket takes them.

    The source calls :meth:`kick` (synchronously, never awaiting) when it has queued frames.
    Frames queued during one turn of the event loop go out together at its end (one
    ``call_soon`` per connection and turn, so a client's events still join into one frame): then
    ``take`` hands them all over at once (an empty list when there are none) and they are
    written straight to the transport. Only when the transport cannot take them (paused by a
    full buffer, or a server without :meth:`Socket.send_now`) does a task send them, awaiting
    room; it ends when nothing is left. An idle connection holds no task and no callback.
    """

    __slots__ = ("_ws", "_take", "_task", "_scheduled", "stopped", "_loop")

    def __init__(self, ws: Socket, take: Callable[[], list[str]]) -> None:
        # made on the loop; kept, since each ``get_running_loop()`` costs a getpid() system call
        self._loop = asyncio.get_running_loop()
        self._ws = ws
        self._take = take
        self._task: asyncio.Task[None] | None = None
        self._scheduled = False
        #: Sending failed or was stopped: nothing more is sent.
        self.stopped = False

    def kick(self) -> None:
        if self._scheduled or self._task is not None or self.stopped:
            return
        self._scheduled = True
        self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._task is not None or self.stopped:
            return
        frames = self._take()
        if frames and not self._ws.send_now(frames):
            self._task = self._loop.create_task(self._run(frames))

    async def _run(self, frames: list[str]) -> None:
        try:
            while frames:
                await self._ws.send_all(frames)
                frames = self._take()
        except Disconnected:
            self.stopped = True
        finally:
            self._task = None

    def stop(self) -> None:
        """Stop sending now (what is queued stays unsent)."""
        self.stopped = True
        if self._task is not None:
            self._task.cancel()

    async def sent(self, timeout: float, cancel: bool = True) -> None:
        """Wait up to ``timeout`` for what is queued to go out; then, with ``cancel``, stop."""
        if self._scheduled:
            self._flush()  # queued this turn: out now (or handed to the task)
        task = self._task
        done = task is None
        if task is not None and timeout > 0:
            done = bool((await asyncio.wait((task,), timeout=timeout))[0])
        if cancel:
            self.stop()
            if task is not None and not done:
                await asyncio.wait((task,))


class Due(Protocol):
    def due(self) -> None: ...


#: The :class:`Ticker`'s step: a timer filed with it fires at most this much late, never early.
TICK_S = 0.01


class Ticker:
    """The timers of every connection on one event-loop timer.

    A connection's timer (its heartbeat, its WebSocket keepalive) is an entry filed under its
    due time rounded up to :data:`TICK_S`; filing and withdrawing one makes no object (a set
    entry), where each ``loop.call_at`` makes a timer handle, a libuv timer, a context copy and a
    bound method. With 10,000 devices those were a third of what the collector's young
    generation held at each collection, and the collections' pauses were the latency's tail.
    One loop timer stands for the earliest slot; the slots due are run when it fires.
    """

    __slots__ = ("_loop", "_slots", "_keys", "_armed", "_handle", "_running", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._slots: dict[int, set[Due]] = {}
        self._keys: list[int] = []  # a heap of the slots' keys
        self._armed: int | None = None  # the slot the loop timer stands for
        self._handle: asyncio.TimerHandle | None = None
        self._running: set[Due] | None = None  # the slot being run

    def add(self, entry: Due, when: float) -> int:
        """Call ``entry.due()`` at loop time ``when`` (at most :data:`TICK_S` later); returns
        the key :meth:`discard` takes."""
        key = math.ceil(when / TICK_S)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = set()
            heapq.heappush(self._keys, key)
            if self._armed is None or key < self._armed:
                self._arm(key)
        slot.add(entry)
        return key

    def discard(self, entry: Due, key: int) -> None:
        """Withdraw ``entry`` filed under ``key`` (nothing if it is not there)."""
        slot = self._slots.get(key)
        if slot is not None:
            slot.discard(entry)
        elif self._running is not None:
            self._running.discard(entry)

    def __len__(self) -> int:
        return sum(len(slot) for slot in self._slots.values())

    def _arm(self, key: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed = key
        self._handle = self._loop.call_at(key * TICK_S, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed = None
        keys = self._keys
        slots = self._slots
        limit = self._loop.time() + 0.001  # the loop may run a timer a hair early
        while keys and keys[0] * TICK_S <= limit:
            slot = slots.pop(heapq.heappop(keys), None)
            if not slot:
                continue
            self._running = slot  # an entry run here may withdraw another of this slot
            while slot:
                slot.pop().due()  # it may file itself again, later
        self._running = None
        if keys and (self._armed is None or keys[0] < self._armed):
            self._arm(keys[0])


_tickers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Ticker] = weakref.WeakKeyDictionary()


def ticker(loop: asyncio.AbstractEventLoop) -> Ticker:
    """The loop's :class:`Ticker` (one per loop, made on first use)."""
    t = _tickers.get(loop)
    if t is None:
        t = _tickers[loop] = Ticker(loop)
    return t


class Heartbeat:
    """One :class:`Ticker` entry per connection (no task, no timer handle): ``ping()`` every
    ``interval`` seconds, and
    ``expire()`` once when nothing came from the peer for ``silence`` seconds of waiting.

    The handler calls :meth:`waiting` before each read and :meth:`busy` once a frame is in: the
    silence clock runs only while the handler waits for the peer (a request being served, a
    device held back by backpressure, do not count).
    """

    __slots__ = (
        "_interval",
        "_silence",
        "_ping",
        "_expire",
        "_next_ping",
        "_since",
        "_key",
        "_loop",
        "_ticker",
    )

    def __init__(
        self,
        interval: float,
        silence: float,
        ping: Callable[[], object],
        expire: Callable[[], object],
    ) -> None:
        if silence < interval:
            raise ValueError("silence must be at least one interval")
        loop = self._loop = asyncio.get_running_loop()
        self._interval = interval
        self._silence = silence
        self._ping = ping
        self._expire = expire
        self._next_ping = loop.time() + interval
        self._since: float | None = None
        self._ticker = ticker(loop)
        self._key: int | None = self._ticker.add(self, self._next_ping)

    def waiting(self) -> None:
        self._since = self._loop.time()

    def busy(self) -> None:
        self._since = None

    def due(self) -> None:
        now = self._loop.time()
        if now >= self._next_ping - 0.001:
            self._next_ping = now + self._interval
            self._ping()
        since = self._since
        if since is not None and now >= since + self._silence - 0.001:
            self._key = None
            self._expire()
            return
        when = self._next_ping if since is None else min(self._next_ping, since + self._silence)
        self._key = self._ticker.add(self, when)

    def cancel(self) -> None:
        if self._key is not None:
            self._ticker.discard(self, self._key)
            self._key = None


class Outbox:
    """A bounded queue of frames for a device connection, sent by a :class:`Sender`."""

    __slots__ = ("limit", "_frames", "sender", "closed", "overflowed", "on_overflow")

    def __init__(self, ws: Socket, limit: int = 1000) -> None:
        self.limit = limit
        self._frames: list[str] = []
        self.sender = Sender(ws, self._take)
        self.closed = False
        self.overflowed = False
        self.on_overflow: Callable[[], None] | None = None

    def put(self, frame: str) -> None:
        if self.closed:
            return
        if len(self._frames) >= self.limit:
            self.overflowed = True
            self._frames.clear()
            self.close()
            if self.on_overflow is not None:
                self.on_overflow()
            return
        self._frames.append(frame)
        self.sender.kick()

    def _take(self) -> list[str]:
        # a copy goes out and the queue's own list stays: a new list per ack would be one more
        # object per device and second for the collector's young generation to scan
        frames = self._frames
        out = frames.copy()
        frames.clear()
        return out

    def close(self) -> None:
        """Take no more frames; what is queued still goes out."""
        self.closed = True
