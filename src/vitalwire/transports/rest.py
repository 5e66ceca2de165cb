"""REST: login, health, patients. Everything that is not a live stream."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from vitalwire import __version__
from vitalwire.core.errors import PeerError, Unauthenticated
from vitalwire.services.auth import Principal
from vitalwire.transports.errors import public_message, row_for

if TYPE_CHECKING:
    from vitalwire.app import Services

router = APIRouter()


class LoginRequest(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int
    role: str


class Health(BaseModel):
    status: str
    version: str
    db: str
    bus: str


class Patient(BaseModel):
    id: str
    name: str
    ward: str
    devices: list[str]


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


async def principal(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    svc = services(request)
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthenticated("Authorization: Bearer <token> is required", field="authorization")
    return svc.tokens.verify(authorization[7:].strip(), svc.clock())


@router.get("/healthz", response_model=Health)
async def healthz(request: Request) -> Health:
    svc = services(request)
    return Health(status="ok", version=__version__, db=svc.store.backend, bus=svc.bus.backend)


@router.post("/auth/login", response_model=TokenResponse, responses={401: {}})
async def login(body: LoginRequest, request: Request) -> TokenResponse:
    svc = services(request)
    who = await svc.registry.authenticate_user(body.username, body.password)
    token = svc.tokens.issue(who, svc.clock())
    return TokenResponse(access_token=token, expires_in=int(svc.tokens.ttl_s), role=who.role)


@router.get("/patients", response_model=list[Patient], responses={401: {}})
async def list_patients(
    request: Request, who: Annotated[Principal, Depends(principal)]
) -> list[dict[str, Any]]:
    return await services(request).store.list_patients()


async def peer_error_handler(request: Request, exc: Exception) -> JSONResponse:
    row = row_for(exc)
    headers = {"WWW-Authenticate": "Bearer"} if row.http == 401 else None
    body = {"code": row.code, "message": public_message(exc), "field": getattr(exc, "field", None)}
    return JSONResponse(body, status_code=row.http, headers=headers)


__all__ = ["router", "peer_error_handler", "PeerError"]
