"""The MQTT bridge: devices that publish to a broker instead of opening ``/ws/device``.

How it works: vitalwire connects to the broker (``mqtt_url``) as one MQTT 5 client
(:class:`BrokerLink`, on asyncio's protocol layer) with a fixed client id and a session that
outlives a disconnect (clean start off, ``mqtt_session_expiry_s``),
and subscribes with QoS 1 to every device's ``readings``, ``status`` and ``command_results``
topics (``$share/vitalwire/...`` when ``mqtt_shared``). The device id is the topic's; the broker
has authenticated the device and its ACL lets it publish only on its own topics
(``vitalwire admin mqtt-acl``). Each device gets a :class:`DeviceSession` in the same ingest
service as a WebSocket device, opened at its first message: a reading body goes through the
same codec, bounds, seq rules, deduplication, alerts and streams, and the session's frames are
published on the device's topics: ``ack`` (after the commit that made the readings durable) on
``acks``, ``error`` on ``errors``, ``command`` on ``commands``, all QoS 1. Messages are taken
one at a time in the order the broker delivers them, so one device's readings keep their order:
a reading of an open session is taken inside the read of the socket (every packet of a read is
parsed there, :meth:`BrokerLink.data_received`); a message that must wait (a first message
opens its session in the store; backpressure) goes to one consumer task, and every later one
behind it.

The broker's PUBACK to a device says the broker has the message; vitalwire's ``ack`` says the
readings up to that seq are durable in vitalwire's store (the device may drop them from its
spool). A device resends what is not acknowledged (docs/howto-mqtt.md). vitalwire's own PUBACK to
the broker says no more than the broker's: the bridge has taken the message (into the ingest, or
into the queue of the consumer task, in order); it is written after that, never before, and not
for a packet left unread by backpressure.

Rate limit: a device may publish ``device_msgs_per_s`` messages per second (burst
``device_msgs_burst``) on its ``readings`` and ``command_results`` topics, as on ``/ws/device``.
vitalwire cannot close a device's broker connection, and a refused ``readings`` message followed
by accepted ones would let the cumulative ``ack`` cover readings never stored; so the refusal
(``rate_limited`` on ``errors``, naming the bound and the first refused ``seq``) also refuses the
device's later readings until it publishes again from that seq. Other devices, and the device's
own messages within the bound, are not touched.

Gaps: the broker may drop messages it has PUBACKed to a device (a restart without persistence,
a lost session, a full queue, a node that died before its commit). A QoS 1 readings message
that leaves a gap after the device's high seq is refused the same way (``seq_gap``) until the
device publishes again from its first reading not acknowledged (:class:`Refusal`), so no ``ack``
covers what the broker dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from vitalwire import wire
from vitalwire.core import events as ev
from vitalwire.core.errors import InvalidMessage, PeerError, RateLimited
from vitalwire.core.ratelimit import TokenBucket
from vitalwire.services.ingest import DeviceSession
from vitalwire.transports.common import check_size
from vitalwire.transports.errors import public_message, row_for

if TYPE_CHECKING:
    from vitalwire.services.container import Services

log = logging.getLogger("vitalwire.mqtt")

#: Topic kinds under ``<prefix>/devices/<device_id>/``: what devices publish ...
READINGS, STATUS, COMMAND_RESULTS = "readings", "status", "command_results"
#: ... and what vitalwire publishes.
ACKS, ERRORS, COMMANDS = "acks", "errors", "commands"
#: Presence payloads on ``status`` (retained; ``offline`` is the device's last will).
ONLINE, OFFLINE = b"online", b"offline"
#: Reconnect delays after the broker is lost: doubling from the first to the last.
RECONNECT_S = (0.2, 5.0)
#: The frame types the ingest sends a session, and the topic each goes out on.
_ROUTES = (('{"type":"ack"', ACKS), ('{"type":"error"', ERRORS), ('{"type":"command"', COMMANDS))


class MqttUrlError(ValueError):
    pass


def parse_url(url: str) -> dict[str, Any]:
    """``mqtt://user:pass@host:port`` -> connection arguments (port 1883 by default)."""
    parts = urlsplit(url)
    if parts.scheme != "mqtt" or not parts.hostname:
        raise MqttUrlError(f"mqtt_url must look like mqtt://user:pass@host:port, got {url!r:.80}")
    return {
        "hostname": parts.hostname,
        "port": parts.port or 1883,
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
    }


def topic(prefix: str, device_id: str, kind: str) -> str:
    return f"{prefix}/devices/{device_id}/{kind}"


#: QoS 1 messages the broker may have in flight to vitalwire (MQTT 5 Receive Maximum).
RECEIVE_MAXIMUM = 1000
#: Messages waiting for the async path (a first message, backpressure) before reading pauses.
PENDING_MAX = 5000
#: Topics whose parse the bridge keeps (a ward's devices have three each), at most.
TOPICS_KEPT = 100_000


# -- the broker connection: MQTT 5 on asyncio's protocol layer -------------------------------------

#: Outgoing QoS 1 messages in flight to the broker at once, at most (less if the broker's CONNACK
#: says so): a PUBACK frees its slot in a set, so a wide window costs nothing per message.
SEND_WINDOW = 1000
#: Seconds the bridge's writes (PUBACKs, acks, errors, commands) wait to go out together.
WRITE_DELAY_S = 0.002
#: Seconds to wait for the TCP connection, the CONNACK and the SUBACK.
CONNECT_TIMEOUT_S = 10.0
#: Property ids of MQTT 5 -> the size of their value (0: a variable byte integer; -1: a UTF-8
#: string or binary data, two length bytes first; -2: a user property, two strings).
_PROPERTY_SIZES = {
    0x01: 1, 0x02: 4, 0x03: -1, 0x08: -1, 0x09: -1, 0x0B: 0, 0x11: 4, 0x12: -1, 0x13: 2,
    0x15: -1, 0x16: -1, 0x17: 1, 0x18: 4, 0x19: 1, 0x1A: -1, 0x1C: -1, 0x1F: -1, 0x21: 2,
    0x22: 2, 0x23: 2, 0x24: 1, 0x25: 1, 0x26: -2, 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1,
}  # fmt: skip


class MqttProtocolError(ConnectionError):
    """The broker refused the connection or a subscription, or broke the protocol."""


def varint(n: int) -> bytes:
    """An MQTT variable byte integer (a packet's remaining length, a property length)."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8_string(s: str) -> bytes:
    """An MQTT UTF-8 string: its length in two bytes, then the bytes."""
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it); raises IndexError when the bytes end inside it."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise MqttProtocolError("a variable byte integer longer than 4 bytes")


def properties(data: bytes, pos: int) -> tuple[dict[int, Any], int]:
    """MQTT 5 properties at ``pos`` (their length first): {id: value}, and where they end."""
    length, pos = _varint_at(data, pos)
    end = pos + length
    props: dict[int, Any] = {}
    while pos < end:
        pid = data[pos]
        size = _PROPERTY_SIZES.get(pid)
        pos += 1
        if size is None:
            raise MqttProtocolError(f"unknown MQTT 5 property 0x{pid:02x}")
        if size > 0:
            value: Any = int.from_bytes(data[pos : pos + size], "big")
            pos += size
        elif size == 0:
            value, pos = _varint_at(data, pos)
        else:
            for _ in range(-size):
                n = int.from_bytes(data[pos : pos + 2], "big")
                value = data[pos + 2 : pos + 2 + n]
                pos += 2 + n
        props[pid] = value
    if pos != end:
        raise MqttProtocolError("MQTT 5 properties overrun their length")
    return props, end


class BrokerLink(asyncio.Protocol):
    """The bridge's MQTT 5 connection: CONNECT, SUBSCRIBE, QoS 0/1 PUBLISH both ways, PUBACK,
    PINGREQ, DISCONNECT; nothing else is needed (no QoS 2: vitalwire subscribes with QoS 1, so
    the broker sends at most that; no topic aliases: vitalwire allows none, so every PUBLISH
    names its topic).

    Every complete packet that arrives is parsed in :meth:`data_received` (one call of the
    event loop per read of the socket, however many packets it holds): a PUBLISH goes to
    ``on_publish(topic, payload, qos)``, and its PUBACK is written after that returns, the
    PUBACKs of one read in one write. ``pause()``/``resume()``: backpressure (the packets
    already read wait in the buffer, un-PUBACKed)."""

    def __init__(self, on_publish: Callable[[bytes, bytes, int], None]) -> None:
        self.on_publish = on_publish
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.up = False  # CONNACK accepted: vitalwire may publish
        self.session_present = False
        self.keepalive = 0
        self._buf = b""
        self._paused = False
        self._waiting: dict[int, asyncio.Future[bytes]] = {}  # 0: CONNACK; else SUBACK's id
        self._pid = 0
        self._window = SEND_WINDOW
        self._inflight: set[int] = set()
        self._queued: deque[tuple[bytes, bytes]] = deque()  # (topic field, payload) past it
        self._out: list[bytes] = []
        self._ping_at: float | None = None
        self._keeper: asyncio.Task[None] | None = None

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:  # acks and PUBACKs go out at once, not after Nagle's wait
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.up = False
        lost = exc or ConnectionError("the broker closed the connection")
        if not self.closed.done():
            self.closed.set_exception(lost)
            self.closed.exception()  # retrieved: whoever waits on it sees it anyway
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(lost)
        if self._keeper is not None:
            self._keeper.cancel()

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
        self._buf = data
        if not self._paused:
            self._parse()

    def _parse(self) -> None:
        data = self._buf
        n = len(data)
        pos = 0
        acks: list[bytes] = []
        on_publish = self.on_publish
        try:
            while pos < n and not self._paused:
                first = data[pos]
                # the remaining length: one byte below 128 (a reading), else up to four
                length = data[pos + 1] if pos + 1 < n else 0x80
                if length < 0x80:
                    start = pos + 2
                else:
                    try:
                        length, start = _varint_at(data, pos + 1)
                    except IndexError:
                        break  # the header is not all here yet
                end = start + length
                if end > n:
                    break
                if first >> 4 == 3:  # PUBLISH
                    tlen = (data[start] << 8) | data[start + 1]
                    p = start + 2 + tlen
                    name = data[start + 2 : p]
                    qos = (first >> 1) & 3
                    if qos:
                        if qos != 1:
                            raise MqttProtocolError("a QoS 2 PUBLISH on a QoS 1 subscription")
                        pid = data[p : p + 2]
                        p += 2
                    if p < end and data[p] == 0:  # no properties: the payload follows
                        p += 1
                    else:
                        _, p = properties(data, p)
                    if p > end:
                        raise MqttProtocolError("a PUBLISH shorter than its headers")
                    on_publish(name, data[p:end], qos)
                    if qos:
                        acks.append(b"\x40\x02" + pid)
                else:
                    self._control(first, data[start:end])
                pos = end
        except (MqttProtocolError, IndexError) as exc:
            log.warning(
                "mqtt: %s; reconnecting",
                exc if isinstance(exc, MqttProtocolError) else "a malformed packet",
            )
            if self.transport is not None:
                self.transport.abort()
            return
        finally:
            self._buf = data[pos:] if pos < n else b""
            if acks:
                self._write(b"".join(acks))

    def _control(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 4:  # PUBACK of one of vitalwire's messages
            pid = (body[0] << 8) | body[1]
            self._inflight.discard(pid)
            while self._queued and len(self._inflight) < self._window:
                self._send_publish(*self._queued.popleft())
        elif kind == 13:  # PINGRESP
            self._ping_at = None
        elif kind == 2:  # CONNACK: what it grants holds for the packets right behind it
            if len(body) < 2:
                raise MqttProtocolError("a CONNACK without a reason code")
            if body[1] < 0x80:
                got, _ = properties(body, 2)
                self.session_present = bool(body[0] & 1)
                self._window = min(SEND_WINDOW, got.get(0x21, 65535))
                self.keepalive = got.get(0x13, self.keepalive)  # the broker's keep alive wins
                self.up = True
            self._resolve(0, body)
        elif kind == 9:  # SUBACK
            self._resolve((body[0] << 8) | body[1], body)
        elif kind == 14:  # DISCONNECT from the broker
            code = body[0] if body else 0
            raise MqttProtocolError(f"the broker disconnected (reason 0x{code:02x})")
        else:
            raise MqttProtocolError(f"an unexpected packet of type {kind} from the broker")

    def _resolve(self, key: int, body: bytes) -> None:
        fut = self._waiting.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(body)

    async def _wait(self, key: int) -> bytes:
        fut = self._waiting[key] = asyncio.get_running_loop().create_future()
        return await asyncio.wait_for(fut, CONNECT_TIMEOUT_S)

    # -- writing --

    def _write(self, data: bytes) -> None:
        """Writes of :data:`WRITE_DELAY_S` go out as one: PUBACKs and acks are not what a
        reading waits for, and one write a few ms saves a system call per packet here and in
        the broker."""
        out = self._out
        out.append(data)
        if len(out) == 1:
            asyncio.get_running_loop().call_later(WRITE_DELAY_S, self._flush)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and out:
            self.transport.write(b"".join(out))

    def _next_pid(self) -> int:
        while True:
            self._pid = self._pid % 65535 + 1
            if self._pid not in self._inflight:
                return self._pid

    def publish(self, topic_field: bytes, payload: bytes) -> None:
        """QoS 1 (``topic_field``: the topic with its two length bytes), not waiting for the
        PUBACK; past the window it waits in a queue, in order."""
        if len(self._inflight) >= self._window or self._queued:
            self._queued.append((topic_field, payload))
        else:
            self._send_publish(topic_field, payload)

    def _send_publish(self, topic_field: bytes, payload: bytes) -> None:
        pid = self._next_pid()
        self._inflight.add(pid)
        size = len(topic_field) + 3 + len(payload)
        self._write(
            b"".join((b"\x32", varint(size), topic_field, pid.to_bytes(2, "big"), b"\x00", payload))
        )

    def pause(self) -> None:
        """Read no more (what is read waits, un-PUBACKed) until :meth:`resume`."""
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            if self._ping_at is not None:  # its PINGRESP may be among what was not read
                self._ping_at = time.monotonic()
            self._parse()
            if self.transport is not None and not self._paused:
                self.transport.resume_reading()

    # -- the session --

    async def start(
        self,
        client_id: str,
        username: str | None,
        password: str | None,
        keepalive: int,
        session_expiry_s: int,
        receive_maximum: int,
        subscriptions: list[tuple[str, int]],
    ) -> None:
        """CONNECT (MQTT 5, clean start off) and SUBSCRIBE; raises MqttProtocolError when the
        broker refuses either."""
        assert self.transport is not None
        flags = (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
        props = b"\x11" + session_expiry_s.to_bytes(4, "big")
        props += b"\x21" + receive_maximum.to_bytes(2, "big")
        body = utf8_string("MQTT") + bytes([5, flags]) + keepalive.to_bytes(2, "big")
        body += varint(len(props)) + props + utf8_string(client_id)
        if username is not None:
            body += utf8_string(username)
        if password is not None:
            body += utf8_string(password)  # binary data: the same two length bytes
        self.keepalive = keepalive
        self._write(b"\x10" + varint(len(body)) + body)
        connack = await self._wait(0)
        if not self.up:
            raise MqttProtocolError(
                f"the broker refused the connection (reason 0x{connack[1]:02x})"
            )
        pid = self._next_pid()
        body = pid.to_bytes(2, "big") + b"\x00"
        body += b"".join(utf8_string(t) + bytes([qos]) for t, qos in subscriptions)
        self._write(b"\x82" + varint(len(body)) + body)
        suback = await self._wait(pid)
        try:
            _, pos = properties(suback, 2)
        except IndexError:
            raise MqttProtocolError("a SUBACK shorter than its properties") from None
        refused = [
            t for (t, _), code in zip(subscriptions, suback[pos:], strict=False) if code >= 0x80
        ]
        if refused or len(suback) - pos != len(subscriptions):
            raise MqttProtocolError(f"the broker refused the subscriptions {refused}")
        if self.keepalive:
            self._keeper = asyncio.create_task(self._keep_alive(), name="mqtt-keepalive")

    async def _keep_alive(self) -> None:
        """A PINGREQ every half keep alive; no PINGRESP within one: the connection is dead."""
        interval = self.keepalive / 2
        while self.transport is not None:
            await asyncio.sleep(interval)
            if self._paused:  # the PINGRESP waits unread in the socket: not a dead broker
                continue
            now = time.monotonic()
            if self._ping_at is not None:
                if now - self._ping_at >= self.keepalive and self.transport is not None:
                    log.warning("mqtt: no PINGRESP from the broker in %s s", self.keepalive)
                    self.transport.abort()
                    return
                continue
            self._ping_at = now
            self._write(b"\xc0\x00")

    def close(self) -> None:
        """DISCONNECT (normal: the session stays for its expiry) and close."""
        if self._keeper is not None:
            self._keeper.cancel()
        if self.transport is not None:
            self._flush()
            self.transport.write(b"\xe0\x00")
            self.transport.close()


#: The codes of a refusal of a device's readings (see :class:`Refusal`).
RATE_LIMITED, SEQ_GAP = "rate_limited", "seq_gap"


@dataclass(slots=True)
class Refusal:
    """A device's readings refused until it publishes again: a message whose first seq is at
    most ``upto`` is taken (the device publishes again from its first reading not acknowledged,
    which is at most the first refused seq), a later one is refused with the same ``code``.

    ``rate_limited``: a message past the rate limit; ``start`` = ``upto`` = its first seq.

    ``seq_gap``: a QoS 1 message whose first seq is past the device's high seq + 1. Between a
    device and vitalwire the broker may drop messages it has PUBACKed: a broker restarted
    without persistence, a session it lost or let expire, a queue past
    ``max_queued_messages``, a node that took messages and died before their commit. Taking
    the later readings would let the cumulative ``ack`` cover the lost ones, which the device
    would then drop from its spool. So the gap is refused once (``start`` = high seq + 1,
    ``upto`` = the first refused seq): a device with a spool publishes again from its first
    reading not acknowledged and loses nothing; one whose seqs skip on purpose publishes the
    same readings again and they are taken. A device without a spool never publishes again:
    after ``mqtt_resend_wait_s`` (``at``: when the refusal began) its next message is taken,
    gap and all. QoS 0 messages are not held to this: the device asked for no delivery
    guarantee, and vitalwire takes what arrives."""

    code: str
    start: int
    upto: int
    at: float


def _gap_error(high: int, first: int) -> wire.Error:
    return wire.Error(
        code=SEQ_GAP,
        message=f"seq {first} leaves a gap after seq {high}, the last this device published "
        f"that reached vitalwire (the broker may have dropped messages); readings from seq "
        f"{high + 1} were not taken: publish again from the first reading not acknowledged",
        field="seq",
        seq=high + 1,
    )


def _bound(s: Any) -> str:
    return f"{s.device_msgs_per_s:g}/s, burst {s.device_msgs_burst}"


def _rate_error(s: Any, seq: int) -> wire.Error:
    return wire.Error(
        code=RATE_LIMITED,
        message=f"messages must be at most {_bound(s)}; readings from seq {seq} were not "
        "taken: publish them again",
        seq=seq,
    )


class MqttBridge:
    """The broker's devices as ingest sessions. :meth:`run` until cancelled."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        s = svc.settings
        self.prefix = s.mqtt_topic_prefix
        self.conn = parse_url(s.mqtt_url)
        self.sessions: dict[str, DeviceSession] = {}
        self.connected = asyncio.Event()
        self.received = 0
        #: the rate limit: a bucket per registered device (kept across its sessions), the clock
        self.buckets: dict[str, TokenBucket] = {}
        self.clock: Callable[[], float] = time.monotonic
        #: devices whose readings are refused until they publish again (rate limit, seq gap)
        self.refusals: dict[str, Refusal] = {}
        #: gaps refused (one per refusal, however many messages it then refused); such
        #: refusals that lapsed (no resend within ``mqtt_resend_wait_s``: the gap was taken)
        self.gaps_refused = 0
        self.gaps_taken = 0
        #: messages waiting for the async path (topic, payload, QoS), in the broker's order
        self._pending: deque[tuple[str, bytes, int]] = deque()
        self._wake = asyncio.Event()
        self._link: BrokerLink | None = None  # the connection to the broker
        self._paused = False
        #: topic -> the device id when it is a device's readings topic, else None
        self._dids: dict[bytes, str | None] = {}
        #: (device, kind) -> its topic as a PUBLISH names it (two length bytes first)
        self._topics: dict[tuple[str, str], bytes] = {}

    # -- the connection -------------------------------------------------------------------------

    async def run(self) -> None:
        s = self.svc.settings
        share = "$share/vitalwire/" if s.mqtt_shared else ""
        subs = [(f"{share}{self.prefix}/devices/+/{k}", 1) for k in (READINGS, COMMAND_RESULTS)]
        # presence is retained: every node reads every device's (a shared one would split it)
        subs.append((f"{self.prefix}/devices/+/{STATUS}", 1))
        loop = asyncio.get_running_loop()
        delay = RECONNECT_S[0]
        consumer = asyncio.create_task(self._consume(), name="mqtt-consume")
        try:
            while True:
                link: BrokerLink | None = None
                try:
                    _, link = await asyncio.wait_for(
                        loop.create_connection(
                            lambda: BrokerLink(self._on_publish),
                            self.conn["hostname"],
                            self.conn["port"],
                        ),
                        CONNECT_TIMEOUT_S,
                    )
                    # every message, from the first the broker delivers (a session's queue
                    # comes right after the CONNACK), goes through _on_publish, in order
                    self._link, self._paused = link, False
                    await link.start(
                        s.mqtt_client_id,
                        self.conn["username"],
                        self.conn["password"],
                        keepalive=max(5, int(s.heartbeat_s)),
                        session_expiry_s=s.mqtt_session_expiry_s,
                        # QoS 1 messages the broker may send before their PUBACKs: without it
                        # Mosquitto allows its max_inflight_messages (20), a round trip per 20
                        # readings (the bound on memory is ours: reading stops while
                        # PENDING_MAX messages wait, see _on_publish)
                        receive_maximum=RECEIVE_MAXIMUM,
                        subscriptions=subs,
                    )
                    self.connected.set()
                    delay = RECONNECT_S[0]
                    log.info("mqtt: connected to %s:%s", self.conn["hostname"], self.conn["port"])
                    await link.closed  # raises when the connection ends
                except (OSError, TimeoutError) as exc:
                    log.warning("mqtt: broker unreachable (%s); retrying in %.1f s", exc, delay)
                finally:
                    if link is not None:
                        link.close()
                    self._link = None
                    self.connected.clear()
                    # vitalwire cannot hear its MQTT devices now: they are offline to it, and a
                    # command made meanwhile stays queued; each comes back at its next message
                    for did in list(self.sessions):
                        self._end(did, "broker unreachable", at_once=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_S[1])
        finally:
            consumer.cancel()

    def _on_publish(self, name: bytes, payload: bytes, qos: int) -> None:
        """A message from the broker, inside the read of its socket (its PUBACK goes out when
        this returns). A reading of a device with a session, while the store keeps up, is taken
        at once; anything else (a first message, presence, a command result, backpressure)
        waits for :meth:`_consume`, and so does every message after it, so one device's
        messages keep their order."""
        pending = self._pending
        if pending or not self._take_now(name, payload, qos):
            pending.append((name.decode(errors="replace"), payload, qos))
            self._wake.set()
            if len(pending) >= PENDING_MAX and self._link is not None:
                # backpressure: read no more until the queue is half empty; the broker holds
                # the rest (its window, then its queue for this session)
                self._link.pause()
                self._paused = True

    async def _consume(self) -> None:
        pending = self._pending
        while True:
            await self._wake.wait()
            self._wake.clear()
            while pending:
                await self.take(*pending[0])
                pending.popleft()  # only now: what arrives meanwhile queues behind it
                if self._paused and len(pending) <= PENDING_MAX // 2:
                    self._paused = False
                    if self._link is not None:
                        self._link.resume()

    def stop(self) -> None:
        for did in list(self.sessions):
            self._end(did, "server shutting down", at_once=True)

    # -- messages -------------------------------------------------------------------------------

    async def take(self, name: str, payload: Any, qos: int) -> None:
        """One message from the broker, by its topic (``qos``: as the broker delivered it);
        never raises for a peer's error."""
        parts = name.split("/")
        if len(parts) < 4 or parts[-3] != "devices":
            return
        did, kind = parts[-2], parts[-1]
        self.received += 1
        raw = payload if isinstance(payload, bytes | str) else b""
        try:
            ev.check_id("device_id", did)
        except PeerError:
            log.info("mqtt: message on a topic with an invalid device id dropped")
            return
        try:
            if kind == STATUS:
                await self._presence(did, raw)
            elif kind == READINGS:
                await self._readings(did, raw, qos)
            elif kind == COMMAND_RESULTS:
                await self._command_result(did, raw)
        except PeerError as exc:
            self._error(did, exc)
        except Exception:
            log.exception("mqtt: message of device %s failed", did)

    async def _presence(self, did: str, raw: bytes | str) -> None:
        body = raw.encode() if isinstance(raw, str) else raw
        if not body:
            return  # a retained status being cleared
        if body == ONLINE:
            await self._session(did)
        elif body == OFFLINE:
            if did in self.sessions:
                self._end(did, "offline (last will)")
        else:
            raise InvalidMessage(
                f"status must be online or offline, got {body[:20]!r}", field="status"
            )

    def _take_now(self, name: bytes, payload: bytes, qos: int) -> bool:
        """:meth:`take` for a reading that needs no wait; False (nothing done) otherwise."""
        dids = self._dids
        did = dids.get(name, False)
        if did is False:
            parts = name.decode(errors="replace").split("/")
            ok = len(parts) >= 4 and parts[-1] == READINGS and parts[-3] == "devices"
            if len(dids) >= TOPICS_KEPT:
                dids.clear()
            did = dids[name] = parts[-2] if ok else None
        if did is None:
            return False
        session = self.sessions.get(did)
        svc = self.svc
        if session is None or svc.writer.pending_rows > svc.settings.max_pending_rows:
            return False
        self.received += 1
        try:
            self._ingest(did, session, self._bodies(payload), qos)
        except PeerError as exc:
            self._error(did, exc)
        except Exception:
            log.exception("mqtt: message of device %s failed", did)
        return True

    def _bodies(self, raw: bytes | str) -> list[wire.ReadingBody]:
        check_size(raw, self.svc.settings.max_frame_bytes)
        msg = wire.decode_device(raw)
        if isinstance(msg, wire.Reading):
            return [msg]
        if isinstance(msg, wire.Readings):
            return msg.items
        raise InvalidMessage(
            f"type must be reading or readings on the {READINGS} topic", field="type"
        )

    async def _readings(self, did: str, raw: bytes | str, qos: int) -> None:
        svc = self.svc
        bodies = self._bodies(raw)
        session = await self._session(did)
        writer = svc.writer
        if writer.pending_rows > svc.settings.max_pending_rows:
            # backpressure: stop taking messages until the writer catches up (the broker and
            # the devices' spools hold the rest; nothing unacknowledged is lost)
            with contextlib.suppress(TimeoutError):
                await writer.wait_for_room(svc.settings.max_pending_rows, svc.settings.heartbeat_s)
        self._ingest(did, session, bodies, qos)

    def _ingest(
        self, did: str, session: DeviceSession, bodies: list[wire.ReadingBody], qos: int
    ) -> None:
        if not self._admit(did, bodies, qos):
            return
        for err in self.svc.ingest.readings(session, bodies):
            self._publish(did, ERRORS, err)
        refusal = self.refusals.get(did)
        if refusal is not None and max((b.seq for b in bodies), default=0) >= refusal.upto:
            del self.refusals[did]  # published again from where it was refused: taken

    def _admit(self, did: str, bodies: list[wire.ReadingBody], qos: int) -> bool:
        """False (and the error published) when the message must not be taken: the device is
        over its rate; a QoS 1 message leaves a gap after the device's high seq (the broker may
        have dropped what came between, see :class:`Refusal`); or the device has not yet
        published again from where its last refusal said."""
        taken = self._take_token(did)
        refusal = self.refusals.get(did)
        first = bodies[0].seq if len(bodies) == 1 else min((b.seq for b in bodies), default=0)
        if taken and refusal is None:
            high = self.svc.ingest.high_seq(did)
            if not qos or first <= high + 1:
                return True
            self.gaps_refused += 1
            refusal = self.refusals[did] = Refusal(SEQ_GAP, high + 1, first, self.clock())
            self._publish(did, ERRORS, _gap_error(high, first))
            return False
        if not taken:
            if refusal is None:
                refusal = Refusal(RATE_LIMITED, first, first, self.clock())
            else:  # (a seq_gap refusal keeps its code: it may still lapse)
                start, upto = min(refusal.start, first), min(refusal.upto, first)
                refusal = Refusal(refusal.code, start, upto, refusal.at)
            self.refusals[did] = refusal
            self._publish(did, ERRORS, _rate_error(self.svc.settings, refusal.start))
            return False
        assert refusal is not None
        if first <= refusal.upto:
            return True  # published again from where it was refused
        if (
            refusal.code == SEQ_GAP
            and self.clock() - refusal.at >= self.svc.settings.mqtt_resend_wait_s
        ):
            # no resend came: a device without a spool (the gap's readings are gone); take
            # what it publishes now, the gap included
            del self.refusals[did]
            self.gaps_taken += 1
            log.info("mqtt: %s did not publish again from seq %s; gap taken", did, refusal.start)
            return True
        why = "the rate limit" if refusal.code == RATE_LIMITED else "a gap in its seqs"
        self._publish(
            did,
            ERRORS,
            wire.Error(
                code=refusal.code,
                message=f"readings must be published again from seq {refusal.start} (refused "
                f"at {why}), got seq {first}",
                field="seq",
                seq=refusal.start,
            ),
        )
        return False

    def _take_token(self, did: str) -> bool:
        bucket = self.buckets.get(did)
        if bucket is None:
            s = self.svc.settings
            bucket = self.buckets[did] = TokenBucket(s.device_msgs_per_s, s.device_msgs_burst)
        return bucket.take(self.clock())

    async def _command_result(self, did: str, raw: bytes | str) -> None:
        check_size(raw, self.svc.settings.max_frame_bytes)
        msg = wire.decode_device(raw)
        if not isinstance(msg, wire.CommandResult):
            raise InvalidMessage(
                f"type must be command_result on the {COMMAND_RESULTS} topic", field="type"
            )
        session = await self._session(did)
        if not self._take_token(did):
            raise RateLimited(f"messages must be at most {_bound(self.svc.settings)}")
        self.svc.commands.on_result(session, msg)

    # -- sessions -------------------------------------------------------------------------------

    async def _session(self, did: str) -> DeviceSession:
        """The device's session, opened (as a ``hello`` would) at its first message."""
        session = self.sessions.get(did)
        if session is not None:
            return session
        svc = self.svc

        def send(frame: str) -> None:
            for start, kind in _ROUTES:
                if frame.startswith(start):
                    self._send(did, kind, frame)
                    return

        def close(code: int, why: str) -> None:
            if self.sessions.get(did) is opened:
                self._end(did, why)

        hello = wire.Hello(device_id=did, secret="")
        opened, _ = await svc.ingest.hello(hello, send, close, broker_authenticated=True)
        opened.peer = "mqtt"
        self.sessions[did] = opened
        if opened.acked:  # where vitalwire stands: the device resends what comes after
            self._publish(did, ACKS, wire.Ack(opened.acked))
        svc.commands.deliver(did)  # commands queued while it was away, in order
        return opened

    def _end(self, did: str, reason: str, at_once: bool = False) -> None:
        session = self.sessions.pop(did, None)
        if session is None:
            return
        if at_once:
            self.svc.ingest.goodbye(session, reason)
        else:  # after the call that closed it returns (a newer session may be replacing it)
            asyncio.get_running_loop().call_soon(self.svc.ingest.goodbye, session, reason)

    # -- publishing -----------------------------------------------------------------------------

    def _error(self, did: str, exc: PeerError) -> None:
        row = row_for(exc)
        field = getattr(exc, "field", None)
        self._publish(
            did, ERRORS, wire.Error(code=row.code, message=public_message(exc), field=field)
        )

    def _publish(self, did: str, kind: str, msg: Any) -> None:
        self._send(did, kind, wire.encode_text(msg))

    def _send(self, did: str, kind: str, frame: str) -> None:
        """QoS 1, without waiting for the broker's PUBACK (the loop never waits on it)."""
        link = self._link
        if link is None or not link.up:
            return  # acks are sent again on reconnect; commands stay sent and time out
        field = self._topics.get((did, kind))
        if field is None:
            if len(self._topics) >= TOPICS_KEPT:
                self._topics.clear()
            field = self._topics[did, kind] = utf8_string(topic(self.prefix, did, kind))
        link.publish(field, frame.encode())


# -- the broker's identities (``vitalwire admin mqtt-acl``) ---------------------------------------

#: Store meta key of the server key that MQTT passwords are derived from.
PASSWORD_KEY_META = "mqtt_password_key"
#: Mosquitto's ``$7$`` password hash: PBKDF2-HMAC-SHA512, its default iterations and salt size.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12


def device_password(key: str, device_id: str, secret_hash: str) -> str:
    """A device's MQTT password: HMAC-SHA256 of the server key over its id and the stored hash
    of its current secret (so rotating the secret rotates it; the secret itself is never needed)."""
    import base64
    import hashlib
    import hmac

    mac = hmac.new(key.encode(), f"{device_id}\n{secret_hash}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")


def mosquitto_hash(password: str, salt: bytes | None = None) -> str:
    """``$7$...``: a line's hash in Mosquitto's password file (as ``mosquitto_passwd`` writes)."""
    import base64
    import hashlib
    import os

    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    b64 = base64.b64encode
    return f"$7${PBKDF2_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def acl_text(prefix: str, server_user: str, devices: list[str]) -> str:
    """Mosquitto's ACL file: the server reads and writes every device topic; each device may
    publish only its own readings, status and command results and read its own acks, errors
    and commands."""
    lines = [
        "# written by `vitalwire admin mqtt-acl` from the device registry: do not edit",
        f"user {server_user}",
        f"topic readwrite {prefix}/devices/#",
        "",
    ]
    for did in devices:
        lines.append(f"user {did}")
        lines += [
            f"topic write {topic(prefix, did, k)}" for k in (READINGS, STATUS, COMMAND_RESULTS)
        ]
        lines += [f"topic read {topic(prefix, did, k)}" for k in (ACKS, ERRORS, COMMANDS)]
        lines.append("")
    return "\n".join(lines)


async def broker_files(
    store: Any, prefix: str, server_user: str, server_password: str
) -> tuple[str, str, dict[str, str]]:
    """The password file's and ACL file's text for the registry's enabled devices, and each
    device's MQTT password. The server key is made once and kept in the store."""
    import secrets

    if server_user in {d["id"] for d in await store.list_devices()}:
        raise MqttUrlError(f"the server's MQTT user {server_user!r} is also a device id")
    key = await store.get_meta(PASSWORD_KEY_META)
    if not key:
        key = secrets.token_urlsafe(32)
        await store.set_meta(PASSWORD_KEY_META, key)
    passwords: dict[str, str] = {}
    for d in await store.list_devices():
        if d["disabled"]:
            continue
        row = await store.get_device(d["id"])
        passwords[d["id"]] = device_password(key, d["id"], row["secret_hash"])
    users = {server_user: server_password, **passwords}
    pw_text = "".join(f"{u}:{mosquitto_hash(p)}\n" for u, p in users.items())
    return pw_text, acl_text(prefix, server_user, list(passwords)), passwords


async def run_bridge(bridge: MqttBridge) -> None:
    try:
        await bridge.run()
    finally:
        bridge.stop()
