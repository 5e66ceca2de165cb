"""The one place the SDK builds client TLS contexts (``https://`` and ``wss://``).

A client created without ``ssl=`` uses :func:`client_context`: certificates are verified against
the system trust store (OpenSSL's default paths, which honour ``SSL_CERT_FILE`` and
``SSL_CERT_DIR``), or against the process-wide CA file set once with :func:`set_default_cafile`
(what the CLI's ``--cacert FILE`` does). Hostnames are checked; there is no switch to turn
verification off.
"""

from __future__ import annotations

import os
import ssl
from functools import cache
from pathlib import Path

_default_cafile: str | None = None


def set_default_cafile(cafile: str | Path | None) -> None:
    """Trust ``cafile`` (PEM, one or more CA certificates) instead of the system store for every
    client created from now on without an explicit ``ssl=``; ``None`` goes back to the system
    store.

    Raises:
        FileNotFoundError: ``cafile`` does not exist.
        ssl.SSLError: ``cafile`` holds no PEM certificate.
    """
    global _default_cafile
    path = None if cafile is None else str(cafile)
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"CA file not found: {path}")
        client_context(path)  # a file that is not PEM fails here, before any connection
    _default_cafile = path


def default_cafile() -> str | None:
    """The CA file set by :func:`set_default_cafile` (``None``: the system trust store)."""
    return _default_cafile


def client_context(cafile: str | None = None) -> ssl.SSLContext:
    """A verifying client context trusting ``cafile``, else the process default
    (:func:`set_default_cafile`), else the system trust store. Contexts are shared (one per
    CA file): treat them as read-only."""
    chosen = cafile if cafile is not None else _default_cafile
    if chosen is not None:
        return _context(chosen, None, None)
    # the system store as OpenSSL finds it, which reads these two variables
    return _context(None, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@cache
def _context(cafile: str | None, env_file: str | None, env_dir: str | None) -> ssl.SSLContext:
    # env_file and env_dir are part of the cache key only: OpenSSL reads the environment
    return ssl.create_default_context(cafile=cafile)


def describe(exc: BaseException) -> str | None:
    """A one-line account of a TLS failure in ``exc`` or its causes (``None``: none)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLCertVerificationError):
            why = cur.verify_message or cur.reason or "verification failed"
            return (
                f"the server's TLS certificate is not trusted ({why}): trust the CA that signed "
                "it (CLI --cacert FILE, SSL_CERT_FILE, or ssl=client_context(FILE) in the SDK)"
            )
        if isinstance(cur, ssl.SSLError):
            return f"TLS failed ({cur.reason or cur}); is the server serving https at that port?"
        cur = cur.__cause__ or cur.__context__
    return None
