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
one at a time in the order the broker delivers them, so one device's readings keep their order.

The broker's PUBACK to a device says the broker has the message; vitalwire's ``ack`` says the
readings up to that seq are durable in vitalwire's store (the device may drop them from its
spool). A device resends what is not acknowledged (docs/howto-mqtt.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from vitalwire import wire
from vitalwire.core import events as ev
from vitalwire.core.errors import InvalidMessage, PeerError
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

    # -- the connection -------------------------------------------------------------------------

    async def run(self) -> None:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        s = self.svc.settings
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = s.mqtt_session_expiry_s
        share = "$share/vitalwire/" if s.mqtt_shared else ""
        subs = [(f"{share}{self.prefix}/devices/+/{k}", 1) for k in (READINGS, COMMAND_RESULTS)]
        # presence is retained: every node reads every device's (a shared one would split it)
        subs.append((f"{self.prefix}/devices/+/{STATUS}", 1))
        delay = RECONNECT_S[0]
        while True:
            client = aiomqtt.Client(
                **self.conn,
                identifier=s.mqtt_client_id,
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=False,
                properties=props,
                keepalive=max(5, int(s.heartbeat_s)),
            )
            try:
                async with client:
                    await client.subscribe(subs)
                    self._client = client
                    self.connected.set()
                    delay = RECONNECT_S[0]
                    log.info("mqtt: connected to %s:%s", self.conn["hostname"], self.conn["port"])
                    async for message in client.messages:
                        await self.take(message.topic.value, message.payload)
            except aiomqtt.MqttError as exc:
                log.warning("mqtt: broker unreachable (%s); retrying in %.1f s", exc, delay)
            finally:
                self._client = None
                self.connected.clear()
                # vitalwire cannot hear its MQTT devices now: they are offline to it, and a
                # command made meanwhile stays queued; each comes back at its next message
                for did in list(self.sessions):
                    self._end(did, "broker unreachable", at_once=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_S[1])

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

    async def _readings(self, did: str, raw: bytes | str) -> None:
        svc = self.svc
        check_size(raw, svc.settings.max_frame_bytes)
        msg = wire.decode_device(raw)
        if isinstance(msg, wire.Reading):
            bodies: list[wire.ReadingBody] = [msg]
        elif isinstance(msg, wire.Readings):
            bodies = msg.items
        else:
            raise InvalidMessage(
                f"type must be reading or readings on the {READINGS} topic", field="type"
            )
        session = await self._session(did)
        writer = svc.writer
        if writer.pending_rows > svc.settings.max_pending_rows:
            # backpressure: stop taking messages until the writer catches up (the broker and
            # the devices' spools hold the rest; nothing unacknowledged is lost)
            with contextlib.suppress(TimeoutError):
                await writer.wait_for_room(svc.settings.max_pending_rows, svc.settings.heartbeat_s)
        for err in svc.ingest.readings(session, bodies):
            self._publish(did, ERRORS, err)

    async def _command_result(self, did: str, raw: bytes | str) -> None:
        check_size(raw, self.svc.settings.max_frame_bytes)
        msg = wire.decode_device(raw)
        if not isinstance(msg, wire.CommandResult):
            raise InvalidMessage(
                f"type must be command_result on the {COMMAND_RESULTS} topic", field="type"
            )
        self.svc.commands.on_result(await self._session(did), msg)

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
