"""REST: login, health, patients. Everything that is not a live stream."""

from __future__ import annotations

import hmac
import logging
import math
import time
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from vitalwire import __version__
from vitalwire.core import access as policy
from vitalwire.core import events as ev
from vitalwire.core.errors import Forbidden, InvalidMessage, PeerError, Unauthenticated
from vitalwire.services.auth import Principal
from vitalwire.services.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from vitalwire.transports.errors import error_responses, public_message, row_for

if TYPE_CHECKING:
    from vitalwire.services.container import Services

log = logging.getLogger("vitalwire.rest")
router = APIRouter()

#: The ``list_patients`` audit row names the patients listed up to this many (always the count).
AUDIT_LISTED_IDS = 100


#: A patient id in a path: an id (core/events.py ID_RE), anything else is refused (422) before
#: it reaches the store or the audit log.
PatientId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]


class LoginRequest(BaseModel):
    # a username is an id (core/events.py ID_RE): anything else cannot be one, and is refused
    # before it reaches the throttle, the store or the audit log
    username: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    password: str = Field(min_length=1, max_length=1024)


class TokenResponse(BaseModel):
    access_token: str
    refresh_token: str
    token_type: str = "bearer"
    expires_in: int
    role: str


class RefreshRequest(BaseModel):
    refresh_token: str = Field(min_length=1, max_length=4096)


class Health(BaseModel):
    status: str
    version: str
    db: str
    bus: str


class EdgeReach(BaseModel):
    """On a cloud, for an edge node's patient: the node, and whether it is connected now."""

    node: str
    connected: bool
    since: float | None = None


class Patient(BaseModel):
    id: str
    name: str
    ward: str
    devices: list[str]
    discharged_at: float | None = None
    #: an edge node's patient, on a cloud (docs/howto-edge.md); null otherwise
    edge: EdgeReach | None = None


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


async def principal(
    request: Request, response: Response, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    """The user behind the bearer token as they are now (current role; a deleted or disabled
    user, or a revoked token, is a 401). Every route behind it answers with patient data or the
    audit log: none of it may be kept by a cache."""
    svc = services(request)
    response.headers["Cache-Control"] = "no-store"
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthenticated("Authorization: Bearer <token> is required", field="authorization")
    return await svc.access.current(svc.tokens.verify(authorization[7:].strip(), svc.clock()))


def _origin(request: Request) -> str | None:
    return request.client.host if request.client else None


def _check(
    svc: Services, request: Request, who: Principal, action: str, attempted: str, pid: str | None
) -> None:
    """``access.check``, with a refusal audited (who, what, which patient, why)."""
    try:
        svc.access.check(who, action, pid)
    except Forbidden as exc:
        svc.access.refused(who.name, attempted, pid, exc.message, _origin(request))
        raise


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
async def healthz(request: Request) -> Any:
    """200 while the store takes writes; 503 ``degraded`` while commits fail (being retried)."""
    svc = services(request)
    failing = svc.writer.failing
    health = Health(
        status="degraded" if failing else "ok",
        version=__version__,
        db=svc.store.backend,
        bus=svc.bus.backend,
    )
    return JSONResponse(health.model_dump(), status_code=503) if failing else health


class Ready(BaseModel):
    status: str
    store: str
    bus: str
    migrations: str


def metrics_access(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """With ``metrics_token`` set, the metrics need ``Authorization: Bearer <metrics_token>``."""
    token = services(request).settings.metrics_token
    if not token:
        return
    given = (
        authorization[7:].strip()
        if authorization and authorization[:7].lower() == "bearer "
        else ""
    )
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthenticated(
            "Authorization: Bearer <metrics token> is required", field="authorization"
        )


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(metrics_access)],
    responses={200: {"content": {"text/plain": {}}}, **error_responses(401, 422)},
)
async def metrics(request: Request) -> Response:
    """Prometheus text format (services/metrics.py): counters and gauges, no health data."""
    svc = services(request)
    assert svc.metrics is not None
    return Response(svc.metrics.text(), media_type=METRICS_CONTENT_TYPE)


@router.get(
    "/metrics.json", dependencies=[Depends(metrics_access)], responses=error_responses(401, 422)
)
async def metrics_json(request: Request) -> dict[str, Any]:
    """Counters for `vitalwire bench` and scripts (no health data)."""
    svc = services(request)
    return {
        "rows_written": svc.writer.rows_written,
        "transactions": svc.store.transactions,
        "pending_rows": svc.writer.pending_rows,
        "device_connections": len(svc.ingest.sessions),
        "offline_pending": svc.alerts.offline_pending,
        # patient streams whose latest readings are rolled up in memory only (store/rollups.py)
        "rollups_held": len(held) if (held := getattr(svc.store, "rollups", None)) else 0,
        "conflicting_seqs": svc.ingest.conflicting_seqs,
        # the bus's replay history of recent events (bounded by bus_history and
        # bus_history_bytes; per stream, not per connection), estimated (bus/base.py)
        "bus_history_kb": (
            round(recent.bytes / 1024, 1) if (recent := getattr(svc.bus, "recent", None)) else 0
        ),
        "client_connections": len(svc.clients),
        "subscriptions": svc.streams.subscriber_count(),
        # the process's CPU (every thread) and resident memory: what `vitalwire bench --url`
        # reports for a server it did not start, which may run on another machine
        "process_cpu_s": round(time.process_time(), 3),
        "process_rss_kb": _rss_kb(),
    }


class EdgeNode(BaseModel):
    """An edge node known to this cloud (docs/howto-edge.md)."""

    node: str
    connected: bool
    patients: int
    since: float | None = None
    down_since: float | None = None
    last_seen_s: float | None = None
    #: events committed at the edge that this cloud has not yet made durable
    backlog: int | None = None
    #: how old the newest event of the edge's last frame was when it arrived (catch-up shows)
    lag_s: float | None = None
    events: int | None = None
    duplicates: int | None = None


class Uplink(BaseModel):
    """This node's own link to its cloud, when it is an edge node."""

    upstream: str
    node: str
    connected: bool
    since: float | None = None
    backlog: int | None = None
    refused: dict[str, str]
    last_error: str | None = None


class Edges(BaseModel):
    edges: list[EdgeNode]
    uplink: Uplink | None = None


@router.get("/edges", response_model=Edges, responses=error_responses(401, 422))
async def edges(who: Annotated[Principal, Depends(principal)], request: Request) -> Any:
    """The edge tier as this node sees it: the edge nodes that forward to it (connected or
    since when not, their backlog and lag) and, on an edge node, its own uplink."""
    svc = services(request)
    uplink = svc.uplink.status() if svc.uplink is not None else None
    return {"edges": svc.edges.status(), "uplink": uplink}


class ClusterNode(BaseModel):
    """A node that holds leases: how many patient streams it writes, whether it runs one of the
    once-per-cluster jobs (``singletons``: ``mqtt``), and whether its leases are alive."""

    node: str
    streams: int
    singletons: list[str]
    #: False once all its leases lapsed (it died or stopped, and nobody took them yet)
    alive: bool
    expires_at: float


class ClusterView(BaseModel):
    """Several nodes (docs/howto-cluster.md): this node's name and every node with leases."""

    cluster: bool
    node: str | None = None
    nodes: list[ClusterNode] = []


@router.get("/cluster", response_model=ClusterView, responses=error_responses(401, 422))
async def cluster(who: Annotated[Principal, Depends(principal)], request: Request) -> Any:
    """The cluster as the store's leases show it: which node writes how many patient streams,
    which runs the MQTT bridge, and which are alive. One node (no ``--cluster``):
    ``{"cluster": false}``."""
    svc = services(request)
    if svc.cluster is None:
        return {"cluster": False}
    now = svc.clock()
    nodes: dict[str, dict[str, Any]] = {}
    for node, kind, count, expires in await svc.store.lease_summary():
        row = nodes.setdefault(
            node, {"node": node, "streams": 0, "singletons": [], "expires_at": 0.0}
        )
        if kind == "patient":
            row["streams"] += count
        elif expires > now:
            row["singletons"].append(kind.removeprefix("singleton:"))
        row["expires_at"] = max(row["expires_at"], expires)
    for row in nodes.values():
        row["alive"] = row["expires_at"] > now
    return {"cluster": True, "node": svc.cluster.node, "nodes": list(nodes.values())}


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready}})
async def readyz(request: Request) -> Any:
    """200 when the store answers, its migrations are the code's and the bus answers; 503 naming
    what failed otherwise. ``/healthz`` is liveness."""
    svc = services(request)
    ready = Ready(status="ready", store="ok", bus="ok", migrations="ok")
    try:
        if not await svc.store.migration_current():
            ready.migrations = "behind"
    except Exception:
        log.warning("readyz: the store did not answer", exc_info=True)
        ready.store = ready.migrations = "unreachable"
    if not await svc.bus.ready():
        ready.bus = "unreachable"
    if (ready.store, ready.bus, ready.migrations) != ("ok", "ok", "ok"):
        ready.status = "not_ready"
        return JSONResponse(ready.model_dump(), status_code=503)
    return ready


def _rss_kb() -> int | None:
    """This process's resident memory (KB), from /proc; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


@router.post("/auth/login", response_model=TokenResponse, responses=error_responses(401, 422, 429))
async def login(body: LoginRequest, request: Request) -> TokenResponse:
    """Tokens for a username and password. The password check runs off the event loop, behind
    the login throttle: 429 with ``Retry-After`` (services/login.py, docs/security.md)."""
    svc = services(request)
    return _tokens(svc, await svc.login.login(body.username, body.password, _origin(request)))


def _tokens(svc: Services, who: Principal) -> TokenResponse:
    now = svc.clock()
    return TokenResponse(
        access_token=svc.tokens.issue(who, now),
        refresh_token=svc.tokens.issue(who, now, "refresh"),
        expires_in=int(svc.tokens.ttl_s),
        role=who.role,
    )


@router.post("/auth/refresh", response_model=TokenResponse, responses=error_responses(401, 422))
async def refresh(body: RefreshRequest, request: Request) -> TokenResponse:
    """A new access token (and refresh token) for a valid refresh token; the user's current role
    applies, and a deleted or disabled user, or a revoked token generation, gets none."""
    svc = services(request)
    claimed = svc.tokens.verify(body.refresh_token, svc.clock(), "refresh")
    return _tokens(svc, await svc.access.current(claimed))


@router.get("/patients", response_model=list[Patient], responses=error_responses(401, 422))
async def list_patients(
    request: Request,
    who: Annotated[Principal, Depends(principal)],
    include_discharged: bool = False,
) -> list[dict[str, Any]]:
    """The patients the user may see, with their bound devices; a discharged patient only with
    ``include_discharged=true`` (their history stays readable by their care team)."""
    svc = services(request)
    listed = [
        p
        for p in await svc.store.list_patients()
        if svc.access.allowed(who, policy.VIEW, p["id"])
        and (include_discharged or p.get("discharged_at") is None)
    ]
    detail: dict[str, Any] = {"count": len(listed)}
    if len(listed) <= AUDIT_LISTED_IDS:
        detail["patients"] = [p["id"] for p in listed]
    svc.access.audit(who.name, "list_patients", None, detail, _origin(request))
    for p in listed:
        reach = svc.edges.reachable(p["id"])
        if reach is not None:
            p["edge"] = reach
    return listed


@router.get("/patients/{patient_id}/alerts", responses=error_responses(401, 403, 404, 422))
async def patient_alerts(
    patient_id: PatientId,
    request: Request,
    who: Annotated[Principal, Depends(principal)],
    limit: int = Query(100, ge=1, le=1000),
) -> list[dict[str, Any]]:
    """Alert history of a patient, newest first: each alert's latest state."""
    svc = services(request)
    await svc.alerts.require_patient(patient_id)
    _check(svc, request, who, policy.VIEW, "alert_history", patient_id)
    rows = await svc.store.alerts_for(patient_id, limit)
    for r in rows:
        r.pop("last", None)
    detail: dict[str, Any] = {"count": len(rows)}
    if svc.access.via_break_glass(who, patient_id):
        detail["flag"] = "break_glass"
    svc.access.audit(who.name, "alert_history", patient_id, detail, _origin(request))
    return rows


@router.get("/audit", responses=error_responses(401, 403, 422))
async def audit_log(
    request: Request,
    who: Annotated[Principal, Depends(principal)],
    limit: int = Query(100, ge=1, le=1000),
    patient_id: str | None = Query(None, max_length=64),
    actor: str | None = Query(None, max_length=64, description="Only this actor's entries."),
    action: str | None = Query(None, max_length=64, description="Only this action's entries."),
    since: float | None = Query(None, description="Entries at or after this time (epoch s)."),
    until: float | None = Query(None, description="Entries before this time (epoch s)."),
    before: int | None = Query(
        None, ge=1, le=2**63 - 1, description="Entries with ids below this (the next page)."
    ),
) -> list[dict[str, Any]]:
    """The audit log, newest first (admins only), filtered by patient, actor, action and time;
    page on with ``before`` set to the last entry's ``id``."""
    svc = services(request)
    _check(svc, request, who, policy.READ_AUDIT, "read_audit", None)
    for name, value in (("since", since), ("until", until)):
        if value is not None and not math.isfinite(value):
            raise InvalidMessage(f"{name} must be a finite number, got {value}", field=name)
    if since is not None and until is not None and since >= until:
        raise InvalidMessage(f"since must be before until ({until}), got {since}", field="since")
    rows = await svc.store.audit_log(
        limit, patient_id, actor=actor, action=action, since=since, until=until, before=before
    )
    about = patient_id if patient_id is not None and ev.ID_RE.fullmatch(patient_id) else None
    svc.access.audit(who.name, "read_audit", about, {"count": len(rows)}, _origin(request))
    return rows


def _error_response(
    body: dict[str, Any], status: int, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error in the one shape; never cached (it may name a patient or quote what was sent)."""
    return JSONResponse(
        body, status_code=status, headers={"Cache-Control": "no-store", **(headers or {})}
    )


async def peer_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Every error body is ``{"code", "message", "field"}``; internals never leave the server."""
    row = row_for(exc)
    if row.code == "internal":
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    headers = {"WWW-Authenticate": "Bearer"} if row.http == 401 else None
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers = {"Retry-After": str(retry_after)}
    body = {"code": row.code, "message": public_message(exc), "field": getattr(exc, "field", None)}
    return _error_response(body, row.http, headers)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    field = ".".join(loc) or None
    message = f"{field}: {first.get('msg', 'invalid')}" if field else first.get("msg", "invalid")
    body = {"code": "invalid_message", "message": message, "field": field}
    return _error_response(body, 422)


#: FastAPI's HTTPException detail for a request body it could not decode.
BODY_NOT_PARSED = "There was an error parsing the body"


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == BODY_NOT_PARSED:
        # FastAPI's answer to a body it cannot decode: invalid input like any other (422)
        body = {"code": "invalid_message", "message": "body is not valid JSON", "field": "body"}
        return _error_response(body, 422)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    body = {"code": code, "message": str(exc.detail), "field": None}
    return _error_response(body, exc.status_code, exc.headers)


def install_error_handlers(app: Any) -> None:
    app.add_exception_handler(PeerError, peer_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, peer_error_handler)


__all__ = ["install_error_handlers", "router"]
