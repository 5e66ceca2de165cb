"""One table maps each error class to its wire code, HTTP status and WebSocket close code.

Looked up along the exception's MRO (as starlette does), so a subclass inherits its parent's row
unless it has its own. Anything not a :class:`PeerError` is a server error: the peer sees only
``internal`` and the details stay in the server log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from vitalwire.core import errors as e
from vitalwire.services.ingest import Overloaded, Unavailable


@dataclass(frozen=True, slots=True)
class ErrorRow:
    code: str
    http: int
    close: int | None  # close the WebSocket with this code, or None: reply and keep it open


ERRORS: Final[dict[type[BaseException], ErrorRow]] = {
    e.FrameTooLarge: ErrorRow("frame_too_large", 413, None),
    e.InvalidMessage: ErrorRow("invalid_message", 422, None),
    e.InvalidReading: ErrorRow("invalid_reading", 422, None),
    e.Unauthenticated: ErrorRow("unauthenticated", 401, 4001),
    e.Forbidden: ErrorRow("forbidden", 403, None),
    e.NotFound: ErrorRow("not_found", 404, None),
    e.Conflict: ErrorRow("conflict", 409, None),
    Overloaded: ErrorRow("overloaded", 503, None),
    Unavailable: ErrorRow("unavailable", 503, None),
    e.PeerError: ErrorRow("bad_request", 400, None),
}
INTERNAL: Final = ErrorRow("internal", 500, None)


class Close:
    """WebSocket close codes (docs/protocol.md)."""

    NORMAL: Final = 1000
    GOING_AWAY: Final = 1001  # server shutting down: reconnect (to another instance)
    PROTOCOL_ERROR: Final = 1002
    MESSAGE_TOO_BIG: Final = 1009  # past the hard frame limit (the server cannot even read it)
    INTERNAL_ERROR: Final = 1011
    UNAUTHENTICATED: Final = 4001  # missing/wrong credential, or first message not auth/hello
    AUTH_TIMEOUT: Final = 4002  # no auth/hello within the auth timeout
    FORBIDDEN: Final = 4003
    SLOW_CONSUMER: Final = 4008  # send queue full: reconnect and resume from the last offset
    HEARTBEAT_TIMEOUT: Final = 4004  # nothing received for 3 heartbeat intervals
    REPLACED: Final = 4009  # the same device connected again; this connection is superseded
    RATE_LIMITED: Final = 4029


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
