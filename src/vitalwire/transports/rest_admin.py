"""REST administration (issue 26): users, care teams, patients, devices, bindings; admin only.

These routes only translate HTTP: the checks (admin role, refusals audited), the audit rows and
the live effect of each act are in services/admin.py. Every list is cursor-paged
(transports/paging.py) by its key (username, ward, patient id, device id); every answer carries
``Cache-Control: no-store`` (the ``principal`` dependency). docs/api.md, "Administration".
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field

from vitalwire.core.errors import InvalidMessage
from vitalwire.services.admin import Admin
from vitalwire.services.auth import Principal
from vitalwire.transports.errors import error_responses
from vitalwire.transports.paging import DEFAULT_PAGE, MAX_PAGE, decode_cursor, encode_cursor
from vitalwire.transports.rest import _origin, principal, services

router = APIRouter(prefix="/admin", tags=["admin"])

#: An id as core/events.py ID_RE: usernames, wards, patient and device ids.
ID_PATTERN = r"^[A-Za-z0-9_.\-]+$"
_ID = {"min_length": 1, "max_length": 64, "pattern": ID_PATTERN}

#: The one error shape (transports/errors.py ErrorBody), for every status a route answers.
_ERRORS = error_responses(401, 403, 404, 409, 422)

Who = Annotated[Principal, Depends(principal)]
Username = Annotated[str, Path(**_ID)]
PatientId = Annotated[str, Path(**_ID)]
DeviceId = Annotated[str, Path(**_ID)]
Ward = Annotated[str, Path(**_ID)]
Cursor = Annotated[str | None, Query(max_length=512)]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]


class Role(StrEnum):
    admin = "admin"
    clinician = "clinician"
    viewer = "viewer"


class NewUser(BaseModel):
    username: str = Field(**_ID)
    # bounded as LoginRequest's (transports/rest.py)
    password: str = Field(min_length=1, max_length=1024)
    role: Role


class RoleBody(BaseModel):
    role: Role


class PasswordBody(BaseModel):
    password: str = Field(min_length=1, max_length=1024)


class NewPatient(BaseModel):
    id: str = Field(**_ID)
    name: str = Field(min_length=1, max_length=200)
    ward: str = Field(**_ID)


class NewDevice(BaseModel):
    device_id: str = Field(**_ID)
    kind: str = Field("monitor", **_ID)


class BindBody(BaseModel):
    patient_id: str = Field(**_ID)


class UserOut(BaseModel):
    username: str
    role: str
    disabled: bool
    wards: list[str] = []
    patients: list[str] = []


class WardOut(BaseModel):
    ward: str
    members: list[str]
    patients: list[str]


class PatientOut(BaseModel):
    id: str
    name: str
    ward: str
    devices: list[str] = []
    created_at: float | None = None
    discharged_at: float | None = None
    discharged_by: str | None = None


class DeviceOut(BaseModel):
    id: str
    kind: str
    disabled: bool
    created_at: float | None = None
    patient_id: str | None = None


class UsersPage(BaseModel):
    items: list[UserOut]
    next_cursor: str | None = None


class WardsPage(BaseModel):
    items: list[WardOut]
    next_cursor: str | None = None


class PatientsPage(BaseModel):
    items: list[PatientOut]
    next_cursor: str | None = None


class DevicesPage(BaseModel):
    items: list[DeviceOut]
    next_cursor: str | None = None


class DeviceSecret(BaseModel):
    """A device's secret: shown in this answer only (the store keeps its hash)."""

    device_id: str
    secret: str
    kind: str | None = None


class UserResult(BaseModel):
    """A user act's result; ``changed: false`` when it changed nothing (a role held already)."""

    username: str
    role: str | None = None
    before: str | None = None
    after: str | None = None
    wards: list[str] | None = None
    patients: list[str] | None = None
    changed: bool | None = None


class MemberResult(BaseModel):
    username: str
    ward: str
    changed: bool


class AssignResult(BaseModel):
    username: str
    patient_id: str
    changed: bool


class Admitted(BaseModel):
    id: str
    name: str
    ward: str


class Discharged(BaseModel):
    id: str
    discharged_at: float
    unbound: list[str]
    changed: bool
    #: the patient's open alerts resolved by the discharge
    alerts_ended: int = 0


class DeviceState(BaseModel):
    device_id: str
    disabled: bool


class BindingResult(BaseModel):
    device_id: str
    patient_id: str | None = None
    previous_patient_id: str | None = None
    changed: bool | None = None


def admin(request: Request) -> Admin:
    """The admin service of this app (built once, on first use)."""
    state = request.app.state
    found: Admin | None = getattr(state, "admin", None)
    svc = services(request)
    if found is None or found.store is not svc.store:
        found = Admin(
            svc.store,
            svc.registry,
            svc.access,
            svc.clock,
            hasher=svc.login.hash_password_async,
            alerts=svc.alerts,
        )
        state.admin = found
    return found


def _page(rows: list[dict[str, Any]], key: str, cursor: str | None, limit: int) -> dict[str, Any]:
    """Rows sorted by ``key`` after the cursor's position, ``limit`` of them, the next cursor."""
    position = decode_cursor(cursor)
    after = None
    if position is not None:
        after = position.get("after")
        if not isinstance(after, str):
            raise InvalidMessage("cursor is not a cursor this server gave", field="cursor")
    rows = sorted(rows, key=lambda r: r[key])
    if after is not None:
        rows = [r for r in rows if r[key] > after]
    page = rows[:limit]
    more = len(rows) > limit
    return {
        "items": page,
        "next_cursor": encode_cursor({"after": page[-1][key]}) if more else None,
    }


# -- users -------------------------------------------------------------------------------------


@router.get("/users", response_model=UsersPage, responses=_ERRORS)
async def list_users(
    request: Request, who: Who, cursor: Cursor = None, limit: Limit = DEFAULT_PAGE
) -> dict[str, Any]:
    """Every user with role, disabled flag, wards and assigned patients, by username."""
    rows = await admin(request).list_users(who, _origin(request))
    return _page(rows, "username", cursor, limit)


@router.post(
    "/users",
    status_code=201,
    response_model=UserResult,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def create_user(body: NewUser, request: Request, who: Who) -> dict[str, Any]:
    """A new user (audited ``user_create``); 409 when the name is taken."""
    return await admin(request).create_user(
        who, body.username, body.password, body.role.value, _origin(request)
    )


@router.put(
    "/users/{username}/role",
    response_model=UserResult,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def set_role(username: Username, body: RoleBody, request: Request, who: Who) -> Any:
    """Change a user's role (audited ``user_role``); applies to their open sessions at once.
    409 when it would demote the last admin."""
    return await admin(request).set_role(who, username, body.role.value, _origin(request))


@router.post(
    "/users/{username}/disable",
    response_model=UserResult,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def disable_user(username: Username, request: Request, who: Who) -> Any:
    """Disable a user (audited ``user_disable``): their tokens are refused and their open
    sockets close (4001) at once. 409 for the last admin."""
    return await admin(request).set_disabled(who, username, True, _origin(request))


@router.post(
    "/users/{username}/enable",
    response_model=UserResult,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def enable_user(username: Username, request: Request, who: Who) -> Any:
    """Let a disabled user log in again (audited ``user_enable``)."""
    return await admin(request).set_disabled(who, username, False, _origin(request))


@router.post(
    "/users/{username}/password",
    response_model=UserResult,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def reset_password(username: Username, body: PasswordBody, request: Request, who: Who) -> Any:
    """A new password (audited ``user_password_reset``); every older token stops working."""
    return await admin(request).reset_password(who, username, body.password, _origin(request))


@router.delete(
    "/users/{username}",
    response_model=UserResult,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def delete_user(username: Username, request: Request, who: Who) -> Any:
    """Delete a user (audited ``user_delete``, listing what they had). 409 for the last admin."""
    return await admin(request).delete_user(who, username, _origin(request))


@router.put(
    "/users/{username}/patients/{patient_id}",
    response_model=AssignResult,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def assign(username: Username, patient_id: PatientId, request: Request, who: Who) -> Any:
    """Put one patient in a user's care (audited ``assign``)."""
    return await admin(request).assign(who, username, patient_id, _origin(request))


@router.delete(
    "/users/{username}/patients/{patient_id}",
    response_model=AssignResult,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def unassign(username: Username, patient_id: PatientId, request: Request, who: Who) -> Any:
    """End a patient's assignment to a user (audited ``unassign``); 404 when there was none."""
    return await admin(request).unassign(who, username, patient_id, _origin(request))


# -- care teams --------------------------------------------------------------------------------


@router.get("/care-teams", response_model=WardsPage, responses=_ERRORS)
async def care_teams(
    request: Request, who: Who, cursor: Cursor = None, limit: Limit = DEFAULT_PAGE
) -> dict[str, Any]:
    """Every ward with its members and its (not discharged) patients, by ward."""
    rows = await admin(request).care_teams(who, _origin(request))
    return _page(rows, "ward", cursor, limit)


@router.put(
    "/care-teams/{ward}/members/{username}",
    response_model=MemberResult,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def add_member(ward: Ward, username: Username, request: Request, who: Who) -> Any:
    """Add a user to a ward's care team (audited ``ward_add``)."""
    return await admin(request).add_member(who, ward, username, _origin(request))


@router.delete(
    "/care-teams/{ward}/members/{username}",
    response_model=MemberResult,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def remove_member(ward: Ward, username: Username, request: Request, who: Who) -> Any:
    """Take a user out of a ward's care team (audited ``ward_remove``): their subscriptions to
    its patients end at once. 404 when they were not a member."""
    return await admin(request).remove_member(who, ward, username, _origin(request))


# -- patients ----------------------------------------------------------------------------------


@router.get("/patients", response_model=PatientsPage, responses=_ERRORS)
async def list_patients(
    request: Request,
    who: Who,
    include_discharged: bool = False,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_PAGE,
) -> dict[str, Any]:
    """Every patient with ward and bound devices, by id; discharged ones only with
    ``include_discharged=true``."""
    rows = await admin(request).list_patients(who, include_discharged, _origin(request))
    return _page(rows, "id", cursor, limit)


@router.post(
    "/patients",
    status_code=201,
    response_model=Admitted,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def admit(body: NewPatient, request: Request, who: Who) -> Any:
    """Admit a patient to a ward (audited ``patient_admit``); 409 when the id is taken."""
    return await admin(request).admit(who, body.id, body.name, body.ward, _origin(request))


@router.post(
    "/patients/{patient_id}/discharge",
    response_model=Discharged,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def discharge(patient_id: PatientId, request: Request, who: Who) -> Any:
    """Discharge a patient (audited ``patient_discharge``): every binding ends at once; no new
    binding afterwards (409). Discharging again answers ``changed: false``."""
    return await admin(request).discharge(who, patient_id, _origin(request))


# -- devices -----------------------------------------------------------------------------------


@router.get("/devices", response_model=DevicesPage, responses=_ERRORS)
async def list_devices(
    request: Request, who: Who, cursor: Cursor = None, limit: Limit = DEFAULT_PAGE
) -> dict[str, Any]:
    """Every device with kind, disabled flag and the patient it is bound to, by id."""
    rows = await admin(request).list_devices(who, _origin(request))
    return _page(rows, "id", cursor, limit)


@router.post("/devices", status_code=201, response_model=DeviceSecret, responses=_ERRORS)
async def register_device(body: NewDevice, request: Request, who: Who) -> Any:
    """Register a device (audited ``device_register``); the answer holds its secret, once."""
    return await admin(request).register_device(who, body.device_id, body.kind, _origin(request))


@router.post("/devices/{device_id}/rotate-secret", response_model=DeviceSecret, responses=_ERRORS)
async def rotate_secret(device_id: DeviceId, request: Request, who: Who) -> Any:
    """A new secret, shown once (audited ``rotate_device_secret``); the device's open session
    ends (4001) and the old secret stops working."""
    return await admin(request).rotate_secret(who, device_id, _origin(request))


@router.post(
    "/devices/{device_id}/disable",
    response_model=DeviceState,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def disable_device(device_id: DeviceId, request: Request, who: Who) -> Any:
    """Refuse a device (audited ``device_disable``); its open session ends at once (4001)."""
    return await admin(request).set_device_disabled(who, device_id, True, _origin(request))


@router.post(
    "/devices/{device_id}/enable",
    response_model=DeviceState,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def enable_device(device_id: DeviceId, request: Request, who: Who) -> Any:
    """Accept a disabled device again (audited ``device_enable``)."""
    return await admin(request).set_device_disabled(who, device_id, False, _origin(request))


# -- bindings ----------------------------------------------------------------------------------


@router.put(
    "/bindings/{device_id}",
    response_model=BindingResult,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def bind(device_id: DeviceId, body: BindBody, request: Request, who: Who) -> Any:
    """Bind a device to a patient, or move it from the one it was bound to (audited ``bind``):
    its next reading is filed under the new patient. 409 for a discharged patient."""
    return await admin(request).bind(who, device_id, body.patient_id, _origin(request))


@router.delete(
    "/bindings/{device_id}",
    response_model=BindingResult,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def unbind(device_id: DeviceId, request: Request, who: Who) -> Any:
    """End a device's binding (audited ``unbind``); its next readings go to no patient."""
    return await admin(request).unbind(who, device_id, _origin(request))


__all__ = ["router"]
