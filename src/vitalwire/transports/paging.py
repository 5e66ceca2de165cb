"""Cursor pagination for every REST list: one page model, one opaque cursor, one bound.

A cursor is the position after the last item of a page (for example ``{"offset": 1234}`` or
``{"ts": 1.5e9, "id": "a1"}``), encoded as URL-safe base64 of its JSON, so a client passes it back
unchanged and never builds one. A page holds at most :data:`MAX_PAGE` items; ``next_cursor`` is
``null`` on the last page. docs/protocol.md ("REST lists") documents the same.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Final, Generic, TypeVar

from pydantic import BaseModel

from vitalwire.core.errors import InvalidMessage

#: The most items one page holds (a ``limit`` above it is refused with 422).
MAX_PAGE: Final = 1000
#: Items per page when ``limit`` is not given.
DEFAULT_PAGE: Final = 100
#: The longest cursor accepted (a cursor is small: a longer one is not ours).
MAX_CURSOR_CHARS: Final = 512

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list: its items, and the cursor of the next page (``null``: the last)."""

    items: list[T]
    next_cursor: str | None = None


def encode_cursor(position: dict[str, Any]) -> str:
    raw = json.dumps(position, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None, field: str = "cursor") -> dict[str, Any] | None:
    """The position a cursor names, or None without one. Raises InvalidMessage naming ``field``
    for anything :func:`encode_cursor` did not make."""
    if cursor is None:
        return None
    if len(cursor) > MAX_CURSOR_CHARS:
        raise InvalidMessage(f"{field} must be at most {MAX_CURSOR_CHARS} characters", field=field)
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        position = json.loads(raw)
    except (binascii.Error, ValueError):
        raise InvalidMessage(f"{field} is not a cursor this server gave", field=field) from None
    if not isinstance(position, dict):
        raise InvalidMessage(f"{field} is not a cursor this server gave", field=field)
    return position
