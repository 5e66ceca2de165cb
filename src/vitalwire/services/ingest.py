"""Device ingest: authenticate, validate, deduplicate by (device, seq), assign offsets, acknowledge.

A device numbers its readings (``seq``, only grows). A reading at or below the highest seq already
received from that device is a resend after reconnect when it is the same reading (same time and
values as the one taken under that seq): it is dropped and the cumulative ``ack`` tells the device
it can forget it. A different reading under a seq already used (a device that restarted its
numbering, an out-of-order batch, a second unit with the same identity) is answered with a
``conflicting_seq`` error and never acknowledged: the server keeps a fingerprint of each device's
last :data:`RECENT_READINGS` readings to tell the two apart, and a seq older than those cannot be
confirmed as a resend. An ``ack`` is sent only after the commit that made the reading durable
(services/writer.py), so an acknowledged reading survives a crash.

One identity, one unit: a ``hello`` replaces the device's open session (close 4009). A displaced
connection whose peer answers that close was alive: two units use the identity, which raises the
technical alert ``device_identity_conflict`` on the patient and is audited; after
``identity_conflict_max`` of them within ``identity_conflict_window_s`` new sessions of the
identity are refused (close 4010) for ``identity_cooldown_s``, so two units cannot take turns.

Readings stamped more than ``Timeliness.late_s`` in the past are stored and shown (marked ``late``)
but feed no alarm; those stamped more than ``Timeliness.ahead_s`` in the future are refused
(core/alerts.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from array import array
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from vitalwire.core import events as ev
from vitalwire.core.alerts import Timeliness
from vitalwire.core.errors import (
    Conflict,
    InvalidMessage,
    InvalidReading,
    PeerError,
    Unauthenticated,
)
from vitalwire.core.metrics import MAX_SEQ, validate_header, validate_values
from vitalwire.services.alerts import AlertService
from vitalwire.services.registry import Registry
from vitalwire.services.streams import Streams
from vitalwire.services.writer import BatchWriter
from vitalwire.store import AlertRow, AuditRow, ReadingRow, Store
from vitalwire.wire import (
    PROTOCOL_VERSION,
    Ack,
    Close,
    Error,
    Hello,
    ReadingBody,
    Waveform,
    Welcome,
    check_format,
    encode_text,
)
from vitalwire.wire import Event as WireEvent

log = logging.getLogger("vitalwire.ingest")

#: A device is marked offline (silent) after this many times its longest expected silence.
SILENCE_FACTOR = 1.5
#: Waveform chunks: highest sample rate, most samples per chunk, kinds accepted.
MAX_WAVEFORM_HZ = 1000
MAX_WAVEFORM_SAMPLES = 2000
WAVEFORM_KINDS = ("pleth", "ecg", "resp")
#: Readings per device whose fingerprint is kept to tell a resend from a conflicting reading
#: (a power of two; 8 bytes each, allocated at the device's first hello).
RECENT_READINGS = 256
_SLOT = RECENT_READINGS - 1
#: What a slot keeps of a seq and of a payload's hash: their low 32 bits (a seq is compared with
#: the one in its slot, never more than RECENT_READINGS apart; a payload that differs and still
#: matches the kept hash is one in about four billion, and is then taken for a resend: dropped).
_LOW = 0xFFFFFFFF
_astuple = msgspec.structs.astuple


class Unavailable(PeerError):
    """The server is shutting down; the device keeps its readings and resends them elsewhere."""


class IdentityInUse(Conflict):
    """Two units use this device identity: new sessions are refused for a cool-down."""


class _Recent:
    """A device's last :data:`RECENT_READINGS` readings: seq and payload fingerprint, by seq."""

    __slots__ = ("seqs", "prints")

    def __init__(self) -> None:
        self.seqs = array("I", bytes(4 * RECENT_READINGS))  # 0: no reading in the slot
        self.prints = array("I", bytes(4 * RECENT_READINGS))

    def resend(self, body: ReadingBody) -> bool | None:
        """True: the reading taken under ``body.seq`` had this payload; False: another one;
        None: it is no longer (or never was) remembered."""
        slot = body.seq & _SLOT
        if self.seqs[slot] != body.seq & _LOW:
            return None
        return self.prints[slot] == hash(_astuple(body)) & _LOW


@dataclass(slots=True, eq=False)
class DeviceSession:
    """One connected device. ``send`` queues a text frame; ``close`` closes with a code."""

    device_id: str
    patient_id: str | None
    send: Callable[[str], None]
    close: Callable[[int, str], None]
    firmware: str | None = None
    #: the stored hash of the secret it authenticated with (a rotation ends the session)
    secret_hash: str = ""
    silence_s: float = 45.0
    last_data: float = 0.0
    silent: bool = False
    acked: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    #: loop time of the last ack sent, and the timer of a deferred one (see Ingest._durable_to)
    acked_at: float = -math.inf
    ack_timer: asyncio.TimerHandle | None = None
    #: readings up to this seq were in flight from an earlier session at hello: no ack reaches
    #: this session until it has sent this seq (or later) itself (0: nothing held)
    hold_upto: int = 0
    conflicts: int = 0
    #: ``host:port`` of the peer (audit of an identity conflict)
    peer: str | None = None

    @property
    def stream(self) -> str | None:
        return None if self.patient_id is None else ev.patient_stream(self.patient_id)


class Ingest:
    """Turns device messages into durable stream events."""

    def __init__(
        self,
        store: Store,
        streams: Streams,
        writer: BatchWriter,
        registry: Registry,
        clock: Callable[[], float],
        *,
        heartbeat_s: float = 15.0,
        max_frame_bytes: int = 65536,
        max_batch: int = 500,
        max_silence_s: float = 30.0,
        alerts: AlertService | None = None,
        ack_interval_s: float = 0.0,
        timeliness: Timeliness | None = None,
        identity_conflict_max: int = 3,
        identity_conflict_window_s: float = 300.0,
        identity_cooldown_s: float = 60.0,
    ) -> None:
        self.store = store
        self.streams = streams
        self.writer = writer
        self.registry = registry
        self.clock = clock
        self.heartbeat_s = heartbeat_s
        self.max_frame_bytes = max_frame_bytes
        self.max_batch = max_batch
        self.max_silence_s = max_silence_s
        self.alerts = alerts
        #: at most one ack per device per this many seconds (the last one deferred, not dropped)
        self.ack_interval_s = ack_interval_s
        #: which readings alarms take as current (core/alerts.py)
        self.timeliness = timeliness or Timeliness()
        #: this many identity conflicts within the window start a cool-down of that long; the
        #: alert lasts the window after the last one
        self.identity_conflict_max = identity_conflict_max
        self.identity_conflict_window_s = identity_conflict_window_s
        self.identity_cooldown_s = identity_cooldown_s
        #: readings refused because their seq was already used by another reading (/metrics)
        self.conflicting_seqs = 0
        self.identity_conflicts = 0
        self._conflict_times: dict[str, deque[float]] = {}
        self._cooldown_until: dict[str, float] = {}
        self._recent: dict[str, _Recent] = {}
        self.stopping = False
        # the loop the sessions live on, kept: each ``get_running_loop()`` makes a system call
        self._loop: asyncio.AbstractEventLoop | None = None
        self._high: dict[str, int] = {}  # highest seq received (accepted or rejected) per device
        self._durable: dict[str, int] = {}  # highest seq committed per device
        self.sessions: dict[str, DeviceSession] = {}
        # devices shown online when the server (re)started, or when this node took their
        # patient's stream over from a node that died: offline unless they come back.
        # device -> (patient, since)
        self._expected: dict[str, tuple[str, float]] = {}
        #: Several nodes (services/cluster.py): take the patient's stream before a device's
        #: session opens (its readings are written on this node)
        self.claim: Callable[[str], Awaitable[object]] | None = None
        #: registry changes applied per device (bindings, revocations): a hello that read the
        #: device's row or binding before one was applied reads them again
        self._changes: dict[str, int] = {}
        registry.on_binding_change = self._on_binding_change
        registry.on_revoked = self.revoke

    async def hello(
        self,
        msg: Hello,
        send: Callable[[str], None],
        close: Callable[[int, str], None],
        *,
        broker_authenticated: bool = False,
    ) -> tuple[DeviceSession, Welcome]:
        """Authenticate a device and open its session; a previous session of it is replaced.

        ``broker_authenticated``: the MQTT bridge's devices, which the broker authenticated
        (transports/mqtt.py): no secret is checked, but the device must exist and be enabled."""
        self._loop = asyncio.get_running_loop()
        if self.stopping:
            raise Unavailable("server is shutting down; reconnect later")
        ev.check_id("device_id", msg.device_id)
        if msg.protocol != PROTOCOL_VERSION:
            raise InvalidMessage(
                f"protocol must be {PROTOCOL_VERSION}, got {msg.protocol}", field="protocol"
            )
        check_format("format", msg.format)
        if msg.max_silence_s is not None and not 1 <= msg.max_silence_s <= 3600:
            raise InvalidMessage(
                f"max_silence_s must be between 1 and 3600, got {msg.max_silence_s:g}",
                field="max_silence_s",
            )
        did = msg.device_id
        while True:
            changes = self._changes.get(did, 0)
            if broker_authenticated:
                row = await self._enabled_device(did)
            else:
                row = await self.registry.authenticate_device(did, msg.secret)
            if did not in self._high or self.claim is not None:
                # in a cluster the device may have written on another node since: the store's
                # high seq (written with its readings) says what is durable
                last = await self.store.device_last_seq(did)
                self._high[did] = max(self._high.get(did, 0), last)
                self._durable[did] = max(self._durable.get(did, 0), last)
            binding = await self.store.active_binding(did)
            if self._changes.get(did, 0) == changes:
                break  # else a registry change of this device was applied meanwhile: read again
        self._refuse_in_cooldown(did, binding.patient_id if binding else None)
        if self.claim is not None and binding is not None:
            # several nodes: readings are written where their device is (services/cluster.py)
            await self.claim(binding.patient_id)
        self._recent.setdefault(did, _Recent())
        old = self.sessions.get(did)
        if old is not None:
            self._go_offline(old, "replaced")
            old.close(Close.REPLACED, "replaced by a new connection of the same device")
        session = DeviceSession(did, binding.patient_id if binding else None, send, close)
        session.firmware = msg.firmware
        session.secret_hash = row["secret_hash"]
        session.silence_s = SILENCE_FACTOR * (msg.max_silence_s or self.max_silence_s)
        session.last_data = self.clock()
        session.acked = self._durable[did]
        if self._high[did] > session.acked:
            # the rest is in flight from an earlier session: its ack is not this session's
            # unless this session resends those readings (a second unit's would conflict)
            session.hold_upto = self._high[did]
        self.sessions[did] = session
        self._expected.pop(did, None)
        self._status(session, "online")
        welcome = Welcome(
            server_time=self.clock(),
            last_seq=self._durable[did],
            high_seq=self._high[did],
            patient_id=session.patient_id,
            heartbeat_s=self.heartbeat_s,
            max_frame_bytes=self.max_frame_bytes,
            max_batch=self.max_batch,
        )
        return session, welcome

    async def _enabled_device(self, did: str) -> dict[str, Any]:
        row = await self.store.get_device(did)
        if row is None:
            raise Unauthenticated(f"device {did} is not registered", field="device_id")
        if row["disabled"]:
            raise Unauthenticated(f"device {did} is disabled", field="device_id")
        return row

    def high_seq(self, device_id: str) -> int:
        """The highest seq received from the device (accepted or rejected; 0: none known)."""
        return self._high.get(device_id, 0)

    def readings(self, session: DeviceSession, bodies: list[ReadingBody]) -> list[Error]:
        """Accept a frame of readings; return one error per rejected reading.

        Raises:
            Unavailable: the server is shutting down; nothing in this frame was taken.
            InvalidMessage: more than ``max_batch`` readings; nothing in this frame was taken.

        The transport waits for room in the write queue before calling this (backpressure), so a
        frame is never refused for load: a refused frame followed by an accepted later one would
        let the cumulative ack cover readings that were never stored.
        """
        if len(bodies) > self.max_batch:
            raise InvalidMessage(
                f"items must hold at most {self.max_batch} readings, got {len(bodies)}",
                field="items",
            )
        if self.stopping:
            raise Unavailable("server is shutting down; resend after reconnecting")
        did = session.device_id
        now = self.clock()
        session.last_data = now
        if session.silent:
            session.silent = False
            self._status(session, "online", "resumed")
        high = self._high[did]
        recent = self._recent[did]
        seqs, prints = recent.seqs, recent.prints
        stream = session.stream
        ahead_s = self.timeliness.ahead_s
        current_from = now - self.timeliness.late_s  # older readings raise no live alarm
        rows: list[ReadingRow] = []
        events: list[WireEvent] = []
        alert_rows: list[AlertRow] = []
        errors: list[Error] = []
        dup_max = 0
        for body in bodies:
            seq = body.seq
            try:
                validate_header(seq, body.ts, now, ahead_s)
                if seq <= high:
                    if recent.resend(body):
                        dup_max = max(dup_max, seq)
                        session.duplicates += 1
                    else:
                        errors.append(self._conflicting(session, body, high))
                    continue
                values = validate_values(body.values())
            except InvalidReading as exc:
                if high < seq <= MAX_SEQ:
                    high = seq
                    seqs[seq & _SLOT], prints[seq & _SLOT] = seq & _LOW, hash(_astuple(body)) & _LOW
                session.rejected += 1
                errors.append(
                    Error(code="invalid_reading", message=exc.message, field=exc.field, seq=seq)
                )
                continue
            high = seq
            seqs[seq & _SLOT], prints[seq & _SLOT] = seq & _LOW, hash(_astuple(body)) & _LOW
            data: dict[str, object] = {"device": did, "seq": seq, "ts": body.ts}
            data.update(values)
            if body.probe is not None:
                data["probe"] = body.probe
            late = body.ts < current_from
            if late:
                data["late"] = True
            if stream is None:
                rows.append(ReadingRow(did, seq, None, None, body.ts, now, json.dumps(data)))
            else:
                event = self.streams.new_event(stream, ev.READING, now, data)
                events.append(event)
                rows.append(ReadingRow(did, seq, session.patient_id, event.offset, body.ts, now))
                if self.alerts is not None and session.patient_id is not None:
                    if late:  # history: stored and shown, never alarmed as current
                        more, changed = self.alerts.on_late_reading(session.patient_id, did, now)
                    else:
                        if body.probe is not None:
                            values["probe"] = body.probe
                        more, changed = self.alerts.on_reading(session.patient_id, did, values, now)
                    events.extend(more)
                    alert_rows.extend(changed)
        if session.hold_upto and max(dup_max, high if high > self._high[did] else 0) >= (
            session.hold_upto
        ):
            session.hold_upto = 0  # it sent its own (errors for conflicts went out before)
        self._high[did] = high
        if rows:
            session.accepted += len(rows)
            top = rows[-1].seq
            self.writer.submit(rows, events, lambda: self._durable_to(did, top), alerts=alert_rows)
        elif dup_max and self._durable[did] >= dup_max and not session.hold_upto:
            session.send(encode_text(Ack(self._durable[did])))
        return errors

    def flat_reading(self, session: DeviceSession, values: dict[str, float]) -> list[Error]:
        """A flat message (a ``hello`` with ``format``): it carries no seq and no time, so the
        server numbers it after the device's highest seq and stamps it with its own clock.
        Values are already checked (:func:`vitalwire.wire.decode_flat`)."""
        body = ReadingBody(seq=self._high[session.device_id] + 1, ts=self.clock(), **values)
        return self.readings(session, [body])

    def _conflicting(self, session: DeviceSession, body: ReadingBody, high: int) -> Error:
        """A reading under a seq already used by another reading (or one too old to compare):
        refused, counted, never acknowledged."""
        self.conflicting_seqs += 1
        session.conflicts += 1
        why = (
            "is not a resend of the reading taken under it"
            if body.seq > high - RECENT_READINGS
            else f"is older than the last {RECENT_READINGS} readings and cannot be confirmed "
            "as a resend"
        )
        return Error(
            code="conflicting_seq",
            message=f"seq {body.seq} is at or below this device's high seq {high} and {why}: "
            f"this reading is not stored; number new readings after {high}",
            field="seq",
            seq=body.seq,
        )

    def _refuse_in_cooldown(self, did: str, pid: str | None) -> None:
        """Refuse a hello of an identity in its cool-down; the alert lasts on meanwhile."""
        until = self._cooldown_until.get(did)
        if until is None:
            return
        now = self.clock()
        if now >= until:
            del self._cooldown_until[did]
            return
        if pid is not None and self.alerts is not None:
            events, rows = self.alerts.on_identity_conflict(
                pid, did, now, now + self.identity_conflict_window_s
            )
            if events:
                self.writer.submit([], events, alerts=rows)
        raise IdentityInUse(
            f"device {did} is used by two units: new sessions are refused for "
            f"{until - now:.0f} s more (identity_cooldown_s {self.identity_cooldown_s:g})",
            field="device_id",
        )

    def identity_conflict(self, displaced: DeviceSession) -> None:
        """The peer of a session replaced by a newer one answered the close: it was alive, so
        two units use this identity. Raise ``device_identity_conflict`` on the patient (once;
        it lasts ``identity_conflict_window_s`` after the last conflict), audit it (both peers),
        and past ``identity_conflict_max`` conflicts in the window refuse new sessions of the
        identity for ``identity_cooldown_s``."""
        did = displaced.device_id
        now = self.clock()
        self.identity_conflicts += 1
        current = self.sessions.get(did)
        times = self._conflict_times.setdefault(did, deque())
        times.append(now)
        while times[0] < now - self.identity_conflict_window_s:
            times.popleft()
        cooldown = len(times) >= self.identity_conflict_max
        if cooldown:
            self._cooldown_until[did] = now + self.identity_cooldown_s
            times.clear()
        peers = [displaced.peer, current.peer if current is not None else None]
        log.warning(
            "device %s: identity in use twice (displaced %s, now %s)%s",
            did,
            *peers,
            f"; new sessions refused for {self.identity_cooldown_s:g} s" if cooldown else "",
        )
        pid = current.patient_id if current is not None else displaced.patient_id
        events: list[WireEvent] = []
        rows: list[AlertRow] = []
        if pid is not None and self.alerts is not None:
            until = now + self.identity_conflict_window_s
            events, rows = self.alerts.on_identity_conflict(pid, did, now, until)
        detail: dict[str, object] = {"displaced": peers[0], "current": peers[1]}
        if cooldown:
            detail["cooldown_s"] = self.identity_cooldown_s
        origin = ", ".join(p or "?" for p in peers)
        audit = AuditRow(now, did, "device_identity_conflict", pid, json.dumps(detail), origin)
        self.writer.submit([], events, alerts=rows, audit=[audit])

    def waveform(self, session: DeviceSession, msg: Waveform) -> None:
        """A chunk of waveform samples (``request_data``): an event in the patient's stream.

        Best effort: waveform chunks carry no ``seq`` and are not acknowledged.
        """
        now = self.clock()
        validate_header(1, msg.ts, now, self.timeliness.ahead_s)
        if not 1 <= msg.rate_hz <= MAX_WAVEFORM_HZ:
            raise InvalidMessage(
                f"rate_hz must be between 1 and {MAX_WAVEFORM_HZ}, got {msg.rate_hz:g}",
                field="rate_hz",
            )
        if not 1 <= len(msg.samples) <= MAX_WAVEFORM_SAMPLES:
            raise InvalidMessage(
                f"samples must hold 1 to {MAX_WAVEFORM_SAMPLES} values, got {len(msg.samples)}",
                field="samples",
            )
        if not all(math.isfinite(x) for x in msg.samples):
            raise InvalidMessage("samples must be finite numbers", field="samples")
        if msg.kind not in WAVEFORM_KINDS:
            raise InvalidMessage(
                f"kind must be one of {', '.join(WAVEFORM_KINDS)}, got {msg.kind!r:.40}",
                field="kind",
            )
        stream = session.stream
        if stream is None:
            return
        data = {
            "device": session.device_id,
            "ts": msg.ts,
            "rate_hz": msg.rate_hz,
            "kind": msg.kind,
            "samples": msg.samples,
            "command_id": msg.command_id,
        }
        self.writer.submit([], [self.streams.new_event(stream, ev.WAVEFORM, now, data)])

    def _durable_to(self, did: str, seq: int) -> None:
        """Readings of ``did`` up to ``seq`` are committed: ack them.

        Acks are cumulative, so a device streaming fast (a waveform-like rate: a commit every
        few milliseconds holds one of its readings) needs far fewer than one per commit: a
        device gets at most one ack per ``ack_interval_s``. One due sooner waits for the rest
        of the interval and then acknowledges everything durable by then; after a quiet
        interval (a 1 Hz monitor) the ack goes out at once.
        """
        if seq > self._durable[did]:
            self._durable[did] = seq
        session = self.sessions.get(did)
        if (
            session is None
            or self._durable[did] <= session.acked
            or session.ack_timer is not None
            or session.hold_upto
        ):
            return
        if self.ack_interval_s <= 0:
            self._ack(session)
            return
        loop = self._loop or asyncio.get_running_loop()
        due = session.acked_at + self.ack_interval_s
        if loop.time() >= due:
            self._ack(session)
        else:
            session.ack_timer = loop.call_at(due, self._ack, session)

    def _ack(self, session: DeviceSession) -> None:
        session.ack_timer = None
        durable = self._durable[session.device_id]
        if durable > session.acked and self.sessions.get(session.device_id) is session:
            session.acked = durable
            session.acked_at = (self._loop or asyncio.get_running_loop()).time()
            session.send(encode_text(Ack(durable)))

    def flush_acks(self) -> None:
        """Send every deferred ack now (before the server closes device connections)."""
        for session in list(self.sessions.values()):
            if session.ack_timer is not None:
                session.ack_timer.cancel()
                self._ack(session)

    def expect_back(self, devices: list[tuple[str, str]], since: float) -> None:
        """After a restart: these devices were online; if one does not reconnect within its
        silence window, :meth:`check_silence` marks it offline so no snapshot shows it live."""
        self._expected = {did: (pid, since) for pid, did in devices}

    def dropped(self, rows: list[ReadingRow]) -> None:
        """The writer dropped these readings (their stream is written by another node now:
        BatchWriter.on_dropped): forget having taken them, so that their device's resend of
        them is taken again (here or on the other node) instead of being seen as a repeat."""
        first: dict[str, int] = {}
        for r in rows:
            if r.seq < first.get(r.device_id, r.seq + 1):
                first[r.device_id] = r.seq
        for did, seq in first.items():
            high = self._high.get(did)
            if high is None or high < seq:
                continue
            self._high[did] = max(self._durable.get(did, 0), seq - 1)
            recent = self._recent.get(did)
            if recent is not None:
                for s in range(max(self._high[did] + 1, high - RECENT_READINGS + 1), high + 1):
                    if recent.seqs[s & _SLOT] == s & _LOW:
                        recent.seqs[s & _SLOT] = 0

    def expect(self, pid: str, devices: list[str]) -> None:
        """This node took ``pid``'s stream over (services/cluster.py): its devices that the
        stream shows online are expected here, like after a restart."""
        now = self.clock()
        for did in devices:
            self._expected.setdefault(did, (pid, now))

    def let_go(self, pid: str) -> None:
        """Another node writes ``pid``'s stream now: its devices are not expected here."""
        for did in [d for d, (p, _) in self._expected.items() if p == pid]:
            del self._expected[did]

    def check_silence(self) -> list[str]:
        """Mark devices silent past their interval ``offline`` (a gap marker); return their ids.

        The connection may still be open (a frozen device still answers pings): what matters to a
        clinician is that no data comes. The next reading marks it ``online`` again.
        """
        now = self.clock()
        gone = []
        if self._expected:
            window = SILENCE_FACTOR * self.max_silence_s
            for did, (pid, since) in list(self._expected.items()):
                if now - since > window:
                    del self._expected[did]
                    if did not in self.sessions:
                        why = (
                            "not back after server restart"
                            if self.claim is None
                            else "not back after its node stopped"
                        )
                        self._status_of(pid, did, "offline", why)
                        gone.append(did)
        for session in self.sessions.values():
            if not session.silent and now - session.last_data > session.silence_s:
                session.silent = True
                self._status(session, "offline", "silent")
                gone.append(session.device_id)
        return gone

    def goodbye(self, session: DeviceSession, reason: str) -> None:
        """The device's connection ended."""
        if session.ack_timer is not None:
            session.ack_timer.cancel()
            session.ack_timer = None
        if self.sessions.get(session.device_id) is session:
            del self.sessions[session.device_id]
            self._go_offline(session, reason)

    def _go_offline(self, session: DeviceSession, reason: str) -> None:
        if not session.silent:  # a silent device is already marked offline
            self._status(session, "offline", reason)

    def _status(self, session: DeviceSession, status: str, reason: str | None = None) -> None:
        if session.patient_id is None:
            return
        firmware = session.firmware if status == "online" else None
        self._status_of(session.patient_id, session.device_id, status, reason, firmware)

    def _status_of(
        self,
        pid: str,
        did: str,
        status: str,
        reason: str | None = None,
        firmware: str | None = None,
    ) -> None:
        data: dict[str, object] = {"device": did, "status": status}
        if reason is not None:
            data["reason"] = reason
        if firmware is not None:
            data["firmware"] = firmware
        now = self.clock()
        events = [self.streams.new_event(ev.patient_stream(pid), ev.DEVICE_STATUS, now, data)]
        alert_rows: list[AlertRow] = []
        if self.alerts is not None:
            more, alert_rows = self.alerts.on_device_status(pid, did, status, now, reason)
            events.extend(more)
        self.writer.submit([], events, alerts=alert_rows)

    async def revoke(self, did: str, why: str) -> None:
        """The device was disabled or its secret rotated: end its session (close 4001, ``why``)
        unless the session authenticated with the device's current secret after the change."""
        self._changes[did] = self._changes.get(did, 0) + 1
        session = self.sessions.get(did)
        if session is None:
            return
        row = await self.store.get_device(did)
        if self.sessions.get(did) is not session:
            return  # replaced meanwhile by a session that authenticated after the change
        if row is None or row["disabled"] or row["secret_hash"] != session.secret_hash:
            session.close(Close.UNAUTHENTICATED, why)

    def _on_binding_change(self, did: str, pid: str | None, old: str | None = None) -> None:
        self._changes[did] = self._changes.get(did, 0) + 1
        if old is not None and old != pid and self.alerts is not None:
            # the device's technical alerts stay with the patient it left: end them there
            events, rows = self.alerts.on_device_status(old, did, "unbound", self.clock())
            if events:
                self.writer.submit([], events, alerts=rows)
        session = self.sessions.get(did)
        if session is not None and session.patient_id != pid:
            session.patient_id = pid
            self._status(session, "online")
