"""One exception tree for vitalwire.

::

    VitalwireError
    ├── PeerError                 the peer (device, client) sent something wrong
    │   ├── InvalidMessage        malformed JSON, wrong type, unknown field, unknown message type
    │   │   └── FrameTooLarge     the frame exceeds the documented size limit
    │   ├── InvalidReading        a value outside its physical bound
    │   ├── Unauthenticated       missing, wrong or expired credential
    │   │   └── AuthTimeout       no hello/auth within the auth timeout
    │   ├── Forbidden             authenticated, but not allowed
    │   ├── RateLimited           too many messages or connections
    │   ├── NotFound              unknown patient, device, stream
    │   └── Conflict              the request clashes with existing state
    └── ServerError               our fault; never shown to the peer in detail

``vitalwire.transports.errors`` maps each class to its wire code and HTTP status.
"""

from __future__ import annotations

import re
from typing import Final

#: An error quotes at most this many characters of any one word (a run without spaces: an id, a
#: field name, a value) ...
MAX_QUOTE: Final = 64
#: ... and says at most this many in all: a peer's 60 KB id is never echoed back, nor logged.
MAX_MESSAGE: Final = 500

_LONG_WORD: Final = re.compile(rf"\S{{{MAX_QUOTE + 1},}}")


def bounded(text: str) -> str:
    """``text`` with every word longer than ``MAX_QUOTE`` cut to it and ``…``, the whole cut to
    ``MAX_MESSAGE``. Messages quote what a peer sent; this keeps what they quote small."""
    if len(text) <= MAX_QUOTE:
        return text
    text = _LONG_WORD.sub(lambda m: m.group()[:MAX_QUOTE] + "…", text)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


class VitalwireError(Exception):
    """Base of every vitalwire error."""


class PeerError(VitalwireError):
    """The peer sent something wrong. ``field`` names the offending field when there is one.

    Both are :func:`bounded` here, once for every error, wherever the message was built."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        message = bounded(message)
        super().__init__(message)
        self.message = message
        self.field = None if field is None else bounded(field)


class InvalidMessage(PeerError):
    """Malformed JSON, a wrong type, an unknown field or an unknown message type."""


class FrameTooLarge(InvalidMessage):
    """A frame larger than the documented limit."""


class InvalidReading(PeerError):
    """A measurement outside its physically possible range."""


class Unauthenticated(PeerError):
    """Missing, wrong or expired credential."""


class AuthTimeout(Unauthenticated):
    """The first message (hello/auth) did not arrive in time."""


class Forbidden(PeerError):
    """Authenticated but not allowed to do this."""


class RateLimited(PeerError):
    """More messages per second, or more connections, than the documented limits.

    ``retry_after``: whole seconds after which a retry may succeed, when known (REST sends it as
    the ``Retry-After`` header)."""

    def __init__(
        self, message: str, *, field: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


class NotFound(PeerError):
    """The named patient, device or stream does not exist."""


class Conflict(PeerError):
    """The request clashes with existing state (e.g. a duplicate id)."""


class ServerError(VitalwireError):
    """An internal failure; details stay in the server log."""
