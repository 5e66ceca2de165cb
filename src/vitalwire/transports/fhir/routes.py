"""FHIR R4, read-only, at ``/fhir``: a transport over the same services as REST.

Vitals come from :meth:`vitalwire.services.history.History.vitals` (VIEW checked, a refusal
audited, the read audited: one row per request); Patient and Device reads check VIEW the way the
REST routes do. What is FHIR's own here:

- responses are ``application/fhir+json``; errors are an ``OperationOutcome`` carrying the
  project's error code (``issue[0].details.coding``, system ``urn:vitalwire:error``) with the
  HTTP status of transports/errors.py, except that a bad search parameter is 400 (FHIR's rule)
  and a patient outside the caller's care is 404, like an unknown one (the refusal is audited);
- search parameters are handled strictly: one this server does not implement is a 400 naming it;
- paging: ``_count`` 1..1000 (default 100), a ``next`` link carrying an opaque ``_cursor``.

docs/api.md ("FHIR R4") documents it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from vitalwire import __version__
from vitalwire.core import access as policy
from vitalwire.core import events as ev
from vitalwire.core.errors import Forbidden, InvalidMessage, NotFound
from vitalwire.services.auth import Principal
from vitalwire.services.history import DEFAULT_RANGE_S
from vitalwire.transports.errors import public_message, row_for
from vitalwire.transports.fhir import mapping as fm
from vitalwire.transports.paging import DEFAULT_PAGE, MAX_PAGE, decode_cursor, encode_cursor
from vitalwire.transports.rest import _origin, principal, services

log = logging.getLogger("vitalwire.fhir")
MEDIA_TYPE: Final = "application/fhir+json"
#: ``_format`` values accepted (JSON is all this server writes).
JSON_FORMATS: Final = frozenset({"json", "application/json", "application/fhir+json"})


class FhirResponse(JSONResponse):
    media_type = MEDIA_TYPE


class BadParameter(InvalidMessage):
    """A search parameter this server cannot process: 400 with an OperationOutcome."""


def _outcome(exc: BaseException, request: Request) -> FhirResponse:
    """Any error as an OperationOutcome: the status of transports/errors.py (400 for a search
    parameter), the project's code, ``no-store``, and the REST headers (challenge, Retry-After)."""
    if isinstance(exc, RequestValidationError):
        code, status, message, field = "invalid_message", 400, "invalid request", None
    elif isinstance(exc, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        status, message, field = exc.status_code, str(exc.detail), None
    else:
        row = row_for(exc)
        code, status, message = row.code, row.http, public_message(exc)
        field = getattr(exc, "field", None)
        if isinstance(exc, BadParameter):
            status = 400
        if row.code == "internal":
            log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return FhirResponse(fm.operation_outcome(code, message, field), status, headers=headers)


class FhirRoute(APIRoute):
    """Every error raised under /fhir (dependencies included) becomes an OperationOutcome."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def fhir_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - every error is answered in FHIR's shape
                return _outcome(exc, request)

        return fhir_handler


router = APIRouter(prefix="/fhir", route_class=FhirRoute, include_in_schema=False)


# -- parameters ---------------------------------------------------------------------------------


class Params:
    """A request's query parameters, checked against what a route implements (handling=strict)."""

    def __init__(self, request: Request, allowed: Sequence[str]) -> None:
        self.items = list(request.query_params.multi_items())
        for name, value in self.items:
            if name == "_format":
                if value not in JSON_FORMATS:
                    raise BadParameter("_format: this server writes JSON only", field="_format")
                continue
            if name not in allowed:
                known = ", ".join(allowed)
                raise BadParameter(
                    f"search parameter {name!r:.40} is not supported here; supported: {known}",
                    field=name,
                )

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.items if k == name]

    def one(self, name: str) -> str | None:
        got = self.all(name)
        if len(got) > 1:
            raise BadParameter(f"{name} may be given once", field=name)
        return got[0] if got else None

    def count(self) -> int:
        raw = self.one("_count")
        if raw is None:
            return DEFAULT_PAGE
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
            raise BadParameter(f"_count must be between 1 and {MAX_PAGE}", field="_count")
        return int(raw)

    def cursor(self) -> dict[str, Any] | None:
        raw = self.one("_cursor")
        try:
            return decode_cursor(raw, "_cursor")
        except InvalidMessage as exc:
            raise BadParameter(exc.message, field="_cursor") from None


#: FHIR date prefixes implemented (http://hl7.org/fhir/R4/search.html#prefix).
PREFIXES: Final = ("ge", "gt", "le", "lt", "eq")


def date_bounds(
    values: Sequence[str], field: str, frm: float | None, to: float | None
) -> tuple[float | None, float | None]:
    """Narrow ``[frm, to)`` by FHIR date parameters (``ge2026-12-05``, ``lt...T10:00:00Z``...)."""
    for raw in values:
        prefix, text = (raw[:2], raw[2:]) if raw[:2] in PREFIXES else ("eq", raw)
        try:
            start, end = fm.parse_date(text)
        except ValueError as exc:
            raise BadParameter(f"{field}: {exc}", field=field) from None
        lo = {"ge": start, "gt": end, "eq": start}.get(prefix)
        hi = {"le": end, "lt": start, "eq": end}.get(prefix)
        if lo is not None:
            frm = lo if frm is None else max(frm, lo)
        if hi is not None:
            to = hi if to is None else min(to, hi)
    return frm, to


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _next_url(request: Request, cursor: str) -> str:
    """This request's URL with ``_cursor`` set to ``cursor`` (every other parameter kept)."""
    kept = [(k, v) for k, v in request.query_params.multi_items() if k != "_cursor"]
    return str(request.url.replace(query=urlencode([*kept, ("_cursor", cursor)])))


async def _who(request: Request) -> Principal:
    """The caller, by bearer token (401 without one), as the REST routes authenticate."""
    return await principal(request, Response(), request.headers.get("authorization"))


def _not_found(kind: str, fid: str) -> NotFound:
    return NotFound(f"{kind}/{fid:.64} is not known", field="id")


async def _viewable(request: Request, who: Principal, pid: str, attempted: str) -> dict[str, Any]:
    """The patient row, when ``who`` may VIEW it; NotFound otherwise (a refusal audited)."""
    svc = services(request)
    row = await svc.store.get_patient(pid) if ev.ID_RE.fullmatch(pid) else None
    if row is None:
        raise _not_found("Patient", fm.fhir_id(pid))
    try:
        svc.access.check(who, policy.VIEW, pid)
    except Forbidden as exc:
        svc.access.refused(who.name, attempted, pid, exc.message, _origin(request))
        raise _not_found("Patient", fm.fhir_id(pid)) from None
    return row


def _audit(request: Request, who: Principal, action: str, pid: str | None, **detail: Any) -> None:
    svc = services(request)
    if pid is not None and svc.access.via_break_glass(who, pid):
        detail["flag"] = "break_glass"
    svc.access.audit(who.name, action, pid, detail, _origin(request))


def _respond(body: dict[str, Any]) -> FhirResponse:
    return FhirResponse(body, headers={"Cache-Control": "no-store"})


# -- metadata -----------------------------------------------------------------------------------


@router.get("/metadata")
async def metadata(request: Request) -> FhirResponse:
    """The CapabilityStatement: public (FHIR), no patient data."""
    Params(request, ())
    date = fm.instant(time.time()).split("T")[0]
    return FhirResponse(fm.capability_statement(_base(request), date, __version__))


# -- Patient ------------------------------------------------------------------------------------


@router.get("/Patient")
async def search_patients(request: Request) -> FhirResponse:
    """The patients ``who`` may view (never others), by id, optionally filtered."""
    who = await _who(request)
    p = Params(request, ("_id", "active", "_lastUpdated", "_count", "_cursor"))
    count, position = p.count(), p.cursor()
    ids = {fm.vitalwire_id(v) for raw in p.all("_id") for v in raw.split(",")} or None
    active = p.one("active")
    if active not in (None, "true", "false"):
        raise BadParameter("active must be true or false", field="active")
    frm, to = date_bounds(p.all("_lastUpdated"), "_lastUpdated", None, None)
    after = position.get("id") if position else None
    if position is not None and not isinstance(after, str):
        raise BadParameter("_cursor is not a cursor this server gave", field="_cursor")
    svc = services(request)
    matched = []
    for row in await svc.store.list_patients():
        if not svc.access.allowed(who, policy.VIEW, row["id"]):
            continue
        if ids is not None and row["id"] not in ids:
            continue
        if active is not None and (row.get("discharged_at") is None) != (active == "true"):
            continue
        updated = max(row.get("created_at") or 0.0, row.get("discharged_at") or 0.0)
        if (frm is not None and updated < frm) or (to is not None and updated >= to):
            continue
        matched.append(row)
    page = [r for r in matched if after is None or r["id"] > after][:count]
    more = bool(page) and page[-1]["id"] != matched[-1]["id"]
    listed = [r["id"] for r in page]
    detail: dict[str, Any] = {"count": len(listed), "via": "fhir"}
    if len(listed) <= 100:
        detail["patients"] = listed
    svc.access.audit(who.name, "list_patients", None, detail, _origin(request))
    next_url = _next_url(request, encode_cursor({"id": page[-1]["id"]})) if more else None
    body = fm.bundle(
        [fm.patient(r) for r in page], _base(request), str(request.url), next_url, len(matched)
    )
    return _respond(body)


@router.get("/Patient/{fid}")
async def read_patient(fid: str, request: Request) -> FhirResponse:
    who = await _who(request)
    Params(request, ())
    pid = fm.vitalwire_id(fid)
    if pid is None:
        raise _not_found("Patient", fid)
    row = await _viewable(request, who, pid, "fhir_read")
    _audit(request, who, "fhir_read", pid, resource="Patient")
    return _respond(fm.patient(row))


# -- Device -------------------------------------------------------------------------------------


@router.get("/Device")
async def search_devices(request: Request) -> FhirResponse:
    """Devices by id: an admin sees every device; others the devices bound now to patients they
    may view. ``patient`` (once): the devices bound to that patient now (an out-of-team patient
    is not found, as everywhere)."""
    who = await _who(request)
    p = Params(request, ("_id", "patient", "_count", "_cursor"))
    count, position = p.count(), p.cursor()
    ids = {fm.vitalwire_id(v) for raw in p.all("_id") for v in raw.split(",")} or None
    only: str | None = None
    if p.all("patient"):
        if len(p.all("patient")) > 1:
            raise BadParameter("patient may be given once", field="patient")
        raw = p.all("patient")[0]
        only = fm.vitalwire_id(raw.removeprefix("Patient/"))
        if only is None or not ev.ID_RE.fullmatch(only):
            raise BadParameter(f"patient: {raw!r:.80} is not a Patient id", field="patient")
        await _viewable(request, who, only, "fhir_search")
    after = position.get("id") if position else None
    if position is not None and not isinstance(after, str):
        raise BadParameter("_cursor is not a cursor this server gave", field="_cursor")
    svc = services(request)
    admin = svc.access.allowed(who, policy.MANAGE)
    matched = []
    for row in await svc.store.list_devices():
        pid = row.get("patient_id")
        if only is not None and pid != only:
            continue
        if ids is not None and row["id"] not in ids:
            continue
        if not admin and (pid is None or not svc.access.allowed(who, policy.VIEW, pid)):
            continue
        matched.append(row)
    page = [r for r in matched if after is None or r["id"] > after][:count]
    more = bool(page) and page[-1]["id"] != matched[-1]["id"]
    _audit(
        request,
        who,
        "fhir_search",
        only,
        resource="Device",
        count=len(page),
        devices=[r["id"] for r in page][:100],
    )
    next_url = _next_url(request, encode_cursor({"id": page[-1]["id"]})) if more else None
    body = fm.bundle(
        [fm.device(r, r.get("patient_id")) for r in page],
        _base(request),
        str(request.url),
        next_url,
        len(matched),
    )
    return _respond(body)


@router.get("/Device/{fid}")
async def read_device(fid: str, request: Request) -> FhirResponse:
    """A device: an admin reads any; others one bound to a patient they may view (else 404)."""
    who = await _who(request)
    Params(request, ())
    svc = services(request)
    did = fm.vitalwire_id(fid)
    row = await svc.store.get_device(did) if did and ev.ID_RE.fullmatch(did) else None
    if row is None or did is None:
        raise _not_found("Device", fid)
    binding = await svc.store.active_binding(did)
    pid = binding.patient_id if binding else None
    if not svc.access.allowed(who, policy.MANAGE):
        if pid is None:
            raise _not_found("Device", fid)
        await _viewable(request, who, pid, "fhir_read")
    _audit(request, who, "fhir_read", pid, resource="Device", device=did)
    return _respond(fm.device(row, pid))


# -- Observation --------------------------------------------------------------------------------


@router.get("/Observation/{fid}")
async def read_observation(fid: str, request: Request) -> FhirResponse:
    who = await _who(request)
    Params(request, ())
    parsed = fm.parse_observation_id(fid)
    if parsed is None:
        raise _not_found("Observation", fid)
    pid, offset, key = parsed
    await _viewable(request, who, pid, "fhir_read")
    svc = services(request)
    events = await svc.store.events_after(ev.patient_stream(pid), offset - 1, 1)
    obs = None
    if events and events[0].offset == offset and events[0].kind == ev.READING:
        e = events[0]
        values = {k: v for k, v in e.data.items() if isinstance(v, int | float)}
        item = {
            "offset": e.offset,
            "ts": e.ts,
            "measured": e.data.get("ts"),
            "device": e.data.get("device"),
            "values": values,
        }
        found = fm.observations(pid, item, (fm.VITAL_BY_KEY[key],))
        obs = found[0] if found else None
    _audit(request, who, "fhir_read", pid, resource="Observation", offset=offset)
    if obs is None:
        raise _not_found("Observation", fid)
    return _respond(obs)


def _vitals_for(codes: Sequence[str]) -> tuple[fm.Vital, ...]:
    """The Observation kinds ``code`` values name (``8867-4`` or ``http://loinc.org|8867-4``)."""
    if not codes:
        return fm.VITALS
    chosen: list[fm.Vital] = []
    for raw in codes:
        for token in raw.split(","):
            system, _, code = token.rpartition("|")
            vital = fm.VITAL_BY_CODE.get(code)
            if (system and system != fm.LOINC) or vital is None:
                known = ", ".join(fm.VITAL_BY_CODE)
                raise BadParameter(
                    f"code: {token!r:.60} is not a code this server holds; LOINC codes: {known}",
                    field="code",
                )
            if vital not in chosen:
                chosen.append(vital)
    return tuple(v for v in fm.VITALS if v in chosen)


async def _observation_page(
    request: Request,
    who: Principal,
    pid: str,
    vitals: Sequence[fm.Vital],
    frm: float | None,
    to: float | None,
    count: int,
    position: dict[str, Any] | None,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of Observations (at most ``count``) from History.vitals, and the next cursor.

    A page of ``count`` readings gives at least ``count`` Observations; the cursor is the
    history cursor of that page (``h``, read ``n`` readings at a time) and how many of its
    Observations were already sent (``s``), so
    a page ends mid-reading without losing or repeating one. The range is fixed on the first
    page (``f``, ``t``), so the pages of one search agree whatever the clock does meanwhile.
    """
    svc = services(request)
    if position is not None:
        f, t, h, s, n = (position.get(k) for k in ("f", "t", "h", "s", "n"))
        if not (
            isinstance(f, int | float)
            and isinstance(t, int | float)
            and (h is None or isinstance(h, str))
            and isinstance(s, int)
            and s >= 0
            and isinstance(n, int)
            and 1 <= n <= MAX_PAGE
        ):
            raise BadParameter("_cursor is not a cursor this server gave", field="_cursor")
        frm, to, history_cursor, skip, readings = float(f), float(t), h, s, n
    else:
        to = svc.clock() if to is None else to
        frm = to - DEFAULT_RANGE_S if frm is None else frm
        history_cursor, skip, readings = None, 0, count
    metrics = [m for v in vitals for m in v.metrics]
    try:
        result = await svc.history.vitals(
            who, pid, frm, to, metrics, None, history_cursor, readings, _origin(request)
        )
    except Forbidden:  # refused and audited by the service; out of care reads as unknown
        raise _not_found("Patient", fm.fhir_id(pid)) from None
    except NotFound:
        raise _not_found("Patient", fm.fhir_id(pid)) from None
    except InvalidMessage as exc:
        field = {"from": "date", "to": "date", "limit": "_count", "cursor": "_cursor"}.get(
            exc.field or "", exc.field
        )
        raise BadParameter(exc.message, field=field) from None
    found = [o for item in result.items for o in fm.observations(pid, item, vitals)]
    page = found[skip : skip + count]
    if skip + count < len(found):
        nxt: dict[str, Any] | None = {"h": history_cursor, "s": skip + count}
    elif result.next_cursor is not None:
        nxt = {"h": result.next_cursor, "s": 0}
    else:
        nxt = None
    return page, None if nxt is None else encode_cursor({"f": frm, "t": to, "n": readings, **nxt})


def _patient_param(p: Params) -> str:
    given = [(n, v) for n in ("patient", "subject") for v in p.all(n)]
    if len(given) != 1:
        raise BadParameter(
            "patient (or subject) is required, once: Observation?patient=<id>", field="patient"
        )
    name, value = given[0]
    fid = value.removeprefix("Patient/")
    pid = fm.vitalwire_id(fid)
    if pid is None or not ev.ID_RE.fullmatch(pid):
        raise BadParameter(f"{name}: {value!r:.80} is not a Patient id", field=name)
    return pid


@router.get("/Observation")
async def search_observations(request: Request) -> FhirResponse:
    """A patient's vital-signs Observations in a time range (default: the last hour), in
    (receive time, offset) order, paged."""
    who = await _who(request)
    p = Params(request, ("patient", "subject", "code", "date", "_lastUpdated", "_count", "_cursor"))
    pid = _patient_param(p)
    vitals = _vitals_for(p.all("code"))
    frm, to = date_bounds(p.all("date"), "date", None, None)
    frm, to = date_bounds(p.all("_lastUpdated"), "_lastUpdated", frm, to)
    count, position = p.count(), p.cursor()
    if position is None:  # the defaults: up to now, an hour before the end
        to = services(request).clock() if to is None else to
        frm = to - DEFAULT_RANGE_S if frm is None else frm
    if position is None and frm is not None and to is not None and frm >= to:
        # an empty range (say, ge a time still to come): nothing matches
        await _viewable(request, who, pid, "vitals_history")
        _audit(request, who, "vitals_history", pid, count=0, via="fhir")
        return _respond(fm.bundle([], _base(request), str(request.url), None))
    page, cursor = await _observation_page(request, who, pid, vitals, frm, to, count, position)
    next_url = None if cursor is None else _next_url(request, cursor)
    return _respond(fm.bundle(page, _base(request), str(request.url), next_url))


@router.get("/Patient/{fid}/$everything")
async def patient_everything(fid: str, request: Request) -> FhirResponse:
    """The patient, their bound devices and their vital-signs Observations in ``start``..``end``
    (default: the last hour); the Patient and Devices on the first page only."""
    who = await _who(request)
    p = Params(request, ("start", "end", "_count", "_cursor"))
    pid = fm.vitalwire_id(fid)
    if pid is None or not ev.ID_RE.fullmatch(pid):
        raise _not_found("Patient", fid)
    frm, to = date_bounds([f"ge{v}" for v in p.all("start")], "start", None, None)
    frm, to = date_bounds([f"le{v}" for v in p.all("end")], "end", frm, to)
    count, position = p.count(), p.cursor()
    if frm is not None and to is not None and frm >= to:
        raise BadParameter("start must be before end", field="start")
    # History.vitals checks VIEW (refusal audited) and audits the read: one row for the request
    page, cursor = await _observation_page(request, who, pid, fm.VITALS, frm, to, count, position)
    entries: list[dict[str, Any]] = []
    if position is None:
        svc = services(request)
        row = await svc.store.get_patient(pid)
        if row is None:
            raise _not_found("Patient", fid)
        entries.append(fm.patient(row))
        for did in row.get("devices", []):
            device = await svc.store.get_device(did)
            if device is not None:
                entries.append(fm.device(device, pid))
    entries += page
    next_url = None if cursor is None else _next_url(request, cursor)
    return _respond(fm.bundle(entries, _base(request), str(request.url), next_url))


@router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def unknown(rest: str, request: Request) -> FhirResponse:
    """Anything else under /fhir, as an OperationOutcome: a write is 405 (this FHIR server is
    read-only), an unknown path 404."""
    if request.method != "GET":
        raise StarletteHTTPException(405, "this FHIR server is read-only: GET only")
    raise NotFound(f"{rest[:80]!r} is not a resource or operation this server implements")


__all__ = ["MEDIA_TYPE", "router"]
