"""One table maps each error class to its wire code and HTTP status.

Looked up along the exception's MRO (as starlette does), so a subclass inherits its parent's row
unless it has its own. Anything not a :class:`PeerError` is a server error: the peer sees only
``internal`` and the details stay in the server log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

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


__all__ = ["Close", "ERRORS", "ErrorRow", "INTERNAL", "public_message", "row_for"]
