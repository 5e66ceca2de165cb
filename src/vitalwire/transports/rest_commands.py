"""REST for commands (issue 26): list them, and one command's lifecycle. Sending is
``POST /patients/{id}/commands`` (transports/rest_clinical.py). Access checks and audit live in
services/commands.py; these routes only translate HTTP. docs/api.md, "Commands"."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel

from vitalwire.core.errors import InvalidMessage
from vitalwire.services.auth import Principal
from vitalwire.services.commands import command_lifecycle, list_commands
from vitalwire.transports.errors import error_responses
from vitalwire.transports.paging import DEFAULT_PAGE, MAX_PAGE, decode_cursor, encode_cursor
from vitalwire.transports.rest import _origin, principal, services

router = APIRouter(tags=["commands"])

#: The one error shape (transports/errors.py ErrorBody), for every status a route answers.
_ERRORS = error_responses(401, 403, 404, 422)


class CommandOut(BaseModel):
    command_id: str
    patient_id: str
    device_id: str
    name: str
    args: dict[str, Any] | None = None
    status: str
    requested_by: str
    created_at: float
    sent_at: float | None = None
    updated_at: float
    ttl_s: float
    timeout_s: float
    message: str | None = None
    result: dict[str, Any] | None = None


class CommandsPage(BaseModel):
    items: list[CommandOut]
    next_cursor: str | None = None


class Transition(BaseModel):
    """One status the command went through: when, and its ``command`` event's offset in the
    patient's stream."""

    status: str | None
    at: float
    offset: int
    message: str | None = None


class CommandLifecycle(BaseModel):
    command: CommandOut
    lifecycle: list[Transition]


@router.get("/commands", response_model=CommandsPage, responses=_ERRORS)
async def get_commands(
    request: Request,
    who: Annotated[Principal, Depends(principal)],
    patient: str | None = Query(None, max_length=64),
    device: str | None = Query(None, max_length=64),
    status: str | None = Query(None, max_length=16),
    since: float | None = Query(None, ge=0, allow_inf_nan=False),
    until: float | None = Query(None, ge=0, allow_inf_nan=False),
    cursor: str | None = Query(None, max_length=512),
    limit: int = Query(DEFAULT_PAGE, ge=1, le=MAX_PAGE),
) -> CommandsPage:
    """Commands newest first (by created_at) of the patients the user may VIEW, or of
    ``patient``; filtered by ``device``, ``status`` and created_at in [``since``, ``until``).
    Cursor-paged, ``limit`` at most 1000. Audited ``list_commands``."""
    position = decode_cursor(cursor)
    after: tuple[float, str] | None = None
    if position is not None:
        ts, cid = position.get("created_at"), position.get("command_id")
        if not isinstance(ts, (int, float)) or not isinstance(cid, str):
            raise InvalidMessage("cursor is not a cursor this server gave", field="cursor")
        after = (float(ts), cid)
    if since is not None and until is not None and since >= until:
        raise InvalidMessage("since must be before until", field="since")
    filters = {
        "patient": patient,
        "device": device,
        "status": status,
        "since": since,
        "until": until,
    }
    svc = services(request)
    rows = await list_commands(svc.store, svc.access, who, filters, after, limit, _origin(request))
    next_cursor = None
    if len(rows) == limit:
        last = rows[-1]
        next_cursor = encode_cursor(
            {"created_at": last["created_at"], "command_id": last["command_id"]}
        )
    return CommandsPage(items=[CommandOut(**r) for r in rows], next_cursor=next_cursor)


@router.get("/commands/{command_id}", response_model=CommandLifecycle, responses=_ERRORS)
async def get_command(
    request: Request,
    who: Annotated[Principal, Depends(principal)],
    command_id: str = Path(min_length=1, max_length=64),
) -> CommandLifecycle:
    """One command's state and every status it went through, oldest first. Audited
    ``read_command``."""
    svc = services(request)
    out = await command_lifecycle(svc.store, svc.access, who, command_id, _origin(request))
    return CommandLifecycle(**out)


__all__ = ["router"]
