"""The GraphQL schema: the same data as REST, through the same services.

Access: every patient is checked with ``access.allowed(who, VIEW, pid)`` before any of it is
returned; an out-of-team patient is ``null`` with a ``not_found`` error, as if it did not exist
(never partly returned). Reads are audited once per root field (one row per request for a
one-field query), with the action names REST uses. Limits: depth, aliases, tokens and a cost per
root field (:data:`FIELD_COST`, :data:`MAX_COST`), so a nested query cannot load the store; the
history lives on the root only (a list of patients cannot ask for one history per patient).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Iterator
from typing import TYPE_CHECKING, Annotated, Any, Final

import msgspec
import strawberry
from graphql import GraphQLError, ValidationRule
from graphql.language import FieldNode
from strawberry.extensions import (
    AddValidationRules,
    MaxAliasesLimiter,
    MaxTokensLimiter,
    QueryDepthLimiter,
    SchemaExtension,
)
from strawberry.scalars import JSON
from strawberry.types import Info

from vitalwire.core import access as policy
from vitalwire.core import events as ev
from vitalwire.core.errors import Forbidden, InvalidMessage, NotFound, PeerError, Unauthenticated
from vitalwire.services.commands import command_lifecycle, list_commands
from vitalwire.transports.errors import public_message, row_for
from vitalwire.transports.graphql.loaders import Loaders, live_picture
from vitalwire.transports.graphql.subscriptions import (
    FastFrames,
    SlowConsumer,
    fast_events,
    stream_events,
)
from vitalwire.transports.paging import DEFAULT_PAGE, MAX_PAGE, decode_cursor, encode_cursor
from vitalwire.wire import SendCommand

if TYPE_CHECKING:
    from vitalwire.services.auth import Principal
    from vitalwire.services.container import Services

log = logging.getLogger("vitalwire.graphql")

#: The deepest selection a query may make (``patients { devices { id } }`` is 3).
MAX_DEPTH: Final = 4
#: Aliases per operation (each alias of a root field would be one more read).
MAX_ALIASES: Final = 15
#: Tokens per document (bounds parsing and validation work).
MAX_TOKENS: Final = 2000
#: The cost of a field: the root fields that read the store cost more; every other field 1.
FIELD_COST: Final[dict[str, int]] = {
    "history": 50,
    "alerts": 20,
    "commands": 20,
    "news2History": 20,
    "events": 20,
    "patients": 10,
    "devices": 10,
    "careTeams": 10,
    "command": 10,
    "limits": 2,
}
#: The most an operation may cost (e.g. 3 histories and a ward's patients with their picture).
MAX_COST: Final = 250
#: The ``list_patients`` audit row names the patients listed up to this many (always the count).
AUDIT_LISTED_IDS: Final = 100


# -- context ------------------------------------------------------------------------------------


def _svc(info: Info) -> Services:
    svc: Services = info.context["svc"]
    return svc


def _who(info: Info) -> Principal:
    """The user as they are now (a token revoked since the request began is refused)."""
    who: Principal | None = info.context.get("who")
    if who is None:
        raise Unauthenticated("Authorization: Bearer <token> is required", field="authorization")
    return _svc(info).access.current_now(who)


def _origin(info: Info) -> str | None:
    origin: str | None = info.context.get("origin")
    return origin


def _loaders(info: Info) -> Loaders:
    loaders: Loaders | None = info.context.get("loaders")
    if loaders is None:
        loaders = info.context["loaders"] = Loaders(_svc(info))
    return loaders


def _limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidMessage(f"limit must be between 1 and {MAX_PAGE}, got {limit}", field="limit")
    return limit


def _check(info: Info, who: Principal, action: str, attempted: str, pid: str | None) -> None:
    """``access.check``, a refusal audited (as REST's ``_check``)."""
    svc = _svc(info)
    try:
        svc.access.check(who, action, pid)
    except Forbidden as exc:
        svc.access.refused(who.name, attempted, pid, exc.message, _origin(info))
        raise


def _refused(info: Info, who: Principal, attempted: str, pid: str | None, exc: Forbidden) -> None:
    _svc(info).access.refused(who.name, attempted, pid, exc.message, _origin(info))


# -- types --------------------------------------------------------------------------------------


@strawberry.type
class Device:
    id: str
    kind: str
    disabled: bool
    patient_id: str | None
    #: online/offline as of the patient's live picture (``null``: unbound or never seen)
    status: JSON | None


@strawberry.type
class Patient:
    id: str
    name: str
    ward: str
    device_ids: list[str]

    @strawberry.field(description="The devices bound to the patient (one store read per request).")
    async def devices(self, info: Info) -> list[Device]:
        rows = await _loaders(info).device.load_many(self.device_ids)
        picture = live_picture(_svc(info), self.id)["devices"]
        return [
            Device(
                id=r["id"],
                kind=r["kind"],
                disabled=bool(r["disabled"]),
                patient_id=r["patient_id"],
                status=picture.get(r["id"]),
            )
            for r in rows
            if r is not None
        ]

    @strawberry.field(description="Latest value per metric (live picture: no store query).")
    def vitals(self, info: Info) -> JSON:
        return live_picture(_svc(info), self.id)["vitals"]

    @strawberry.field(description="Latest NEWS2 score and band (live picture), or null.")
    def news2(self, info: Info) -> JSON | None:
        return live_picture(_svc(info), self.id)["news2"]

    @strawberry.field(description="Open alerts (live picture: no store query).")
    def open_alerts(self, info: Info) -> JSON:
        return live_picture(_svc(info), self.id)["alerts"]

    @strawberry.field(description="Stream head: resume a subscription after it.")
    def offset(self, info: Info) -> int:
        return _svc(info).streams.head(ev.patient_stream(self.id))

    @strawberry.field(description="The alarm limits in force (in memory).")
    def limits(self, info: Info) -> JSON:
        return _svc(info).alerts.limits(self.id)


def _patient(row: dict[str, Any]) -> Patient:
    return Patient(
        id=row["id"], name=row["name"], ward=row["ward"], device_ids=list(row.get("devices", ()))
    )


@strawberry.type
class Alert:
    alert_id: str
    patient_id: str
    condition: str
    priority: str
    category: str
    state: str
    raised_at: float
    updated_at: float
    acknowledged_at: float | None
    acknowledged_by: str | None
    resolved_at: float | None
    escalation_level: int


@strawberry.type
class AlertPage:
    items: list[Alert]
    next_cursor: str | None


@strawberry.type
class StreamEvent:
    stream: str
    offset: int
    kind: str
    ts: float
    data: JSON


@strawberry.type
class EventPage:
    items: list[StreamEvent]
    next_cursor: str | None
    head: int | None = None
    recovered: bool = True


@strawberry.type
class VitalsHistory:
    patient_id: str
    t_from: float
    t_to: float
    metrics: list[str]
    bucket: float | None
    items: JSON
    buckets: JSON | None
    gaps: JSON
    next_cursor: str | None


@strawberry.type
class CommandPage:
    items: JSON
    next_cursor: str | None


def _event(e: Any) -> StreamEvent:
    return StreamEvent(stream=e.stream, offset=e.offset, kind=e.kind, ts=e.ts, data=e.data)


def _offset_cursor(cursor: str | None) -> int:
    position = decode_cursor(cursor)
    if position is None:
        return 0
    offset = position.get("offset")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise InvalidMessage("cursor is not a cursor this server gave", field="cursor")
    return offset


# -- queries ------------------------------------------------------------------------------------


@strawberry.type
class Query:
    @strawberry.field(description="The patients the user may see (optionally of one ward).")
    async def patients(self, info: Info, ward: str | None = None) -> list[Patient]:
        svc, who = _svc(info), _who(info)
        loaders = _loaders(info)
        rows = await svc.store.list_patients()
        for r in rows:  # later patient(id) reads of this request need no store query
            loaders.patient.prime(r["id"], r)
        seen = [
            r
            for r in rows
            if (ward is None or r["ward"] == ward) and svc.access.allowed(who, policy.VIEW, r["id"])
        ]
        detail: dict[str, Any] = {
            "count": len(seen),
            "patients": [r["id"] for r in seen[:AUDIT_LISTED_IDS]],
            "via": "graphql",
        }
        svc.access.audit(who.name, "list_patients", None, detail, _origin(info))
        return [_patient(r) for r in seen]

    @strawberry.field(description="One patient; null with a not_found error when not visible.")
    async def patient(self, info: Info, id: str) -> Patient | None:
        svc, who = _svc(info), _who(info)
        ev.check_id("id", id)
        row = await _loaders(info).patient.load(id)
        if row is None or not svc.access.allowed(who, policy.VIEW, id):
            if row is not None:
                svc.access.refused(who.name, "view_patient", id, "not in care", _origin(info))
            raise NotFound(f"patient {id} does not exist", field="id")
        detail: dict[str, Any] = {"via": "graphql"}
        if svc.access.via_break_glass(who, id):
            detail["flag"] = "break_glass"
        svc.access.audit(who.name, "view_patient", id, detail, _origin(info))
        return _patient(row)

    @strawberry.field(description="Alerts newest first, filtered; cursor-paged (limit <= 1000).")
    async def alerts(
        self,
        info: Info,
        patient_id: str | None = None,
        state: str | None = None,
        priority: str | None = None,
        since: float | None = None,
        until: float | None = None,
        cursor: str | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> AlertPage:
        svc, who = _svc(info), _who(info)
        _limit(limit)
        position = decode_cursor(cursor)
        after: tuple[float, str] | None = None
        if position is not None:
            ts, aid = position.get("raised_at"), position.get("alert_id")
            if not isinstance(ts, (int, float)) or not isinstance(aid, str):
                raise InvalidMessage("cursor is not a cursor this server gave", field="cursor")
            after = (float(ts), aid)
        if since is not None and until is not None and since >= until:
            raise InvalidMessage("since must be before until", field="since")
        if patient_id is not None:
            await _visible(info, who, patient_id, "list_alerts")
        filters = {
            "patient": patient_id,
            "state": state,
            "priority": priority,
            "since": since,
            "until": until,
        }
        rows = await svc.alerts.list_alerts(who, filters, after, limit, _origin(info))
        next_cursor = None
        if len(rows) == limit:
            last = rows[-1]
            next_cursor = encode_cursor(
                {"raised_at": last["raised_at"], "alert_id": last["alert_id"]}
            )
        fields = set(Alert.__annotations__)
        return AlertPage(
            items=[Alert(**{k: r.get(k) for k in fields}) for r in rows], next_cursor=next_cursor
        )

    @strawberry.field(description="Vitals in a range: raw (cursor-paged) or in buckets.")
    async def history(
        self,
        info: Info,
        patient_id: str,
        t_from: Annotated[float | None, strawberry.argument(name="from")] = None,
        t_to: Annotated[float | None, strawberry.argument(name="to")] = None,
        metrics: list[str] | None = None,
        bucket: float | None = None,
        cursor: str | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> VitalsHistory:
        who = _who(info)
        await _visible(info, who, patient_id, "vitals_history")
        if metrics is not None and len(metrics) > 32:
            raise InvalidMessage("metrics may name at most 32 metrics", field="metrics")
        r = await _svc(info).history.vitals(
            who, patient_id, t_from, t_to, metrics, bucket, cursor, _limit(limit), _origin(info)
        )
        return VitalsHistory(
            patient_id=r.patient_id,
            t_from=r.t_from,
            t_to=r.t_to,
            metrics=r.metrics,
            bucket=r.bucket,
            items=r.items,
            buckets=r.buckets,
            gaps=r.gaps,
            next_cursor=r.next_cursor,
        )

    @strawberry.field(description="A patient's NEWS2 changes (oldest first), cursor-paged.")
    async def news2_history(
        self,
        info: Info,
        patient_id: str,
        t_from: Annotated[float | None, strawberry.argument(name="from")] = None,
        t_to: Annotated[float | None, strawberry.argument(name="to")] = None,
        cursor: str | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> EventPage:
        who = _who(info)
        await _visible(info, who, patient_id, "news2_history")
        if t_from is not None and t_to is not None and t_from >= t_to:
            raise InvalidMessage("from must be before to", field="from")
        events, more = await _svc(info).alerts.news2_history(
            who, patient_id, t_from, t_to, _offset_cursor(cursor), _limit(limit), _origin(info)
        )
        return EventPage(
            items=[_event(e) for e in events],
            next_cursor=None if more is None else encode_cursor({"offset": more}),
        )

    @strawberry.field(description="A patient's stream events after an offset (limit <= 1000).")
    async def events(
        self, info: Info, patient_id: str, after: int = 0, limit: int = DEFAULT_PAGE
    ) -> EventPage:
        who = _who(info)
        await _visible(info, who, patient_id, "read_events")
        if after < 0:
            raise InvalidMessage("after must be at least 0", field="after")
        events, head, recovered = await _svc(info).alerts.stream_events(
            who, patient_id, after, _limit(limit), _origin(info)
        )
        last = events[-1].offset if events else after
        return EventPage(
            items=[_event(e) for e in events],
            next_cursor=encode_cursor({"offset": last}) if last < head else None,
            head=head,
            recovered=recovered,
        )

    @strawberry.field(description="Commands (latest state) newest first; cursor-paged.")
    async def commands(
        self,
        info: Info,
        patient_id: str | None = None,
        device_id: str | None = None,
        status: str | None = None,
        cursor: str | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> CommandPage:
        svc, who = _svc(info), _who(info)
        _limit(limit)
        position = decode_cursor(cursor)
        after: tuple[float, str] | None = None
        if position is not None:
            ts, cid = position.get("created_at"), position.get("command_id")
            if not isinstance(ts, (int, float)) or not isinstance(cid, str):
                raise InvalidMessage("cursor is not a cursor this server gave", field="cursor")
            after = (float(ts), cid)
        if patient_id is not None:
            await _visible(info, who, patient_id, "list_commands")
        filters = {"patient": patient_id, "device": device_id, "status": status}
        # the service checks, filters to the user's patients and audits (as REST /commands)
        rows = await list_commands(svc.store, svc.access, who, filters, after, limit, _origin(info))
        next_cursor = None
        if len(rows) == limit:
            last = rows[-1]
            next_cursor = encode_cursor(
                {"created_at": last["created_at"], "command_id": last["command_id"]}
            )
        return CommandPage(items=rows, next_cursor=next_cursor)

    @strawberry.field(description="One command with every status it went through.")
    async def command(self, info: Info, command_id: str) -> JSON | None:
        svc, who = _svc(info), _who(info)
        try:
            return await command_lifecycle(svc.store, svc.access, who, command_id, _origin(info))
        except Forbidden:  # audited by the service; out of the care team: as if it did not exist
            raise NotFound(f"command {command_id} does not exist", field="command_id") from None

    @strawberry.field(description="Devices: every one for admins, else those of visible patients.")
    async def devices(self, info: Info) -> list[Device]:
        svc, who = _svc(info), _who(info)
        rows = await svc.store.list_devices()
        out = []
        for r in rows:
            pid = r["patient_id"]
            if who.role != "admin" and (
                pid is None or not svc.access.allowed(who, policy.VIEW, pid)
            ):
                continue
            status = live_picture(svc, pid)["devices"].get(r["id"]) if pid else None
            out.append(
                Device(
                    id=r["id"],
                    kind=r["kind"],
                    disabled=bool(r["disabled"]),
                    patient_id=pid,
                    status=status,
                )
            )
        svc.access.audit(who.name, "list_devices", None, {"count": len(out)}, _origin(info))
        return out

    @strawberry.field(description="Care teams: wards' members, assignments (admins only).")
    async def care_teams(self, info: Info) -> JSON:
        svc, who = _svc(info), _who(info)
        _check(info, who, policy.MANAGE, "care_teams", None)
        teams = await svc.store.care_teams(svc.clock())
        svc.access.audit(who.name, "care_teams", None, {"via": "graphql"}, _origin(info))
        return {
            "members": {u: sorted(w) for u, w in teams["wards"].items()},
            "assigned": {u: sorted(p) for u, p in teams["assigned"].items()},
            "wardOf": dict(teams["ward_of"]),
        }


async def _visible(info: Info, who: Principal, pid: str, attempted: str) -> None:
    """An out-of-team patient is not found, as if it did not exist (the refusal audited)."""
    ev.check_id("patient_id", pid)
    svc = _svc(info)
    row = await _loaders(info).patient.load(pid)
    if row is None:
        raise NotFound(f"patient {pid} does not exist", field="patient_id")
    if not svc.access.allowed(who, policy.VIEW, pid):
        svc.access.refused(who.name, attempted, pid, "not in care", _origin(info))
        raise NotFound(f"patient {pid} does not exist", field="patient_id")


# -- mutations ----------------------------------------------------------------------------------


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Acknowledge an open alert (audited ack_alert).")
    async def acknowledge_alert(self, info: Info, alert_id: str) -> JSON:
        svc, who = _svc(info), _who(info)
        try:
            return await svc.alerts.acknowledge(who, alert_id, _origin(info))
        except Forbidden as exc:
            _refused(info, who, "ack_alert", None, exc)
            raise

    @strawberry.mutation(description="Command a patient's device (audited command).")
    async def send_command(
        self,
        info: Info,
        patient_id: str,
        name: str,
        args: JSON | None = None,
        device_id: str | None = None,
        idempotency_key: str | None = None,
        ttl_s: float | None = None,
        timeout_s: float | None = None,
    ) -> JSON:
        svc, who = _svc(info), _who(info)
        if args is not None and not isinstance(args, dict):
            raise InvalidMessage("args must be an object", field="args")
        if len(name) > 32:
            raise InvalidMessage("name must be at most 32 characters", field="name")
        req = SendCommand(
            patient_id=patient_id,
            name=name,
            args=args or {},
            device_id=device_id,
            idempotency_key=idempotency_key,
            ttl_s=ttl_s,
            timeout_s=timeout_s,
        )
        try:
            return await svc.commands.send(who, req, None, _origin(info))
        except Forbidden as exc:
            _refused(info, who, "command", patient_id, exc)
            raise

    @strawberry.mutation(description="Override alarm limits: {metric: {field: value|null}}.")
    async def set_limits(self, info: Info, patient_id: str, limits: JSON) -> JSON:
        svc, who = _svc(info), _who(info)
        if not isinstance(limits, dict) or len(limits) > 32:
            raise InvalidMessage("limits must be an object of at most 32 metrics", field="limits")
        for metric, fields in limits.items():
            if not isinstance(fields, dict):
                raise InvalidMessage(f"limits.{metric:.40} must be an object", field="limits")
        try:
            return await svc.alerts.set_limits(who, patient_id, limits, _origin(info))
        except Forbidden as exc:
            _refused(info, who, "set_limits", patient_id, exc)
            raise

    @strawberry.mutation(description="Record NEWS2 observations no device measures.")
    async def record_observations(
        self,
        info: Info,
        patient_id: str,
        on_oxygen: bool | None = None,
        consciousness: str | None = None,
        scale: int | None = None,
    ) -> JSON:
        svc, who = _svc(info), _who(info)
        if consciousness is not None and len(consciousness) > 32:
            raise InvalidMessage(
                "consciousness must be at most 32 characters", field="consciousness"
            )
        if scale is not None and scale not in (1, 2):
            raise InvalidMessage("scale must be 1 or 2", field="scale")
        body = {"on_oxygen": on_oxygen, "consciousness": consciousness, "scale": scale}
        try:
            return await svc.alerts.set_observations(who, patient_id, body, _origin(info))
        except Forbidden as exc:
            _refused(info, who, "set_observations", patient_id, exc)
            raise


# -- subscriptions ------------------------------------------------------------------------------


@strawberry.input(description="Resume a stream after this offset (an event's stream and offset).")
class StreamOffset:
    stream: str
    offset: int


async def _deliver(
    info: Info, who: Principal, streams: list[str], after: dict[str, int] | None
) -> AsyncGenerator[StreamEvent, None]:
    """The events of ``streams`` (subscriptions.py): over graphql-transport-ws with a plain
    selection, written to the socket as ready ``next`` frames (:class:`FastFrames`, nothing
    yielded); otherwise yielded for GraphQL to execute."""
    fast = FastFrames.of(info)
    if fast is not None:
        await fast_events(_svc(info), who, streams, after, _origin(info), fast)
        return
    source = stream_events(_svc(info), who, streams, after, _origin(info))
    async for frames in source:
        for frame in frames:
            e = msgspec.json.decode(frame)
            yield StreamEvent(
                stream=e["stream"], offset=e["offset"], kind=e["kind"], ts=e["ts"], data=e["data"]
            )


@strawberry.type
class Subscription:
    @strawberry.subscription(
        description="A patient's stream events after offset `after` (from now without it), live."
    )
    async def patient_events(
        self, info: Info, patient_id: str, after: int | None = None
    ) -> AsyncGenerator[StreamEvent, None]:
        who = _who(info)
        await _visible(info, who, patient_id, "subscribe")
        stream = ev.patient_stream(patient_id)
        async for e in _deliver(info, who, [stream], None if after is None else {stream: after}):
            yield e

    @strawberry.subscription(
        description="Several patients' stream events in one subscription (as one `/ws` client): "
        "each stream after its offset in `after` (from now for a stream not named there), live. "
        "Each event carries its stream and offset: resume with the last of each stream."
    )
    async def patients_events(
        self, info: Info, patient_ids: list[str], after: list[StreamOffset] | None = None
    ) -> AsyncGenerator[StreamEvent, None]:
        who = _who(info)
        ids = list(dict.fromkeys(patient_ids))
        most = _svc(info).settings.max_streams_per_connection
        if not 1 <= len(ids) <= most:
            raise InvalidMessage(
                f"patientIds must name between 1 and {most} patients, got {len(ids)}",
                field="patientIds",
            )
        for pid in ids:
            ev.check_id("patient_id", pid)
        await _loaders(info).patient.load_many(ids)  # one store read for all of them
        for pid in ids:
            await _visible(info, who, pid, "subscribe")
        streams = [ev.patient_stream(pid) for pid in ids]
        since: dict[str, int] = {}
        for position in after or ():
            if position.stream not in streams:
                raise InvalidMessage(
                    f"after names {position.stream!r}, which is not the stream of a patient "
                    f"in patientIds",
                    field="after",
                )
            since[position.stream] = position.offset
        async for e in _deliver(info, who, streams, since):
            yield e

    @strawberry.subscription(
        description="The alerts stream, filtered to the patients the user may see."
    )
    async def ward_alerts(
        self, info: Info, after: int | None = None
    ) -> AsyncGenerator[StreamEvent, None]:
        who = _who(info)
        streams = [ev.ALERTS_STREAM]
        async for e in _deliver(info, who, streams, None if after is None else {streams[0]: after}):
            yield e


# -- limits and errors --------------------------------------------------------------------------


class CostRule(ValidationRule):
    """Refuses an operation whose fields cost more than :data:`MAX_COST` (:data:`FIELD_COST`)."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.cost = 0
        self.reported = False

    def enter_field(self, node: FieldNode, *_args: Any) -> None:
        self.cost += FIELD_COST.get(node.name.value, 1)
        if self.cost > MAX_COST and not self.reported:
            self.reported = True
            self.report_error(
                GraphQLError(
                    f"query cost must be at most {MAX_COST} (history 50, alerts/commands/"
                    f"events/news2History 20, patients/devices/careTeams 10, other fields 1)",
                    nodes=[node],
                    extensions={"code": "invalid_message", "field": "query"},
                )
            )


def _public(error: GraphQLError) -> GraphQLError:
    """The error as a peer may see it: ``extensions.code`` from transports/errors.py (the codes
    of REST and the socket), ``extensions.field``; anything unexpected is ``internal`` and its
    details stay in the server log."""
    original = error.original_error
    if original is None:  # syntax, validation, limits: the message is about the query itself
        ext = dict(error.extensions or {})
        ext.setdefault("code", "invalid_message")
        ext.setdefault("field", "query")
        code, message = ext["code"], error.message
    elif isinstance(original, SlowConsumer):
        code, message = "slow_consumer", original.message
        ext = {"code": code, "field": original.field}
    elif isinstance(original, PeerError):
        code, message = row_for(original).code, public_message(original)
        ext = {"code": code, "field": original.field}
    else:
        log.error("internal error in a GraphQL resolver", exc_info=original)
        code, message = "internal", "internal error"
        ext = {"code": code, "field": None}
    return GraphQLError(
        message,
        nodes=error.nodes,
        source=error.source,
        positions=error.positions,
        path=error.path,
        extensions=ext,
    )


class PublicErrors(SchemaExtension):
    """Maps every error of a result with :func:`_public`."""

    def on_operation(self) -> Iterator[None]:
        self._streamed = False
        yield
        if self._streamed:
            return
        result = self.execution_context.result
        errors = getattr(result, "errors", None)
        if errors:
            result.errors = [_public(e) for e in errors]  # type: ignore[union-attr]

    def on_stream_result(self, result: Any) -> Iterator[None]:
        """Each result of a subscription (and of an operation over the socket)."""
        self._streamed = True
        errors = getattr(result, "errors", None)
        if errors:
            result.errors = [_public(e) for e in errors]
        yield None

    def on_execute(self) -> Iterator[None]:
        # a new request's loaders (a WebSocket connection's context lives for many operations)
        context = self.execution_context.context
        if isinstance(context, dict) and "svc" in context:
            context["loaders"] = Loaders(context["svc"])
        yield


class Schema(strawberry.Schema):
    """Strawberry's schema, logging only what is not a peer's error (a refused or bad request
    is answered, not logged as a server fault; the audit log has the refusals)."""

    def process_errors(self, errors: list[GraphQLError], execution_context: Any = None) -> None:
        unexpected = [
            e
            for e in errors
            if e.original_error is not None and not isinstance(e.original_error, PeerError)
        ]
        if unexpected:
            super().process_errors(unexpected, execution_context)


schema = Schema(
    query=Query,
    mutation=Mutation,
    subscription=Subscription,
    extensions=[
        lambda: QueryDepthLimiter(max_depth=MAX_DEPTH),
        lambda: MaxAliasesLimiter(max_alias_count=MAX_ALIASES),
        lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
        lambda: AddValidationRules([CostRule]),
        PublicErrors,
    ],
)
