"""The MQTT bridge: devices that publish to a broker instead of opening ``/ws/device``.

How it works: vitalwire connects to the broker (``mqtt_url``) as one MQTT 5 client with a fixed
client id and a session that outlives a disconnect (clean start off, ``mqtt_session_expiry_s``),
and subscribes with QoS 1 to every device's ``readings``, ``status`` and ``command_results``
topics (``$share/vitalwire/...`` when ``mqtt_shared``). The device id is the topic's; the broker
has authenticated the device and its ACL lets it publish only on its own topics
(``vitalwire admin mqtt-acl``). Each device gets a :class:`DeviceSession` in the same ingest
service as a WebSocket device, opened at its first message: a reading body goes through the
same codec, bounds, seq rules, deduplication, alerts and streams, and the session's frames are
published on the device's topics: ``ack`` (after the commit that made the readings durable) on
``acks``, ``error`` on ``errors``, ``command`` on ``commands``, all QoS 1. Messages are taken
one at a time in the order the broker delivers them, so one device's readings keep their order:
a reading of an open session is taken inside paho's read of the socket (every waiting packet
per wake-up, :func:`_read_in_bursts`); a message that must wait (a first message opens its
session in the store; backpressure) goes to one consumer task, and every later one behind it.

The broker's PUBACK to a device says the broker has the message; vitalwire's ``ack`` says the
readings up to that seq are durable in vitalwire's store (the device may drop them from its
spool). A device resends what is not acknowledged (docs/howto-mqtt.md).

Rate limit: a device may publish ``device_msgs_per_s`` messages per second (burst
``device_msgs_burst``) on its ``readings`` and ``command_results`` topics, as on ``/ws/device``.
vitalwire cannot close a device's broker connection, and a refused ``readings`` message followed
by accepted ones would let the cumulative ``ack`` cover readings never stored; so the refusal
(``rate_limited`` on ``errors``, naming the bound and the first refused ``seq``) also refuses the
device's later readings until it publishes again from that seq. Other devices, and the device's
own messages within the bound, are not touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
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


#: Packets read per wake-up of the broker's socket, at most.
READ_BURST = 256
#: QoS 1 messages the broker may have in flight to vitalwire (MQTT 5 Receive Maximum). The other
#: way stays at paho's 20: its bookkeeping walks every message in flight at each PUBACK.
RECEIVE_MAXIMUM = 1000
#: Messages waiting for the async path (a first message, backpressure) before reading pauses.
PENDING_MAX = 5000


def _read_in_bursts(client: Any) -> tuple[int, Callable[[], None]] | None:
    """Read every packet waiting on the broker's socket at each wake-up, not one.

    aiomqtt reads with paho's ``loop_read()``, which takes about one packet per call (as many as
    messages are in flight): one per turn of the event loop, which at a ward's rate (a reading
    and the PUBACK of its ack per device per second) puts the bridge behind by seconds. This
    replaces aiomqtt's reader for the socket with one that reads until the socket is empty."""
    from paho.mqtt.enums import MQTTErrorCode

    paho = client._client  # noqa: SLF001
    disconnected = client._disconnected  # noqa: SLF001
    sock = paho.socket()
    if sock is None:
        return None
    with contextlib.suppress(OSError):  # acks and commands go out at once, not after Nagle's wait
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def read() -> None:
        try:
            for _ in range(READ_BURST):
                if paho._sock is None:  # noqa: SLF001
                    return
                rc = paho._packet_read()  # noqa: SLF001
                if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                    return
                if rc > 0:
                    paho._loop_rc_handle(rc)  # noqa: SLF001
                    return
        except Exception as exc:  # as aiomqtt's reader: a broken connection ends the session
            if not disconnected.done():
                disconnected.set_exception(exc)

    asyncio.get_running_loop().add_reader(sock.fileno(), read)
    return sock.fileno(), read


def _bound(s: Any) -> str:
    return f"{s.device_msgs_per_s:g}/s, burst {s.device_msgs_burst}"


def _rate_error(s: Any, seq: int) -> wire.Error:
    return wire.Error(
        code="rate_limited",
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
        self._client: Any = None  # the connected aiomqtt client
        #: the rate limit: a bucket per registered device (kept across its sessions), the clock
        self.buckets: dict[str, TokenBucket] = {}
        self.clock: Callable[[], float] = time.monotonic
        #: devices refused at the rate limit -> the seq they must publish again from
        self.refused_from: dict[str, int] = {}
        #: messages waiting for the async path (topic, payload), in the broker's order
        self._pending: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._reader: tuple[int, Callable[[], None]] | None = None  # the socket's, and its reader
        self._paused = False

    # -- the connection -------------------------------------------------------------------------

    async def run(self) -> None:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        s = self.svc.settings
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = s.mqtt_session_expiry_s
        # QoS 1 messages the broker may send before their PUBACKs: without it Mosquitto allows
        # its max_inflight_messages (20), a round trip per 20 readings (the bound on memory is
        # ours: reading stops while PENDING_MAX messages wait, see _on_message)
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        share = "$share/vitalwire/" if s.mqtt_shared else ""
        subs = [(f"{share}{self.prefix}/devices/+/{k}", 1) for k in (READINGS, COMMAND_RESULTS)]
        # presence is retained: every node reads every device's (a shared one would split it)
        subs.append((f"{self.prefix}/devices/+/{STATUS}", 1))
        delay = RECONNECT_S[0]
        consumer = asyncio.create_task(self._consume(), name="mqtt-consume")
        try:
            while True:
                client = aiomqtt.Client(
                    **self.conn,
                    identifier=s.mqtt_client_id,
                    protocol=aiomqtt.ProtocolVersion.V5,
                    clean_start=False,
                    properties=props,
                    keepalive=max(5, int(s.heartbeat_s)),
                )
                # every message, from the first the broker delivers: in paho's read, in order
                client._client.on_message = self._on_message  # noqa: SLF001
                try:
                    async with client:
                        self._reader = _read_in_bursts(client)
                        await client.subscribe(subs)
                        self._client = client
                        self.connected.set()
                        delay = RECONNECT_S[0]
                        log.info(
                            "mqtt: connected to %s:%s", self.conn["hostname"], self.conn["port"]
                        )
                        async for _ in client.messages:  # none come here: this waits for the end
                            pass
                except aiomqtt.MqttError as exc:
                    log.warning("mqtt: broker unreachable (%s); retrying in %.1f s", exc, delay)
                finally:
                    self._client = self._reader = None
                    self.connected.clear()
                    # vitalwire cannot hear its MQTT devices now: they are offline to it, and a
                    # command made meanwhile stays queued; each comes back at its next message
                    for did in list(self.sessions):
                        self._end(did, "broker unreachable", at_once=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_S[1])
        finally:
            consumer.cancel()

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        """paho's callback, on this loop (aiomqtt reads the socket here). A reading of a device
        with a session, while the store keeps up, is taken at once; anything else (a first
        message, presence, a command result, backpressure) waits for :meth:`_consume`, and so
        does every message after it, so one device's messages keep their order."""
        name, payload = message.topic, message.payload
        pending = self._pending
        if pending or not self._take_now(name, payload):
            pending.append((name, payload))
            self._wake.set()
            if len(pending) >= PENDING_MAX and self._reader is not None:
                # backpressure: read no more until the queue is half empty; the broker holds
                # the rest (its window, then its queue for this session)
                asyncio.get_running_loop().remove_reader(self._reader[0])
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
                    if self._reader is not None:
                        asyncio.get_running_loop().add_reader(*self._reader)

    def stop(self) -> None:
        for did in list(self.sessions):
            self._end(did, "server shutting down", at_once=True)

    # -- messages -------------------------------------------------------------------------------

    async def take(self, name: str, payload: Any) -> None:
        """One message from the broker, by its topic; never raises for a peer's error."""
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
                await self._readings(did, raw)
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

    def _take_now(self, name: str, payload: Any) -> bool:
        """:meth:`take` for a reading that needs no wait; False (nothing done) otherwise."""
        parts = name.split("/")
        if len(parts) < 4 or parts[-1] != READINGS or parts[-3] != "devices":
            return False
        did = parts[-2]
        session = self.sessions.get(did)
        svc = self.svc
        if session is None or svc.writer.pending_rows > svc.settings.max_pending_rows:
            return False
        self.received += 1
        try:
            bodies = self._bodies(payload if isinstance(payload, bytes | str) else b"")
            self._ingest(did, session, bodies)
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

    async def _readings(self, did: str, raw: bytes | str) -> None:
        svc = self.svc
        bodies = self._bodies(raw)
        session = await self._session(did)
        writer = svc.writer
        if writer.pending_rows > svc.settings.max_pending_rows:
            # backpressure: stop taking messages until the writer catches up (the broker and
            # the devices' spools hold the rest; nothing unacknowledged is lost)
            with contextlib.suppress(TimeoutError):
                await writer.wait_for_room(svc.settings.max_pending_rows, svc.settings.heartbeat_s)
        self._ingest(did, session, bodies)

    def _ingest(self, did: str, session: DeviceSession, bodies: list[wire.ReadingBody]) -> None:
        if not self._within_rate(did, bodies):
            return
        for err in self.svc.ingest.readings(session, bodies):
            self._publish(did, ERRORS, err)
        owed = self.refused_from.get(did)
        if owed is not None and max((b.seq for b in bodies), default=0) >= owed:
            del self.refused_from[did]  # published again from the refused seq: taken

    def _within_rate(self, did: str, bodies: list[wire.ReadingBody]) -> bool:
        """False (and the error published) when the device is over its rate, or has not yet
        published again from the seq its last refusal named."""
        taken = self._take_token(did)
        owed = self.refused_from.get(did)
        if taken and owed is None:
            return True
        first = min((b.seq for b in bodies), default=0)
        if not taken:
            owed = first if owed is None else min(owed, first)
            self.refused_from[did] = owed
            self._publish(did, ERRORS, _rate_error(self.svc.settings, owed))
            return False
        if owed is not None and first > owed:
            self._publish(
                did,
                ERRORS,
                wire.Error(
                    code="rate_limited",
                    message=f"readings must be published again from seq {owed} (refused at "
                    f"the rate limit), got seq {first}",
                    field="seq",
                    seq=owed,
                ),
            )
            return False
        return True

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
        client = self._client
        if client is None:
            return  # acks are sent again on reconnect; commands stay sent and time out
        client._client.publish(topic(self.prefix, did, kind), frame, 1)  # noqa: SLF001


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
