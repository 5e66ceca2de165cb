"""REST for what a client does over the socket (issue 26): a patient's alarm limits (read,
change), NEWS2 observations (record) and the patient's stream events after an offset. Access
checks and audit live in the services (services/alerts.py); these routes only translate HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field

from vitalwire.core.errors import Forbidden, InvalidMessage
from vitalwire.services.alerts import limit_sources
from vitalwire.services.auth import Principal
from vitalwire.transports.errors import error_responses
from vitalwire.transports.paging import DEFAULT_PAGE, MAX_PAGE, decode_cursor, encode_cursor
from vitalwire.transports.rest import PatientId, _origin, principal, services
from vitalwire.wire import SendCommand

router = APIRouter(tags=["clinical"])

#: The one error shape (transports/errors.py ErrorBody), for every status a route answers.
_ERRORS = error_responses(401, 403, 404, 422)
_ERRORS_409 = error_responses(401, 403, 404, 409, 422)


@contextmanager
def _refusal_audited(
    request: Request, who: Principal, attempted: str, pid: str | None, **detail: Any
) -> Iterator[None]:
    """A service that leaves refusals to its caller (set_limits, set_observations: the socket
    audits every refused message in one place) has them audited here the same way."""
    try:
        yield
    except Forbidden as exc:
        services(request).access.refused(
            who.name, attempted, pid, exc.message, _origin(request), **detail
        )
        raise


class PatientLimits(BaseModel):
    patient_id: str
    limits: dict[str, dict[str, Any]]
    #: per metric and field, ``"default"`` (the default adult table) or ``"patient"`` (set for
    #: this patient): services/alerts.py ``limit_sources``
    sources: dict[str, dict[str, str]] = Field(default_factory=dict)


class SetLimitsBody(BaseModel):
    """As the socket's ``set_limits``: ``{metric: {field: value}}``; ``null`` restores a default."""

    limits: dict[str, dict[str, float | None]] = Field(max_length=32)


class ObservationsBody(BaseModel):
    """As the socket's ``set_observations``: what no device measures (NEWS2)."""

    on_oxygen: bool | None = None
    consciousness: str | None = Field(None, max_length=32)
    scale: int | None = Field(None, ge=1, le=2)


class PatientObservations(BaseModel):
    patient_id: str
    observations: dict[str, Any]


@router.get("/patients/{patient_id}/limits", response_model=PatientLimits, responses=_ERRORS)
async def get_limits(
    patient_id: PatientId, request: Request, who: Annotated[Principal, Depends(principal)]
) -> PatientLimits:
    """A patient's alarm limits (VIEW; audited ``get_limits``)."""
    svc = services(request)
    limits = await svc.alerts.get_limits(who, patient_id, _origin(request))
    return PatientLimits(patient_id=patient_id, limits=limits, sources=limit_sources(limits))


@router.put("/patients/{patient_id}/limits", response_model=PatientLimits, responses=_ERRORS)
async def put_limits(
    patient_id: PatientId,
    body: SetLimitsBody,
    request: Request,
    who: Annotated[Principal, Depends(principal)],
) -> PatientLimits:
    """Override a patient's limits (SET_LIMITS; audited ``set_limits``; a ``settings`` event on
    the patient's stream, as the socket's ``set_limits``)."""
    svc = services(request)
    with _refusal_audited(request, who, "set_limits", patient_id):
        limits = await svc.alerts.set_limits(who, patient_id, body.limits, _origin(request))
    return PatientLimits(patient_id=patient_id, limits=limits, sources=limit_sources(limits))


@router.get(
    "/patients/{patient_id}/observations", response_model=PatientObservations, responses=_ERRORS
)
async def get_observations(
    patient_id: PatientId, request: Request, who: Annotated[Principal, Depends(principal)]
) -> PatientObservations:
    """A patient's NEWS2 observations as recorded (VIEW; audited ``get_observations``): a value
    never recorded is absent (NEWS2 counts it missing)."""
    svc = services(request)
    obs = await svc.alerts.get_observations(who, patient_id, _origin(request))
    return PatientObservations(patient_id=patient_id, observations=obs)


@router.post(
    "/patients/{patient_id}/observations", response_model=PatientObservations, responses=_ERRORS
)
async def post_observations(
    patient_id: PatientId,
    body: ObservationsBody,
    request: Request,
    who: Annotated[Principal, Depends(principal)],
) -> PatientObservations:
    """Record NEWS2 observations (OBSERVE; audited ``set_observations``); returns them merged."""
    svc = services(request)
    with _refusal_audited(request, who, "set_observations", patient_id):
        obs = await svc.alerts.set_observations(
            who, patient_id, body.model_dump(), _origin(request)
        )
    return PatientObservations(patient_id=patient_id, observations=obs)


class StreamEventOut(BaseModel):
    stream: str
    offset: int
    kind: str
    ts: float
    data: dict[str, Any]


class EventsPage(BaseModel):
    """A page of a patient's stream. ``next_cursor`` (or ``next_after``, the last offset given)
    asks for the next page; ``next_cursor`` is ``null`` once the page reaches ``head``.
    ``recovered`` is false when events after the offset asked for were removed by retention:
    the page then starts at the oldest event kept (as the socket's ``recovered: false``)."""

    items: list[StreamEventOut]
    next_cursor: str | None = None
    next_after: int
    head: int
    recovered: bool


@router.get("/patients/{patient_id}/events", response_model=EventsPage, responses=_ERRORS)
async def patient_events(
    patient_id: PatientId,
    request: Request,
    who: Annotated[Principal, Depends(principal)],
    after: int = Query(0, ge=0, le=2**62),
    cursor: str | None = None,
    limit: int = Query(DEFAULT_PAGE, ge=1, le=MAX_PAGE),
) -> EventsPage:
    """The events of ``patient:<id>`` with offsets after ``after`` (or after the ``cursor`` of a
    previous page), oldest first, up to ``limit`` (at most 1000). VIEW; audited ``read_events``."""
    if cursor is not None:
        after = _cursor_offset(cursor)
    svc = services(request)
    events, head, recovered = await svc.alerts.stream_events(
        who, patient_id, after, limit, _origin(request)
    )
    last = events[-1].offset if events else after
    return EventsPage(
        items=[
            StreamEventOut(stream=e.stream, offset=e.offset, kind=e.kind, ts=e.ts, data=e.data)
            for e in events
        ],
        next_cursor=encode_cursor({"offset": last}) if last < head else None,
        next_after=last,
        head=head,
        recovered=recovered,
    )


class AlertOut(BaseModel):
    alert_id: str
    patient_id: str
    condition: str
    priority: str
    category: str
    state: str
    raised_at: float
    updated_at: float
    acknowledged_at: float | None = None
    acknowledged_by: str | None = None
    resolved_at: float | None = None
    escalation_level: int
    #: What the alert's latest change said, for people ("SpO2 84 % below critical limit 85 %").
    message: str | None = None
    #: The metric and its value at the latest change (null for a device going offline).
    metric: str | None = None
    value: float | bool | None = None


class AlertsPage(BaseModel):
    items: list[AlertOut]
    next_cursor: str | None = None


@router.get("/alerts", response_model=AlertsPage, responses=_ERRORS)
async def list_alerts(
    request: Request,
    who: Annotated[Principal, Depends(principal)],
    patient: str | None = Query(None, max_length=64),
    state: str | None = Query(None, max_length=16),
    priority: str | None = Query(None, max_length=16),
    since: float | None = Query(None, ge=0, allow_inf_nan=False),
    until: float | None = Query(None, ge=0, allow_inf_nan=False),
    cursor: str | None = None,
    limit: int = Query(DEFAULT_PAGE, ge=1, le=MAX_PAGE),
) -> AlertsPage:
    """Alerts newest first (by raised_at) of the patients the user may see, or of ``patient``;
    filtered by ``state``, ``priority`` and raised_at in [``since``, ``until``). Cursor-paged,
    ``limit`` at most 1000. Audited ``list_alerts``."""
    position = decode_cursor(cursor)
    after: tuple[float, str] | None = None
    if position is not None:
        ts, aid = position.get("raised_at"), position.get("alert_id")
        if not isinstance(ts, (int, float)) or not isinstance(aid, str):
            raise InvalidMessage("cursor is not a cursor this server gave", field="cursor")
        after = (float(ts), aid)
    if since is not None and until is not None and since >= until:
        raise InvalidMessage("since must be before until", field="since")
    filters = {
        "patient": patient,
        "state": state,
        "priority": priority,
        "since": since,
        "until": until,
    }
    svc = services(request)
    rows = await svc.alerts.list_alerts(who, filters, after, limit, _origin(request))
    next_cursor = None
    if len(rows) == limit:
        last = rows[-1]
        next_cursor = encode_cursor({"raised_at": last["raised_at"], "alert_id": last["alert_id"]})
    return AlertsPage(items=[AlertOut(**r) for r in rows], next_cursor=next_cursor)


class Acknowledged(BaseModel):
    alert_id: str
    changes: list[dict[str, Any]]


@router.post(
    "/alerts/{alert_id}/acknowledge",
    response_model=Acknowledged,
    responses=_ERRORS_409,
)
async def acknowledge_alert(
    alert_id: Annotated[str, Path(min_length=1, max_length=128)],
    request: Request,
    who: Annotated[Principal, Depends(principal)],
) -> Acknowledged:
    """Acknowledge an open alert (ACKNOWLEDGE; audited ``ack_alert``); 404 when it is not open."""
    svc = services(request)
    with _refusal_audited(request, who, "ack_alert", None, alert_id=alert_id):
        changes = await svc.alerts.acknowledge(who, alert_id, _origin(request))
    return Acknowledged(alert_id=alert_id, changes=changes)


class News2Page(BaseModel):
    """``news2`` events (each one a change of the patient's NEWS2 score or band), oldest first;
    ``next_cursor`` is ``null`` once the whole stream was read."""

    items: list[StreamEventOut]
    next_cursor: str | None = None


@router.get("/patients/{patient_id}/news2", response_model=News2Page, responses=_ERRORS)
async def news2_history(
    patient_id: PatientId,
    request: Request,
    who: Annotated[Principal, Depends(principal)],
    t_from: float | None = Query(None, alias="from", ge=0, allow_inf_nan=False),
    t_to: float | None = Query(None, alias="to", ge=0, allow_inf_nan=False),
    cursor: str | None = None,
    limit: int = Query(DEFAULT_PAGE, ge=1, le=MAX_PAGE),
) -> News2Page:
    """A patient's NEWS2 history: the ``news2`` events with ``from <= ts < to`` (epoch seconds;
    either may be left out). Cursor-paged, ``limit`` at most 1000. VIEW; audited
    ``news2_history``."""
    if t_from is not None and t_to is not None and t_from >= t_to:
        raise InvalidMessage("from must be before to", field="from")
    after = _cursor_offset(cursor)
    svc = services(request)
    events, more = await svc.alerts.news2_history(
        who, patient_id, t_from, t_to, after, limit, _origin(request)
    )
    return News2Page(
        items=[
            StreamEventOut(stream=e.stream, offset=e.offset, kind=e.kind, ts=e.ts, data=e.data)
            for e in events
        ],
        next_cursor=None if more is None else encode_cursor({"offset": more}),
    )


class CommandBody(BaseModel):
    """As the socket's ``command`` (docs/howto-commands.md), without ``patient_id`` (the path)."""

    name: str = Field(min_length=1, max_length=32)
    args: dict[str, Any] = Field(default_factory=dict, max_length=16)
    device_id: str | None = Field(None, max_length=64)
    idempotency_key: str | None = Field(None, min_length=1, max_length=128)
    ttl_s: float | None = Field(None, allow_inf_nan=False)
    timeout_s: float | None = Field(None, allow_inf_nan=False)


class CommandReply(BaseModel):
    command: dict[str, Any]


@router.post(
    "/patients/{patient_id}/commands",
    response_model=CommandReply,
    responses=_ERRORS_409,
)
async def send_command(
    patient_id: PatientId,
    body: CommandBody,
    request: Request,
    who: Annotated[Principal, Depends(principal)],
) -> CommandReply:
    """Command a patient's device (CommandService.send: validated, authorised, audited
    ``command``); answers the command queued, once durable. A REST caller holds no connection
    for its status events: it reads them on the patient's stream (``/events``)."""
    svc = services(request)
    req = SendCommand(patient_id=patient_id, **body.model_dump())
    with _refusal_audited(request, who, "command", patient_id, name=body.name):
        command = await svc.commands.send(who, req, None, _origin(request))
    return CommandReply(command=command)


def _cursor_offset(cursor: str | None) -> int:
    position = decode_cursor(cursor)
    if position is None:
        return 0
    offset = position.get("offset")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise InvalidMessage("cursor is not a cursor this server gave", field="cursor")
    return offset


__all__ = ["router"]
