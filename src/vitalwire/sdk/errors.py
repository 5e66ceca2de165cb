"""The SDK's errors: each message is one line that names the server and the problem."""

from __future__ import annotations


class ConnectFailed(ConnectionError):
    """The server could not be reached, or refused the connection's TLS (``url``, ``reason``)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot connect to {url}: {reason}")
        self.url = url
        self.reason = reason


class LoginRefused(PermissionError):
    """``POST /auth/login`` refused the username and password (or answered something else)."""


class RequestError(ValueError):
    """The server answered a request with an ``error`` (``code``, ``message``, ``field``)."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field


def connect_reason(exc: BaseException) -> str:
    """Why a connection attempt failed, in a few words (``exc`` and its causes)."""
    import socket

    from vitalwire.sdk.tls import describe

    tls = describe(exc)
    if tls is not None:
        return tls
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in chain:
        if isinstance(e, ConnectionRefusedError):
            return "connection refused (is the server running, and is the port right?)"
        if isinstance(e, socket.gaierror):
            return f"unknown host ({e.strerror})"
        if isinstance(e, TimeoutError) or "Timeout" in type(e).__name__:
            return "no answer in time"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:  # websockets' InvalidStatus: not a vitalwire WebSocket endpoint
        return f"the server refused the WebSocket with HTTP {status}"
    name = type(exc).__name__
    return f"{name}: {exc}" if str(exc) else name
