"""What the CLI's client commands share: connection options, credentials, TLS, one-line errors.

Client commands (``watch``, ``limits``, ``observe``, ``command``, ``simulate``, ...) are wrapped in
:func:`one_line_errors`: a failure the user can fix (server unreachable, TLS certificate not
trusted, login refused, a request refused, a missing file, a bad setting) prints ``error: <what>``
on one line to stderr and exits 1. Anything else is a bug and keeps its traceback.

Credentials have no defaults (the demo's users belong to ``vitalwire demo``): ``--user`` or
``VITALWIRE_USER``, ``--password`` or ``VITALWIRE_PASSWORD``, else a hidden prompt on a terminal.
"""

from __future__ import annotations

import functools
import re
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import click
import typer

DEFAULT_URL = "http://127.0.0.1:8000"

UrlOpt = Annotated[
    str, typer.Option("--url", envvar="VITALWIRE_URL", help="Server base URL (http or https).")
]
UserOpt = Annotated[
    str | None,
    typer.Option(
        "--user", envvar="VITALWIRE_USER", help="Username (no default).", show_default=False
    ),
]
PasswordOpt = Annotated[
    str | None,
    typer.Option(
        "--password",
        envvar="VITALWIRE_PASSWORD",
        help="Password (no default; asked for, hidden, on a terminal).",
        show_default=False,
    ),
]
CacertOpt = Annotated[
    Path | None,
    typer.Option(
        "--cacert",
        help="CA certificate(s) (PEM) to trust for https instead of the system store.",
        show_default=False,
    ),
]

F = TypeVar("F", bound=Callable[..., Any])


class CliError(Exception):
    """A problem the user can fix; its message is printed as ``error: <message>``."""


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` on one line to stderr and exit 1."""
    typer.secho("error: ", fg="red", err=True, nl=False)
    typer.echo(" ".join(message.split()), err=True)  # one line, whatever the message holds
    raise typer.Exit(1)


def use_cacert(cacert: Path | None) -> None:
    """Make ``--cacert`` the CA every SDK client of this process trusts (None: system store)."""
    from vitalwire.sdk import tls

    if cacert is not None:
        try:
            tls.set_default_cafile(cacert)
        except FileNotFoundError:
            raise CliError(f"--cacert {cacert}: no such file") from None
        except ssl.SSLError as exc:
            raise CliError(f"--cacert {cacert}: not a PEM CA certificate ({exc.reason})") from None


def credentials(user: str | None, password: str | None) -> tuple[str, str]:
    """The user and password of a client command: given, from the environment, or (password
    only) asked for with hidden input when stdin is a terminal."""
    if not user:
        raise CliError("no user: give --user NAME or set VITALWIRE_USER")
    if password is None:
        if not sys.stdin.isatty():
            raise CliError(
                "no password: give --password or set VITALWIRE_PASSWORD "
                "(stdin is not a terminal to ask on)"
            )
        password = str(typer.prompt(f"password for {user}", hide_input=True))
    return user, password


def client_setup(user: str | None, password: str | None, cacert: Path | None) -> tuple[str, str]:
    """``--cacert`` for this process, then the credentials (:func:`credentials`)."""
    use_cacert(cacert)
    return credentials(user, password)


_UNKNOWN_PATIENT = re.compile(r"patient (\S+) does not exist|unknown patient \(patient (\S+)\)")


def unknown_patient(patient_id: str) -> str:
    """The one wording of an unknown patient, whichever command met it."""
    return f"unknown patient {patient_id}"


def request_error(code: str, message: str) -> str:
    """A server's ``error`` reply as one line; an unknown patient always reads the same (the
    server answers ``not_found``, or ``forbidden`` when the access check comes first)."""
    m = _UNKNOWN_PATIENT.search(message)
    if m is not None and code in ("not_found", "forbidden"):
        return unknown_patient(m.group(1) or m.group(2))
    return f"{message} ({code})"


def error_line(exc: BaseException) -> str | None:
    """The one line that explains ``exc`` to a user, or ``None`` for an unexpected error (a bug,
    which keeps its traceback)."""
    import httpx
    import pydantic

    from vitalwire.sdk.errors import ConnectFailed, RequestError, connect_reason

    if isinstance(exc, BaseExceptionGroup):
        lines = [error_line(e) for e in exc.exceptions]
        return lines[0] if lines and all(lines) else None
    if isinstance(exc, CliError | ConnectFailed):
        return str(exc)
    if isinstance(exc, RequestError):
        return request_error(exc.code, exc.message)
    if isinstance(exc, httpx.HTTPStatusError):
        return f"{exc.request.url} answered HTTP {exc.response.status_code}"
    if isinstance(exc, httpx.TransportError):
        try:
            where = str(exc.request.url)
        except RuntimeError:
            where = "the server"
        return f"cannot connect to {where}: {connect_reason(exc)}"
    if isinstance(exc, pydantic.ValidationError):
        return "; ".join(_setting_error(e) for e in exc.errors())
    if isinstance(exc, ssl.SSLError):
        return connect_reason(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, FileNotFoundError | PermissionError | ValueError):
        return str(exc) or type(exc).__name__
    if isinstance(exc, ConnectionRefusedError):
        return connect_reason(exc)
    if isinstance(exc, ConnectionError):
        return f"connection to the server lost ({exc})"
    if isinstance(exc, TimeoutError):
        return f"the server did not answer in time{f' ({exc})' if str(exc) else ''}"
    return None


def _setting_error(err: Any) -> str:
    where = ".".join(str(x) for x in err.get("loc", ()))
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def one_line_errors(fn: F) -> F:
    """Wrap a command: a known failure prints one ``error:`` line and exits 1 (see module doc)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException):
            raise
        except Exception as exc:
            line = error_line(exc)
            if line is None:
                raise
            fail(line)

    return wrapper  # type: ignore[return-value]
