"""The one wire codec: msgspec Structs for every message, shared by transports, SDK and simulator.

Every message is a JSON object with a ``type``. Requests may carry an ``id``; the reply echoes it.
docs/protocol.md is the reference for each message; this module is its implementation.

Decoding checks shape and types only (and rejects unknown fields, so a misspelt metric is an error,
not silently dropped). Physical bounds live in :mod:`vitalwire.core.metrics` so a bad value in a
batch rejects that reading alone.

What a peer may send freely is bounded here, at decode time, so nothing downstream (the event's
encoding, the store, a restart) meets a value it cannot handle: free-form JSON (``command_result``
``data``, a command's ``args``) by depth and size, integers to 64 bits, strings the server keeps or
forwards by length. Readings carry no free-form field: their decoding costs nothing more.
"""

from __future__ import annotations

import re
import sys
from typing import Annotated, Any, Final

import msgspec

from vitalwire.core.errors import InvalidMessage
from vitalwire.core.metrics import METRIC_BY_NAME, check_bound

PROTOCOL_VERSION = 1


class Close:
    """WebSocket close codes: the one table (docs/protocol.md lists the same)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down: reconnect (to another instance) and resume
    MESSAGE_TOO_BIG = 1009  # past the hard frame limit: the server cannot even read it
    INTERNAL_ERROR = 1011  # unexpected server failure
    TRY_AGAIN_LATER = 1013  # the server is shutting down and takes no new sessions
    UNAUTHENTICATED = 4001  # missing/wrong credential, first message not auth/hello, or revoked
    AUTH_TIMEOUT = 4002  # no auth/hello within the auth timeout
    FORBIDDEN = 4003  # reserved for access control
    HEARTBEAT_TIMEOUT = 4004  # nothing received for 3 heartbeat intervals
    SLOW_CONSUMER = 4008  # send queue full: reconnect and resume from the last offset
    REPLACED = 4009  # the same device connected again; this connection is superseded
    IDENTITY_CONFLICT = 4010  # two live units use one device identity: new sessions refused
    RATE_LIMITED = 4029  # reserved for rate limits
    #: /graphql (graphql-transport-ws's own code for Forbidden): the token was refused at
    #: connection_init, the user is past their connection limit, or their access was taken back
    GRAPHQL_FORBIDDEN = 4403


_opts: dict[str, Any] = {"tag_field": "type", "forbid_unknown_fields": True, "omit_defaults": True}

#: Free-form JSON from a peer (``command_result.data``, a command's ``args``) nests at most this
#: many levels (the field's own object is level 1) ...
MAX_DEPTH: Final = 16
#: ... and holds at most this many values in all (members and elements, nested ones included).
MAX_ITEMS: Final = 1000
#: Integers from a peer (ids, offsets, free-form values): 64-bit signed, as the store keeps them.
INT_MIN: Final = -(2**63)
INT_MAX: Final = 2**63 - 1
Int64 = Annotated[int, msgspec.Meta(ge=INT_MIN, le=INT_MAX)]
#: A device's ``command_result.message`` (a note for people) is cut to this many characters.
MAX_NOTE: Final = 500
#: Strings the server keeps or forwards, bounded in characters (checked at decode time).
Str64 = Annotated[str, msgspec.Meta(max_length=64)]
Str256 = Annotated[str, msgspec.Meta(max_length=256)]
Str4096 = Annotated[str, msgspec.Meta(max_length=4096)]


def check_free_form(field: str, value: dict[str, Any] | list[Any]) -> None:
    """Raise :class:`InvalidMessage` naming ``field`` and the bound unless decoded JSON ``value``
    nests at most ``MAX_DEPTH`` levels, holds at most ``MAX_ITEMS`` values and its integers fit
    in 64 bits.

    A loop, not recursion: the check must not itself fail on what it guards against."""
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(value, 1)]
    items = 0
    while stack:
        node, depth = stack.pop()
        children = node.values() if type(node) is dict else node
        items += len(children)
        if items > MAX_ITEMS:
            raise InvalidMessage(
                f"{field} must hold at most {MAX_ITEMS} values (nested ones included)", field=field
            )
        for child in children:
            kind = type(child)
            if kind is dict or kind is list:
                if depth >= MAX_DEPTH:
                    raise InvalidMessage(
                        f"{field} must nest at most {MAX_DEPTH} levels deep", field=field
                    )
                stack.append((child, depth + 1))
            elif kind is int and not INT_MIN <= child <= INT_MAX:
                raise InvalidMessage(
                    f"{field} must hold integers between {INT_MIN} and {INT_MAX}", field=field
                )


# --------------------------------------------------------------------------------------------
# Device <-> server
# --------------------------------------------------------------------------------------------


class ReadingBody(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One measurement set: ``seq`` (per device, only grows), device time ``ts`` (epoch s)."""

    seq: int
    ts: float
    spo2: float | None = None
    pulse: float | None = None
    hr: float | None = None
    rr: float | None = None
    temp_c: float | None = None
    sbp: float | None = None
    dbp: float | None = None
    pi: float | None = None
    battery: float | None = None
    probe: bool | None = None

    def values(self) -> dict[str, float | None]:
        return {
            "spo2": self.spo2,
            "pulse": self.pulse,
            "hr": self.hr,
            "rr": self.rr,
            "temp_c": self.temp_c,
            "sbp": self.sbp,
            "dbp": self.dbp,
            "pi": self.pi,
            "battery": self.battery,
        }


class Hello(msgspec.Struct, tag="hello", **_opts):
    device_id: str
    secret: Str256
    #: Copied into every ``device_status`` ``online`` event.
    firmware: Str64 | None = None
    last_seq: Int64 | None = None
    #: The longest the device may stay silent (report by exception); past it (x1.5) it is "silent".
    max_silence_s: float | None = None
    protocol: Int64 = PROTOCOL_VERSION
    #: ``"seed"``: the device then sends the seed's flat messages (see :data:`FORMATS`).
    format: Str64 | None = None


class Reading(ReadingBody, tag="reading", **_opts):
    pass


class Readings(msgspec.Struct, tag="readings", **_opts):
    items: list[ReadingBody]


class Ping(msgspec.Struct, tag="ping", **_opts):
    id: Int64 | None = None
    ts: float | None = None


class Pong(msgspec.Struct, tag="pong", **_opts):
    id: Int64 | None = None
    ts: float | None = None


class CommandResult(msgspec.Struct, tag="command_result", **_opts):
    """A device's answer to a command: ``acknowledged`` (working on it), then ``completed`` or
    ``failed`` (with a ``message``); ``data`` carries any result, within ``MAX_DEPTH`` and
    ``MAX_ITEMS`` (checked here, so a device SDK learns it before sending, as the server does
    when decoding). A longer ``message`` is cut: it is a note for people, and refusing a final
    answer for its length would leave the command unsettled."""

    command_id: str
    status: str
    message: str | None = None
    data: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.data is not None:
            check_free_form("data", self.data)
        if self.message is not None and len(self.message) > MAX_NOTE:
            self.message = self.message[: MAX_NOTE - 1] + "…"


class Waveform(msgspec.Struct, tag="waveform", **_opts):
    """A chunk of samples at ``rate_hz`` starting at device time ``ts`` (for ``request_data``)."""

    ts: float
    rate_hz: float
    samples: list[float]
    kind: str = "pleth"
    #: Not checked, but kept in the ``waveform`` event.
    command_id: Str64 | None = None


DeviceMessage = Hello | Reading | Readings | CommandResult | Waveform | Ping | Pong


class Welcome(msgspec.Struct, tag="welcome", tag_field="type", forbid_unknown_fields=True):
    server_time: float
    #: Every reading up to this seq is durable: resend only those after it.
    last_seq: int
    #: The highest seq the server has received from this device (durable, pending or rejected).
    #: A device that restarted without its spool numbers new readings after it.
    high_seq: int = 0
    patient_id: str | None = None
    heartbeat_s: float = 15.0
    max_frame_bytes: int = 65536
    max_batch: int = 500
    protocol: int = PROTOCOL_VERSION


class Command(msgspec.Struct, tag="command", **_opts):
    """Server -> device: run a command and answer with ``command_result``."""

    command_id: str
    name: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    timeout_s: float | None = None


class Ack(msgspec.Struct, tag="ack", **_opts):
    """Every reading with a seq up to and including ``seq`` is durable."""

    seq: int


class Error(msgspec.Struct, tag="error", **_opts):
    code: str
    message: str
    field: str | None = None
    id: int | None = None
    seq: int | None = None


# --------------------------------------------------------------------------------------------
# Client <-> server
# --------------------------------------------------------------------------------------------


class Auth(msgspec.Struct, tag="auth", **_opts):
    token: Str4096
    id: Int64 | None = None


class Subscribe(msgspec.Struct, tag="subscribe", **_opts):
    streams: list[str]
    since: dict[str, Int64] | None = None
    #: Send several queued events in one ``events`` frame (for this whole connection).
    batch: bool = False
    #: ``"seed"``: one patient stream as the seed's flat frames, pushed on change (no events).
    format: Str64 | None = None
    id: Int64 | None = None


class Unsubscribe(msgspec.Struct, tag="unsubscribe", **_opts):
    streams: list[str]
    id: Int64 | None = None


class AckAlert(msgspec.Struct, tag="ack_alert", **_opts):
    alert_id: str
    id: Int64 | None = None


class SetLimits(msgspec.Struct, tag="set_limits", **_opts):
    """Override a patient's alarm limits: {metric: {field: value}}; ``null`` restores a default."""

    patient_id: str
    limits: dict[str, dict[str, float | None]]
    id: Int64 | None = None


class GetLimits(msgspec.Struct, tag="get_limits", **_opts):
    patient_id: str
    id: Int64 | None = None


class SetObservations(msgspec.Struct, tag="set_observations", **_opts):
    """Patient observations for NEWS2 that no device measures."""

    patient_id: str
    on_oxygen: bool | None = None
    consciousness: str | None = None
    scale: Int64 | None = None
    id: Int64 | None = None


class SendCommand(msgspec.Struct, tag="command", **_opts):
    """Client -> server: command a patient's device (``device_id`` when it has several)."""

    patient_id: str
    name: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    device_id: str | None = None
    idempotency_key: str | None = None
    ttl_s: float | None = None
    timeout_s: float | None = None
    id: Int64 | None = None

    def __post_init__(self) -> None:
        if self.args:
            check_free_form("args", self.args)


class BreakGlass(msgspec.Struct, tag="break_glass", **_opts):
    """Open a patient outside your care for a limited time, with a stated reason (audited)."""

    patient_id: str
    reason: str
    id: Int64 | None = None


ClientMessage = (
    Auth
    | Subscribe
    | Unsubscribe
    | AckAlert
    | SetLimits
    | GetLimits
    | SetObservations
    | SendCommand
    | BreakGlass
    | Ping
    | Pong
)


class Result(msgspec.Struct, tag="result", tag_field="type", forbid_unknown_fields=True):
    id: int | None = None
    ok: bool = True
    data: Any = None


class StreamStart(msgspec.Struct, omit_defaults=False):
    """Where a subscription starts: the snapshot as of ``offset``; ``recovered`` for ``since``."""

    stream: str
    offset: int
    recovered: bool
    snapshot: Any = None
    replayed: int = 0


class Subscribed(msgspec.Struct, tag="subscribed", **_opts):
    streams: list[StreamStart]
    id: int | None = None


class EventFrame(msgspec.Struct, tag="event", tag_field="type"):
    stream: str
    offset: int
    kind: str
    ts: float
    data: msgspec.Raw


class Events(msgspec.Struct, tag="events", tag_field="type"):
    """Several events in one frame, in order (clients that subscribed with ``batch``)."""

    items: list[EventFrame]


class Unsubscribed(msgspec.Struct, tag="unsubscribed", **_opts):
    """Server -> client: the server ended these subscriptions because the right to watch them
    ended (break-glass expired, taken off the care team, a role change); nothing more of them
    follows. ``code`` is an error code (``forbidden``), ``reason`` says why, for people."""

    streams: list[str]
    code: str
    reason: str


ServerToClient = Result | Subscribed | EventFrame | Events | Unsubscribed | Error | Ping | Pong
ServerToDevice = Welcome | Ack | Command | Error | Ping | Pong


# --------------------------------------------------------------------------------------------
# Seed compatibility: the seed's flat ``{"oxygen_level": 98, "heart_rate": 72}``
# --------------------------------------------------------------------------------------------


class SeedMessage(msgspec.Struct, forbid_unknown_fields=True):
    """The seed's flat message: both fields required, nothing else (no type, seq or time)."""

    oxygen_level: float
    heart_rate: float


#: Flat formats: format name -> ((flat field, metric, UCUM unit), ...). Units are the metric's
#: own (core/metrics.py); the flat message carries none.
FORMATS: Final[dict[str, tuple[tuple[str, str, str], ...]]] = {
    "seed": (("oxygen_level", "spo2", "%"), ("heart_rate", "hr", "/min")),
}
_flat_decoders = {"seed": msgspec.json.Decoder(SeedMessage)}


def check_format(field: str, value: str | None) -> None:
    """Raise :class:`InvalidMessage` naming ``field`` unless ``value`` is absent or a format."""
    if value is not None and value not in FORMATS:
        raise InvalidMessage(
            f"{field} must be one of: {', '.join(FORMATS)} (or absent), got {value!r:.40}",
            field=field,
        )


def decode_flat(fmt: str, data: bytes | str) -> dict[str, float]:
    """A flat message of format ``fmt`` as metric -> value, each within its metric's bounds.

    Raises :class:`InvalidMessage` (not JSON, a missing or unknown field, a wrong type) or
    :class:`~vitalwire.core.errors.InvalidReading` (a value out of bounds), naming the flat
    field (``oxygen_level``, not ``spo2``) and the bound."""
    msg = _decode(_flat_decoders[fmt], data, "")
    out: dict[str, float] = {}
    for flat, name, _unit in FORMATS[fmt]:
        value = getattr(msg, flat)
        metric = METRIC_BY_NAME[name]
        if not metric.low <= value <= metric.high:
            check_bound(flat, value, metric.low, metric.high)
        out[name] = value
    return out


def _flat_number(value: float | None) -> float | int | None:
    return int(value) if value is not None and value.is_integer() else value


def encode_flat(fmt: str, values: dict[str, float | None]) -> str:
    """The flat frame of ``fmt`` for metric values (``None``: not known yet); whole numbers as
    integers, as the seed sends them: ``{"oxygen_level":97,"heart_rate":72}``."""
    return encode_text({flat: _flat_number(values.get(name)) for flat, name, _ in FORMATS[fmt]})


# --------------------------------------------------------------------------------------------
# Events inside the server
# --------------------------------------------------------------------------------------------


class Event(msgspec.Struct, gc=False):
    """One committed stream event. ``frame`` is encoded once and sent as-is to every subscriber.

    Not tracked by the garbage collector (``gc=False``): the bus keeps up to a thousand events
    per stream for replay, millions in a hospital, and the collector scanning them would stall
    the event loop for seconds. An event refers to no object that can refer back to it, so it
    can never be part of a reference cycle.
    """

    stream: str
    offset: int
    kind: str
    ts: float
    data_json: bytes
    _data: dict[str, Any] | None = None
    _frame: str | None = None
    _coalesce: tuple[str, object, frozenset[str]] | None = None

    @property
    def data(self) -> dict[str, Any]:
        """The event's body; an event read back from the store decodes it on first use only
        (a replay sends the stored JSON as it is)."""
        if self._data is None:
            self._data = msgspec.json.decode(self.data_json)
        return self._data

    @property
    def frame(self) -> str:
        """The frame sent to clients, encoded once for all of them."""
        if self._frame is None:
            self._frame = self.replay_frame()
        return self._frame

    def replay_frame(self) -> str:
        """The frame, not kept (a replay from the bus history, whose events have shed theirs:
        :meth:`shed`)."""
        if self._frame is not None:
            return self._frame
        return _encoder.encode(
            EventFrame(self.stream, self.offset, self.kind, self.ts, msgspec.Raw(self.data_json))
        ).decode()

    @property
    def coalesce_key(self) -> tuple[str, object, frozenset[str]]:
        """Readings with the same key come from the same device and carry the same metrics:
        the later one supersedes the earlier."""
        if self._coalesce is None:
            metrics = frozenset(self.data.keys() - _READING_META)
            self._coalesce = (self.stream, self.data.get("device"), metrics)
        return self._coalesce

    def shed(self) -> None:
        """Drop what ``data_json`` gives again on demand: the decoded body, the frame and the
        coalescing key. Called once the event is folded and fanned out (the clients' queues hold
        their frame already); the bus history then keeps it for replays, which encode its frame
        again (about a microsecond), and these three would be more than half of what it holds
        (docs/architecture.md)."""
        self._data = None
        self._frame = None
        self._coalesce = None

    @classmethod
    def new(cls, stream: str, offset: int, kind: str, ts: float, data: dict[str, Any]) -> Event:
        return cls(stream, offset, kind, ts, _encoder.encode(data), data)

    @classmethod
    def from_stored(cls, stream: str, offset: int, kind: str, ts: float, data_json: bytes) -> Event:
        return cls(stream, offset, kind, ts, data_json)


# --------------------------------------------------------------------------------------------
# Codec
# --------------------------------------------------------------------------------------------

_READING_META = frozenset({"device", "seq", "ts"})
_encoder = msgspec.json.Encoder()
_device_decoder = msgspec.json.Decoder(DeviceMessage)
_client_decoder = msgspec.json.Decoder(ClientMessage)
_server_to_client = msgspec.json.Decoder(ServerToClient)
_server_to_device = msgspec.json.Decoder(ServerToDevice)

_PATH_RE = re.compile(r" - at `\$(?:\.([A-Za-z_][\w]*))?((?:\[\d+\]|\[\.\.\.\]|\.\w+)*)`$")
_NAMED_RE = re.compile(r"(?:unknown|required) field `(\w+)`")
_TYPE_HINT = {
    DeviceMessage: "hello, reading, readings, command_result, waveform, ping, pong",
    ClientMessage: (
        "auth, subscribe, unsubscribe, ack_alert, set_limits, get_limits, set_observations, "
        "command, break_glass, ping, pong"
    ),
}


def encode(msg: Any) -> bytes:
    """Encode a message (a Struct, dict or list) to JSON bytes."""
    return _encoder.encode(msg)


def encode_text(msg: Any) -> str:
    return _encoder.encode(msg).decode()


#: A JSON string (with its key's colon, if it is one) or a bracket: enough to follow nesting.
_TOKEN_RE = re.compile(rb'"([^"\\]*(?:\\.[^"\\]*)*)"\s*(:)?|[\[{]|[\]}]')
_OUT_OF_RANGE = f"numbers must be finite, at most {sys.float_info.max:.4g} in magnitude"


def _too_deep(data: bytes | str) -> str | None:
    """The top-level field whose value nests past ``MAX_DEPTH``, from the raw frame.

    Only for a frame the decoder gave up on (it nests about a thousand levels): a frame this deep
    is bad whatever it is, and naming its field must not recurse either."""
    raw = data.encode() if isinstance(data, str) else data
    depth = 0
    key = None
    for m in _TOKEN_RE.finditer(raw):
        token = m.group()
        if token in b"[{":
            depth += 1
            if depth > MAX_DEPTH + 1:  # the message's own object is depth 1
                return key
        elif token in b"]}":
            depth -= 1
        elif depth == 1 and m.group(2):
            key = m.group(1).decode(errors="replace")
    return None


def _decode(decoder: msgspec.json.Decoder[Any], data: bytes | str, kinds: str) -> Any:
    try:
        return decoder.decode(data)
    except RecursionError:
        field = _too_deep(data)
        what = field or "a message"
        raise InvalidMessage(
            f"{what} must nest at most {MAX_DEPTH} levels deep", field=field
        ) from None
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = _PATH_RE.search(text)
        field = None
        if m:
            path = (m.group(1) or "") + (m.group(2) or "").replace("[...]", "")
            field = path or None
            text = text[: m.start()]
        if text == "Number out of range":
            text = _OUT_OF_RANGE
        named = _NAMED_RE.search(text)
        if named:
            inner = named.group(1)
            field = f"{field}.{inner}" if field else inner
        if kinds and (field == "type" or text.startswith("Object missing required field `type`")):
            raise InvalidMessage(f"type must be one of: {kinds}", field="type") from None
        where = f" (at {field})" if field else ""
        raise InvalidMessage(f"{text}{where}", field=field) from None
    except msgspec.DecodeError as exc:
        raise InvalidMessage(f"malformed JSON: {exc}") from None


def decode_device(data: bytes | str) -> Any:
    """Decode a device -> server message; raise :class:`InvalidMessage` naming the field."""
    return _decode(_device_decoder, data, _TYPE_HINT[DeviceMessage])


def decode_client(data: bytes | str) -> Any:
    """Decode a client -> server message; raise :class:`InvalidMessage` naming the field."""
    return _decode(_client_decoder, data, _TYPE_HINT[ClientMessage])


def decode_from_server_to_client(data: bytes | str) -> Any:
    """Used by the SDK's MonitorClient."""
    return _server_to_client.decode(data)


def decode_from_server_to_device(data: bytes | str) -> Any:
    """Used by the SDK's DeviceClient."""
    return _server_to_device.decode(data)


# --------------------------------------------------------------------------------------------
# The edge uplink (/ws/edge): an edge node forwards its streams to the cloud, the cloud sends
# clinicians' requests down (docs/protocol.md, "Edge uplink"; services/uplink.py, edges.py)
# --------------------------------------------------------------------------------------------

EDGE_PROTOCOL: Final = 1
#: Events per ``edge_events`` frame, at most (the edge sends fewer).
EDGE_MAX_EVENTS: Final = 2000
#: Patients per ``edge_patients`` frame, at most.
EDGE_MAX_PATIENTS: Final = 5000


class EdgeHello(msgspec.Struct, tag="edge_hello", **_opts):
    """Edge -> cloud, first: the node's name (a device of kind ``edge`` at the cloud) and secret."""

    node: Str64
    secret: Str256
    protocol: int = EDGE_PROTOCOL


class EdgePatient(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    id: Str64
    name: Str256
    ward: Str64
    #: discharged at the edge (when, and by whom): the cloud's record says so too
    discharged_at: float | None = None
    discharged_by: Str64 | None = None


class EdgePatients(msgspec.Struct, tag="edge_patients", **_opts):
    """Edge -> cloud: patients whose streams this edge owns (all of them, or new ones)."""

    items: Annotated[list[EdgePatient], msgspec.Meta(max_length=EDGE_MAX_PATIENTS)]


class EdgeEvents(msgspec.Struct, tag="edge_events", tag_field="type"):
    """Edge -> cloud: committed events, in each stream's order, with the edge's offsets.
    ``backlog``: events committed at the edge and not yet acknowledged by the cloud."""

    items: Annotated[list[EventFrame], msgspec.Meta(max_length=EDGE_MAX_EVENTS)]
    backlog: int = 0


class EdgeStatus(msgspec.Struct, tag="edge_status", **_opts):
    """Edge -> cloud, every second: what it has not yet had acknowledged."""

    backlog: int
    streams: int


class EdgeReply(msgspec.Struct, tag="edge_reply", **_opts):
    """Edge -> cloud: the answer to an ``edge_call`` (``result``, or ``error``)."""

    id: int
    result: Any = None
    error: Error | None = None


class EdgeWelcome(msgspec.Struct, tag="edge_welcome", **_opts):
    """Cloud -> edge: accepted; send ``edge_patients`` next."""

    server_time: float
    node: str


class EdgeHeads(msgspec.Struct, tag="edge_heads", **_opts):
    """Cloud -> edge: for each claimed patient stream, the last offset the cloud holds (send
    what follows); ``refused``: patients the cloud will not take from this edge, and why."""

    heads: dict[str, int]
    refused: dict[str, str] = msgspec.field(default_factory=dict)


class EdgeAck(msgspec.Struct, tag="edge_ack", **_opts):
    """Cloud -> edge: these streams are durable at the cloud up to these offsets."""

    heads: dict[str, int]


class EdgeCall(msgspec.Struct, tag="edge_call", **_opts):
    """Cloud -> edge: a clinician's request the cloud authorised (``op``: ``command``,
    ``ack_alert``, ``set_limits``, ``set_observations``)."""

    id: int
    op: str
    who: str
    role: str
    patient_id: str
    args: dict[str, Any]
    origin: str | None = None


EdgeToCloud = EdgeHello | EdgePatients | EdgeEvents | EdgeStatus | EdgeReply | Ping | Pong
CloudToEdge = EdgeWelcome | EdgeHeads | EdgeAck | EdgeCall | Error | Ping | Pong
_edge_decoder = msgspec.json.Decoder(EdgeToCloud)
_cloud_decoder = msgspec.json.Decoder(CloudToEdge)
_TYPE_HINT[EdgeToCloud] = (  # type: ignore[index]
    "edge_hello, edge_patients, edge_events, edge_status, edge_reply, ping, pong"
)


def decode_edge(data: bytes | str) -> Any:
    """Decode an edge -> cloud message; raise :class:`InvalidMessage` naming the field."""
    return _decode(_edge_decoder, data, _TYPE_HINT[EdgeToCloud])  # type: ignore[index]


def decode_cloud(data: bytes | str) -> Any:
    """Decode a cloud -> edge message (the edge's uplink)."""
    return _cloud_decoder.decode(data)


def edge_events_frame(frames: list[str], backlog: int) -> str:
    """An ``edge_events`` frame of events' own frames, as they are (no re-encoding)."""
    return f'{{"type":"edge_events","backlog":{backlog},"items":[{",".join(frames)}]}}'
