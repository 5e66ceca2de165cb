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


class VitalwireError(Exception):
    """Base of every vitalwire error."""


class PeerError(VitalwireError):
    """The peer sent something wrong. ``field`` names the offending field when there is one."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


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
    """More messages per second, or more connections, than the documented limits."""


class NotFound(PeerError):
    """The named patient, device or stream does not exist."""


class Conflict(PeerError):
    """The request clashes with existing state (e.g. a duplicate id)."""


class ServerError(VitalwireError):
    """An internal failure; details stay in the server log."""
