"""One table maps each error class to its wire code and HTTP status.

Looked up along the exception's MRO (as starlette does), so a subclass inherits its parent's row
unless it has its own. Anything not a :class:`PeerError` is a server error: the peer sees only
``internal`` and the details stay in the server log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from pydantic import BaseModel

from vitalwire.core import errors as e
from vitalwire.services.ingest import Unavailable
from vitalwire.wire import Close


@dataclass(frozen=True, slots=True)
class ErrorRow:
    code: str
    http: int


ERRORS: Final[dict[type[BaseException], ErrorRow]] = {
    e.FrameTooLarge: ErrorRow("frame_too_large", 413),
    e.InvalidMessage: ErrorRow("invalid_message", 422),
    e.InvalidReading: ErrorRow("invalid_reading", 422),
    e.Unauthenticated: ErrorRow("unauthenticated", 401),
    e.AuthTimeout: ErrorRow("auth_timeout", 401),
    e.Forbidden: ErrorRow("forbidden", 403),
    e.RateLimited: ErrorRow("rate_limited", 429),
    e.NotFound: ErrorRow("not_found", 404),
    e.Conflict: ErrorRow("conflict", 409),
    Unavailable: ErrorRow("unavailable", 503),
    e.PeerError: ErrorRow("bad_request", 400),
}
INTERNAL: Final = ErrorRow("internal", 500)


class ErrorBody(BaseModel):
    """The one error shape of every REST error (docs/protocol.md, "Errors")."""

    code: str
    message: str
    field: str | None = None


#: What each error status means on a route, for the OpenAPI document.
STATUS_DESCRIPTIONS: Final[dict[int, str]] = {
    400: "Bad request",
    401: "No valid bearer token (`WWW-Authenticate: Bearer`)",
    403: "The role may not do this",
    404: "No such resource, or a patient outside the user's care team",
    409: "Conflicts with the resource's state",
    413: "Request body too large",
    422: "Invalid input: `field` names it and `message` the bound",
    429: "Too many attempts: `Retry-After` says when to try again",
    503: "Unavailable: retry",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route answering ``statuses`` with the one error shape."""
    return {
        s: {"model": ErrorBody, "description": STATUS_DESCRIPTIONS.get(s, "Error")}
        for s in statuses
    }


def row_for(exc: BaseException) -> ErrorRow:
    for cls in type(exc).__mro__:
        row = ERRORS.get(cls)
        if row is not None:
            return row
    return INTERNAL


def public_message(exc: BaseException) -> str:
    if isinstance(exc, e.PeerError):
        return exc.message
    return "internal error"


__all__ = [
    "Close",
    "ERRORS",
    "ErrorBody",
    "ErrorRow",
    "error_responses",
    "INTERNAL",
    "public_message",
    "row_for",
]
