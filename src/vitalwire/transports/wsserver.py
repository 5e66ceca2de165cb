"""uvicorn's WebSocket protocol (websockets sans-I/O), with less memory held per connection.

uvicorn's ``WebSocketsSansIOProtocol`` is what ``make_server`` runs. Per connection it holds an
``asyncio.Queue`` of incoming messages (four deques, about 3 KB, for what is at most a message or
two: uvicorn stops reading until the app took the last one), an ``asyncio.Event`` for write
readiness (a deque), the handshake response, and the handshake request's headers (the
websockets parser keeps the request for the life of the connection), in an instance dict too big
for key sharing. :class:`LeanWebSocketProtocol` changes none of its behaviour, only those:

- the queue and the event are replaced by :class:`Inbox` and :class:`Gate`, which do the same for
  the calls the protocol makes (``put_nowait``/``get``/``empty``; ``set``/``clear``/``wait``);
- the handshake response is dropped once sent, and the request's headers once the ASGI scope has
  its own copy;
- the protocol's attributes live in slots.

It adds three fast paths, for the frames nearly all traffic is made of:

- :meth:`LeanWebSocketProtocol.send_now`: text frames written to the transport at once, for a
  caller that is not awaiting (``common.Sender``), when nothing stands in the way;
- :meth:`LeanWebSocketProtocol.data_received`: complete, final, masked text, binary, ping and pong
  frames from the client are read here (RFC 6455 5.2) and handed on exactly as uvicorn does.
  At the first frame that is anything else (a close, a fragment, reserved bits, a frame past
  the size limit, a missing mask) the rest of the stream goes to websockets'
  parser, which is still at a frame boundary then, for the rest of the connection: every error
  and close is websockets' and uvicorn's own.
- :attr:`LeanWebSocketProtocol.on_frame`: an app may hand the protocol a function that takes a
  message's text or bytes at once, inside ``data_received``, instead of the message going
  through the queue to a coroutine awaiting ``receive`` (a coroutine chain, a future and a dict
  per message). It returns False to decline one (the message is then queued as usual, and
  reading pauses until the app received it); while anything is queued, nothing is offered to it,
  so the order holds. A connection waiting for its next frame then holds nothing made per frame
  (10,000 idle device connections made the collector's young-generation pauses 60–90 ms).

About 7 KB less per connection (measured with 2,200 idle connections; architecture.md).
:func:`protocol_class` falls back to uvicorn's own class if uvicorn no longer looks as expected.

It also holds the edge that must act before the app sees anything (docs/security.md):

- pre-authentication bounds (:class:`PreAuth`): until the app calls :meth:`authenticated`, a
  frame is limited to a few KiB (refused with 1009 as soon as its header announces more, so an
  unauthenticated peer cannot make the server hold a large incomplete frame), and handshakes
  past the per-address or total count of unauthenticated connections are refused with HTTP
  429 or 503 before the app runs;
- invalid UTF-8 in a text frame closes 1007 without a traceback in the log (uvicorn logs one);
- a peer that stops reading is cut: a keepalive ping unanswered within the timeout, or a close
  frame the peer never answers (:meth:`LeanWebSocketProtocol.cut_unanswered_close`), ends in
  :func:`common.cut` (the transport aborted, the kernel's send buffer discarded) rather than in
  a close that waits forever for the buffer to drain; while the transport is paused, the peer's
  pings get no pongs (RFC 6455 5.5.3 allows answering only the latest), so a peer that pings
  and never reads cannot grow the write buffer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode, apply_mask
from websockets.protocol import State

from vitalwire.transports.common import cut, ticker

log = logging.getLogger("vitalwire.wsserver")


class Inbox:
    """What uvicorn's protocol needs of ``asyncio.Queue``, for one reader at a time."""

    __slots__ = ("_items", "_waiter", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop  # not looked up per read: ``get_running_loop()`` makes a system call
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    async def get(self) -> Any:
        items = self._items
        while not items:
            if self._waiter is not None:
                raise RuntimeError("one reader at a time")
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return items.pop(0)


class Gate:
    """What uvicorn's protocol needs of ``asyncio.Event``; waiters are made only when closed."""

    __slots__ = ("_open", "_waiters", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._open = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        self._open = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._open = False

    async def wait(self) -> bool:
        if self._open:
            return True
        waiter = self._loop.create_future()
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


#: The attributes uvicorn's protocol sets on itself (as of uvicorn 0.54), held in slots; one it
#: adds later lands in the instance dict as usual.
_ATTRIBUTES = (
    "config",
    "app",
    "loop",
    "logger",
    "root_path",
    "asgi_version",
    "app_state",
    "connections",
    "tasks",
    "default_headers",
    "transport",
    "server",
    "client",
    "scheme",
    "queue",
    "handshake_initiated",
    "handshake_complete",
    "close_sent",
    "disconnected",
    "close_timer",
    "close_timeout",
    "initial_response",
    "conn",
    "read_paused",
    "writable",
    "ping_interval",
    "ping_timeout",
    "ping_timer",
    "pong_timer",
    "pending_ping_payload",
    "ping_sent_at",
    "last_ping_rtt",
    "frames",
    "curr_msg_data_type",
    "request",
    "response",
    "scope",
)


class PreAuth:
    """The bounds on connections that have not authenticated yet, and their count (one per
    server: every connection of the server shares it).

    A connection is counted from its handshake until the app calls :meth:`LeanWebSocketProtocol.
    authenticated` or the connection ends; a handshake past either count is refused before the
    app runs (HTTP 429 past ``per_address``, 503 past ``total``, both with ``Retry-After``).
    """

    __slots__ = ("frame_bytes", "per_address", "total", "_by_address", "count")

    def __init__(self, frame_bytes: int, per_address: int, total: int) -> None:
        #: Largest frame read before authentication (the ``hello`` / ``auth`` message).
        self.frame_bytes = frame_bytes
        self.per_address = per_address
        self.total = total
        self._by_address: dict[str, int] = {}
        #: Unauthenticated connections now.
        self.count = 0

    def admit(self, address: str) -> int | None:
        """Count a new connection from ``address``; the HTTP status to refuse it with, if any."""
        if self.count >= self.total:
            return 503
        held = self._by_address.get(address, 0)
        if held >= self.per_address:
            return 429
        self._by_address[address] = held + 1
        self.count += 1
        return None

    def release(self, address: str) -> None:
        """One connection from ``address`` authenticated or ended."""
        self.count -= 1
        held = self._by_address.pop(address) - 1
        if held:
            self._by_address[address] = held


#: Seconds a refused handshake tells the peer to wait (``Retry-After``).
RETRY_AFTER_S = 5


#: Opcodes read by the fast path: text, binary, ping, pong (RFC 6455 5.2).
_FAST_OPCODES = frozenset((1, 2, 9, 10))

#: Frame headers of unmasked final text frames with a payload under 126 bytes (RFC 6455 5.2).
_HEADERS = tuple(bytes((0x81, n)) for n in range(126))


_TRUSTED: dict[str, Any] = {}


def _trusted_hosts(config: Any) -> Any:
    """uvicorn's parsed ``forwarded_allow_ips`` (None without proxy headers, or if this uvicorn
    no longer has the class: the TCP peer is then used)."""
    if not getattr(config, "proxy_headers", False):
        return None
    allowed = config.forwarded_allow_ips
    key = allowed if isinstance(allowed, str) else ",".join(allowed or ())
    if key not in _TRUSTED:
        try:
            from uvicorn.middleware.proxy_headers import _TrustedHosts
        except ImportError:  # pragma: no cover - a uvicorn that moved it
            _TRUSTED[key] = None
        else:
            _TRUSTED[key] = _TrustedHosts(allowed if allowed is not None else "127.0.0.1")
    return _TRUSTED[key]


def text_frames(texts: list[str]) -> bytes:
    """``texts`` as unmasked, unfragmented text frames, as a server sends them (RFC 6455 5.2)."""
    parts: list[bytes] = []
    for text in texts:
        payload = text.encode()
        n = len(payload)
        if n < 126:
            parts.append(_HEADERS[n])
        elif n < 65536:
            parts.append(b"\x81\x7e" + n.to_bytes(2, "big"))
        else:
            parts.append(b"\x81\x7f" + n.to_bytes(8, "big"))
        parts.append(payload)
    return b"".join(parts)


class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol holding less per connection (see the module)."""

    __slots__ = (
        *_ATTRIBUTES,
        "_fast",
        "_rbuf",
        "on_frame",
        "_ticker",
        "_ka_key",
        "_ka_pong",
        "_max_size",
        "_counted",
    )

    #: The server's pre-authentication bounds (:func:`protocol_class`); None: none.
    pre_auth: PreAuth | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The largest frame read now: the pre-authentication bound until :meth:`authenticated`.
        self._max_size: int | None = self.config.ws_max_size
        self._counted: str | None = None  # the address counted in ``pre_auth``, until released
        if self.pre_auth is not None:
            bound = self.pre_auth.frame_bytes
            if self._max_size is None or bound < self._max_size:
                self._max_size = self.conn.max_message_size = bound
        self.queue = Inbox(self.loop)  # type: ignore[assignment]
        gate = Gate(self.loop)
        gate.set()
        self.writable = gate  # type: ignore[assignment]
        #: None until the handshake is done; then whether frames are read here (see the module)
        self._fast: bool | None = None
        self._rbuf = b""  # the start of a frame not yet complete
        #: Takes a whole message's text or bytes, or returns False to have it queued (module).
        self.on_frame: Callable[[str | bytes], bool] | None = None
        # the keepalive's ping and pong deadlines are filed with the loop's Ticker, not timers
        self._ticker = ticker(self.loop)
        self._ka_key: int | None = None
        self._ka_pong = False  # the entry filed is the pong deadline (else the next ping)

    def handle_connect(self, event: Any) -> None:
        pre_auth = self.pre_auth
        if pre_auth is not None and self.client is not None:
            address = self._address(event)
            status = pre_auth.admit(address)
            if status is not None:
                self._refuse(status)
                return
            self._counted = address
        super().handle_connect(event)
        # the scope holds its own copy of the headers; the parser keeps the request
        self.request = None  # type: ignore[assignment]
        event.headers.clear()

    def _address(self, event: Any) -> str:
        """The peer's address for the pre-authentication bounds: behind a trusted proxy
        (uvicorn's ``forwarded_allow_ips``, the environment's ``FORWARDED_ALLOW_IPS``), the
        client it names in ``X-Forwarded-For``, as the app sees it; otherwise the TCP peer (a
        proxy in front would otherwise be one address for every device and browser)."""
        assert self.client is not None
        peer = str(self.client[0])
        trusted = _trusted_hosts(self.config)
        if trusted is None or peer not in trusted:
            return peer
        forwarded = event.headers.get_all("X-Forwarded-For")
        if not forwarded:
            return peer
        host = trusted.get_trusted_client_address(", ".join(forwarded))[0]
        return str(host) if host else peer

    def _refuse(self, status: int) -> None:
        """Answer the handshake with ``status`` and close, without running the app."""
        why = "too many unauthenticated connections"
        response = self.conn.reject(status, f"{why}; retry later\n")
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        self.handshake_initiated = self.handshake_complete = self.close_sent = True
        self.conn.send_response(response)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()
        log.debug("%s: WebSocket handshake refused with %d (%s)", self.client, status, why)

    def authenticated(self) -> None:
        """The peer proved who it is: the normal frame limit applies, and it no longer counts
        against the pre-authentication bounds."""
        self._max_size = self.config.ws_max_size
        self.conn.max_message_size = self._max_size
        self._release()

    def _release(self) -> None:
        if self._counted is not None and self.pre_auth is not None:
            self.pre_auth.release(self._counted)
            self._counted = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        fast = self._fast
        if fast is None:
            if not self.handshake_complete:
                super().data_received(data)
                return
            conn = self.conn
            # websockets' parser has seen nothing past the handshake: it waits at a frame start
            fast = self._fast = (
                conn.state is State.OPEN and not conn.extensions and not conn.reader.buffer
            )
        if not fast:
            super().data_received(data)
            return
        buf = self._rbuf + data if self._rbuf else data
        end = len(buf)
        pos = 0
        max_size = self._max_size
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            start = pos + 6  # 2-byte header, 4-byte mask key
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                start += 2
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start += 8
            opcode = b0 & 0x0F
            if (
                b0 & 0xF0 != 0x80  # not final, or reserved bits set
                or not b1 & 0x80  # a client frame must be masked
                or opcode not in _FAST_OPCODES
                or (max_size is not None and length > max_size)
                or (opcode >= 8 and length > 125)
            ):
                self._hand_over(buf, pos)
                return
            stop = start + length
            if stop > end:
                break
            payload = apply_mask(buf[start:stop], buf[start - 4 : start])
            if opcode == 1:
                try:
                    text = payload.decode()
                except UnicodeDecodeError:
                    self._fast = False
                    self._rbuf = b""
                    self._invalid_utf8()
                    return
                self._deliver("text", text)
            elif opcode == 2:
                self._deliver("bytes", payload)
            elif opcode == 9:
                self.conn.send_pong(payload)
                self.handle_ping()
            else:
                self.handle_pong(Frame(Opcode.PONG, payload))
            pos = stop
        self._rbuf = buf[pos:] if pos < end else b""

    def _hand_over(self, buf: bytes, pos: int) -> None:
        """websockets' parser reads the rest of the connection, from ``buf[pos:]`` on."""
        self._fast = False
        self._rbuf = b""
        super().data_received(buf[pos:])

    def handle_ping(self) -> None:
        # websockets queued the pong; a paused transport (the peer does not read) gets none:
        # a peer sending pings it never reads would otherwise grow the write buffer without end
        output = b"".join(self.conn.data_to_send())
        if self.writable.is_set():
            self.transport.write(output)

    def send_receive_event_to_app(self) -> None:
        """uvicorn's, through :meth:`_deliver`; invalid UTF-8 closes 1007 without a traceback."""
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.curr_msg_data_type != "text":
            self._deliver("bytes", data)
            return
        try:
            text = data.decode()
        except UnicodeDecodeError:
            self._invalid_utf8()
            return
        self._deliver("text", text)

    def _invalid_utf8(self) -> None:
        """Close 1007 (RFC 6455 8.1): the peer's fault, worth a line at most, not a traceback."""
        log.info("%s: invalid UTF-8 in a text frame; closing 1007", self.client)
        self.conn.fail(1007, "invalid UTF-8")
        self.handle_parser_exception()

    def _deliver(self, kind: str, data: str | bytes) -> None:
        """What uvicorn's ``send_receive_event_to_app`` does with one whole message, or hand it
        to :attr:`on_frame` when nothing is queued before it."""
        if self.close_sent:
            return  # past websocket.close: uvicorn discards it too
        take = self.on_frame
        if take is not None and self.queue.empty() and take(data):
            return
        self.queue.put_nowait({"type": "websocket.receive", kind: data})
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def send_now(self, texts: list[str]) -> bool:
        """Write ``texts`` as text frames now, in one ``transport.write``; False (nothing written)
        when that is not simply possible: the handshake is not done, a close was sent or
        received, or the transport is paused (then ``send`` must wait for room).

        What uvicorn's ``send`` does for ``websocket.send``, without a coroutine per frame:
        server frames are unmasked, so with no extension (compression) negotiated the frame is
        a two-to-ten-byte header and the UTF-8 payload (RFC 6455 section 5.2).
        """
        if (
            not self.handshake_complete
            or self.close_sent
            or self.disconnected
            or self.initial_response is not None
            or not self.writable.is_set()
        ):
            return False
        transport = self.transport
        conn = self.conn
        if transport.is_closing() or conn.state is not State.OPEN:
            return False
        if conn.extensions:
            for text in texts:
                conn.send_text(text.encode())
            transport.write(b"".join(conn.data_to_send()))
            return True
        transport.write(text_frames(texts))
        return True

    def cut_unanswered_close(self) -> None:
        """After the app sent a close: uvicorn closes the transport if the peer does not answer
        within ``close_timeout``, and a close waits for the write buffer to drain, which a peer
        that does not read never lets happen; cut the connection then instead."""
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, cut, self.transport)

    def start_keepalive(self) -> None:
        # called once, right after the handshake response was sent: it is not needed any more
        self.response = None  # type: ignore[assignment]
        super().start_keepalive()

    # -- the keepalive, as uvicorn's, on the Ticker ----------------------------------------------
    # uvicorn arms two loop timers per connection and interval (the next ping; the pong's
    # deadline); these file the same deadlines with the Ticker (transports/common.py), which
    # makes no object per deadline. What is sent and when it closes (1011) is unchanged.

    def schedule_ping(self) -> None:
        assert self.ping_interval is not None
        delay = max(0.0, self.ping_interval - self.last_ping_rtt)
        self._withdraw()
        self._ka_key = self._ticker.add(self, self.loop.time() + delay)

    def due(self) -> None:
        self._ka_key = None
        if self._ka_pong:
            self._ka_pong = False
            self.keepalive_timeout()
        else:
            self.send_keepalive_ping()

    def send_keepalive_ping(self) -> None:
        self.ping_timer = None
        if self.close_sent or self.transport.is_closing():
            return
        # a random payload identifies this ping; handle_pong ignores stale or unsolicited pongs
        self.pending_ping_payload = struct.pack("!I", random.getrandbits(32))
        self.ping_sent_at = self.loop.time()
        self.conn.send_ping(self.pending_ping_payload)
        self.transport.write(b"".join(self.conn.data_to_send()))
        if self.ping_timeout is not None:
            self._withdraw()
            self._ka_pong = True
            self._ka_key = self._ticker.add(self, self.ping_sent_at + self.ping_timeout)
        else:
            self.schedule_ping()

    def keepalive_timeout(self) -> None:
        """A ping unanswered within the timeout: close 1011 if the transport can take the close
        frame, and cut the connection if the peer does not answer it within one ping interval;
        cut at once when the transport is paused (the peer is not reading)."""
        self.pending_ping_payload = None
        if self.close_sent or self.transport.is_closing():
            return
        self.close_sent = True
        if not self.writable.is_set():
            cut(self.transport)
            return
        self.conn.fail(1011, "keepalive ping timeout")
        self.transport.write(b"".join(self.conn.data_to_send()))
        grace = self.ping_interval or self.close_timeout
        self.close_timer = self.loop.call_later(grace, cut, self.transport)

    def handle_pong(self, event: Frame) -> None:
        if self.pending_ping_payload is None or bytes(event.data) != self.pending_ping_payload:
            return
        self.last_ping_rtt = self.loop.time() - self.ping_sent_at
        self.pending_ping_payload = None
        if self._ka_pong:  # answered in time: the next ping
            self.schedule_ping()

    def stop_keepalive(self) -> None:
        self._withdraw()
        super().stop_keepalive()

    def _withdraw(self) -> None:
        if self._ka_key is not None:
            self._ticker.discard(self, self._ka_key)
            self._ka_key = None
        self._ka_pong = False


def protocol_class(pre_auth: PreAuth | None = None) -> type[asyncio.Protocol]:
    """A :class:`LeanWebSocketProtocol` of its own for one server, holding its ``pre_auth``
    bounds; or uvicorn's own class if uvicorn changed under it (no bounds then)."""
    ok = all(
        callable(getattr(WebSocketsSansIOProtocol, name, None))
        for name in (
            "handle_connect",
            "start_keepalive",
            "send",
            "receive",
            "data_received",
            "handle_pong",
            "schedule_ping",
            "send_keepalive_ping",
            "keepalive_timeout",
            "stop_keepalive",
        )
    )
    if not ok:
        return WebSocketsSansIOProtocol
    return type(
        "LeanWebSocketProtocol", (LeanWebSocketProtocol,), {"__slots__": (), "pre_auth": pre_auth}
    )
