"""Untrusted text made safe to show and to keep: control characters escaped, lengths bounded.

Anyone can put text in the audit log (a failed login records the username tried), and whatever
reads it back (``vitalwire admin audit``, later the REST and GraphQL admin views) must show one
entry as one line, with nothing reaching a terminal raw: a newline would forge a whole entry, an
escape sequence could clear the screen or retitle the window, a bidi override could make
``nimda`` read as ``admin``. :func:`escape_control` makes each such character visible instead.
"""

from __future__ import annotations

import json
import re
from typing import Final

#: Characters never shown raw: C0 controls, DEL and C1 controls (Unicode category Cc: newlines,
#: ESC and the 8-bit CSI among them), the line and paragraph separators (U+2028, U+2029), the
#: bidi marks, embeddings, overrides and isolates (U+061C, U+200E, U+200F, U+202A-U+202E,
#: U+2066-U+2069; Unicode TR9), and lone surrogates (which cannot even be encoded for output).
_UNSAFE: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)
#: The usual short escapes; every other unsafe character is shown as ``\xHH`` or ``\uHHHH``.
_NAMED: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

#: What marks a cut string (one character, so a cut value still fits its column).
ELLIPSIS: Final = "\u2026"


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """``text`` with every control, line-separating and bidi character shown as an escape
    (``\\n``, ``\\x1b``, ``\\u202e``), so it prints as one line and drives no terminal.

    For display only: a backslash is left as it is, so the result cannot always be turned back
    into the original (a name that holds the four characters ``\\x1b`` prints the same as one
    that holds an ESC); JSON, which escapes its own controls, reads unchanged."""
    return _UNSAFE.sub(_escape, text)


def clip(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters, else its first ``limit - 1`` followed by
    :data:`ELLIPSIS`: never longer than ``limit``, and visibly cut."""
    if len(text) <= limit:
        return text
    return text[: limit - 1] + ELLIPSIS


def clip_json(document: str, limit: int) -> str:
    """A JSON document of at most ``limit`` characters: ``document`` itself when it fits, else
    ``{"truncated": true, "chars": <its length>, "head": <its beginning>}`` with as much of the
    beginning as fits (still valid JSON, so readers that parse it keep working)."""
    if len(document) <= limit:
        return document
    keep = limit
    while True:
        head = document[:keep]
        out = json.dumps(
            {"truncated": True, "chars": len(document), "head": head}, ensure_ascii=False
        )
        if len(out) <= limit or keep == 0:
            return out
        # fewer characters, in proportion to how much the escaping grew them (always fewer)
        keep = max(keep - (len(out) - limit), keep * limit // len(out))
