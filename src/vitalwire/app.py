"""The composition root: settings -> store, bus, services -> the ASGI app with its lifespan."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vitalwire import __version__
from vitalwire.services.container import Services, drain, open_services
from vitalwire.settings import Settings
from vitalwire.transports import rest, wsserver
from vitalwire.transports.client_ws import client_endpoint
from vitalwire.transports.common import Socket
from vitalwire.transports.device_ws import device_endpoint
from vitalwire.transports.edge_ws import edge_endpoint
from vitalwire.transports.fhir import router as fhir_router
from vitalwire.transports.graphql import graphql_ws_endpoint
from vitalwire.transports.graphql import install as install_graphql
from vitalwire.transports.rest_admin import router as admin_router
from vitalwire.transports.rest_clinical import router as clinical_router
from vitalwire.transports.rest_commands import router as commands_router
from vitalwire.transports.rest_history import router as history_router
from vitalwire.transports.web import install as install_web
from vitalwire.transports.wsserver import PreAuth

log = logging.getLogger("vitalwire")

#: Libraries that log statement parameters or frame contents at DEBUG: health data and secrets
#: would end up in logs. They are held at WARNING whatever the root level (docs/security.md).
QUIET_LOGGERS = ("aiosqlite", "asyncpg", "sqlalchemy.engine", "websockets", "uvicorn.protocols")


#: The WebSocket endpoints, by path.
WEBSOCKETS: dict[str, Callable[[Socket, Services], Awaitable[None]]] = {
    "/ws/device": device_endpoint,
    "/ws": client_endpoint,
    "/graphql": graphql_ws_endpoint,
    "/ws/edge": edge_endpoint,
}


#: What every HTTP response carries (docs/security.md, "HTTP edge"): no MIME sniffing, no
#: referrer, no framing, and for the API (JSON) a policy that allows nothing to load.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
)
#: Added with TLS: browsers use https only from then on (a year).
HSTS = (b"strict-transport-security", b"max-age=31536000")


class HttpEdge:
    """What every HTTP request passes first, before FastAPI: security headers on every response
    (a route that sets one of them itself keeps its own), and a cap on the request body. A
    Content-Length past ``max_body`` is answered 413 at once; a chunked body is counted as it
    arrives and answered 413 when it passes the cap, the rest unread (``Connection: close``).
    """

    __slots__ = ("max_body", "headers", "_names", "_too_large")

    def __init__(self, max_body: int, tls: bool) -> None:
        self.max_body = max_body
        self.headers = (*SECURITY_HEADERS, HSTS) if tls else SECURITY_HEADERS
        self._names = frozenset(name for name, _ in self.headers)
        body = {
            "code": "frame_too_large",
            "message": f"request body must be at most {max_body} bytes",
            "field": "body",
        }
        self._too_large = json.dumps(body).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send, app: ASGIApp) -> None:
        started = refused = False

        async def send_headed(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out; the app's own answer to the cut body is dropped
            if message["type"] == "http.response.start":
                started = True
                own = {name.lower() for name, _ in message.get("headers", ())}
                extra = (
                    [h for h in self.headers if h[0] not in own]
                    if own & self._names
                    else self.headers
                )
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        length = chunked = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = value
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await self._refuse(send_headed)
            return
        if chunked is None:
            await app(scope, receive, send_headed)
            return
        received = 0

        async def capped() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    if not started:
                        await self._refuse(send_headed)
                    refused = True
                    return {"type": "http.disconnect"}
            return message

        await app(scope, capped, send_headed)

    async def _refuse(self, send: Send) -> None:
        """413 in the project's error shape, closing the connection (the body stays unread)."""
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self._too_large)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": self._too_large})


class VitalwireApp(FastAPI):
    """FastAPI for REST; the WebSocket endpoints are dispatched before its middleware.

    A connection to ``/ws/device`` or ``/ws`` goes straight from the server to its handler, on
    the server's own ``receive`` and ``send``: none of the middleware, routing and exception-
    handling layers stays on its stack for the life of the connection (memory per idle
    connection) or wraps each frame sent (CPU per event). REST requests go through
    :attr:`edge` (security headers, the body cap), then FastAPI.
    """

    #: Set by :func:`create_app`; None: requests go straight to FastAPI.
    edge: HttpEdge | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            path: str = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            endpoint = WEBSOCKETS.get(path)
            if endpoint is not None:
                await endpoint(Socket(scope, receive, send), self.state.services)
                return
        elif scope["type"] == "http" and self.edge is not None:
            await self.edge(scope, receive, send, super().__call__)
            return
        await super().__call__(scope, receive, send)


#: Swagger UI, vendored from npm's swagger-ui-dist (tools/vendor_swagger_ui.py, `make web-vendor`):
#: /docs works with no internet. Redoc is off.
SWAGGER_UI_DIR = Path(__file__).parent / "static" / "swagger-ui"
SWAGGER_UI_PATH = "/static/swagger-ui"


def install_api_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI for ``/openapi.json``, its script, style and icon from the package.

    The page is the same for every request: made once, with a Content-Security-Policy of its
    own that allows scripts from this server and the page's one inline script by its hash (no
    ``'unsafe-inline'`` for scripts), styles from this server (Swagger UI also sets inline
    styles), images from this server, ``data:`` and ``blob:`` (response previews), and requests
    to this server only.
    """
    app.mount(SWAGGER_UI_PATH, StaticFiles(directory=SWAGGER_UI_DIR), name="swagger-ui")
    page = get_swagger_ui_html(
        openapi_url=app.openapi_url or "/openapi.json",
        title=f"{app.title} API",
        swagger_js_url=f"{SWAGGER_UI_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{SWAGGER_UI_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{SWAGGER_UI_PATH}/favicon-32x32.png",
        # no call to the public validator service: the spec stays on this server
        swagger_ui_parameters={"validatorUrl": None},
    ).body
    headers = {"Content-Security-Policy": docs_policy(bytes(page).decode())}

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)


def docs_policy(html: str) -> str:
    """The Content-Security-Policy of the Swagger UI page ``html`` (:func:`install_api_docs`)."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    )
    return (
        f"default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


def create_app(
    settings: Settings | None = None, clock: Callable[[], float] = time.time
) -> VitalwireApp:
    """The ASGI app. Its lifespan opens the services; shutdown flushes every pending write."""
    settings = settings or Settings()
    for name in QUIET_LOGGERS:
        quiet = logging.getLogger(name)
        if quiet.level < logging.WARNING:  # NOTSET, DEBUG, INFO: whatever the root level becomes
            quiet.setLevel(logging.WARNING)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_services(settings, clock) as svc:
            app.state.services = svc
            try:
                yield
            finally:
                await drain(svc)

    app = VitalwireApp(
        title="vitalwire", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.edge = HttpEdge(settings.max_body_bytes, tls=settings.certfile is not None)
    install_api_docs(app)
    install_web(app)
    app.include_router(rest.router)
    app.include_router(history_router)
    app.include_router(fhir_router)
    app.include_router(clinical_router)
    install_graphql(app)
    app.include_router(admin_router)
    app.include_router(commands_router)
    rest.install_error_handlers(app)
    return app


class QueryRedactor(logging.Filter):
    """Keeps credentials in a URL's query out of the server's logs: uvicorn's access line and
    its WebSocket lines write the path with its query. The query of ``/ws*`` and ``/auth*`` is
    dropped whole (tokens are refused there, but one sent anyway must not be logged); elsewhere
    the value of any parameter named like a credential is replaced by ``REDACTED``."""

    _QUERY = re.compile(r"^(/[^?\s]*)\?(\S*)$")
    _SECRET = re.compile(
        r"(^|&)([^=&]*(?:token|secret|password|passwd|key|auth|jwt|session)[^=&]*)=[^&]*",
        re.IGNORECASE,
    )

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, str) and "?" in a for a in args):
            record.args = tuple(self._redact(a) if isinstance(a, str) else a for a in args)
        return True

    def _redact(self, text: str) -> str:
        match = self._QUERY.match(text)
        if match is None:
            return text
        path, query = match.groups()
        if path.startswith(("/ws", "/auth")):
            return path
        return path + "?" + self._SECRET.sub(r"\1\2=REDACTED", query)


#: One filter for every server of the process (``addFilter`` adds it once).
QUERY_REDACTOR = QueryRedactor()
#: The loggers uvicorn writes request paths to (HTTP access lines; WebSocket accept and refusal).
PATH_LOGGERS = ("uvicorn.access", "uvicorn.error")


class Server(uvicorn.Server):
    """uvicorn's server, draining vitalwire's sockets before uvicorn closes connections."""

    def __init__(self, config: uvicorn.Config, services: Callable[[], Services | None]) -> None:
        super().__init__(config)
        self._services = services

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # stop accepting first
            server.close()
        svc = self._services()
        if svc is not None:
            await drain(svc)
        await super().shutdown(sockets)


def make_server(settings: Settings, app: FastAPI | None = None, log_level: str = "info") -> Server:
    """An uvicorn server for the app with vitalwire's socket settings and graceful shutdown."""
    asgi = app or create_app(settings)
    pre_auth = PreAuth(
        settings.pre_auth_frame_bytes, settings.pre_auth_per_address, settings.pre_auth_total
    )
    config = uvicorn.Config(
        asgi,
        host=settings.host,
        port=settings.port,
        # uvicorn's "websockets-sansio", holding less per connection, with pre-auth bounds
        ws=wsserver.protocol_class(pre_auth),
        ws_max_size=settings.hard_frame_bytes,
        ws_per_message_deflate=settings.ws_compression,
        # protocol pings catch a half-open peer that ignores JSON pings; their timeout is longer
        # than the 3-interval silence rule, so the documented 4004 close comes first
        ws_ping_interval=settings.heartbeat_s,
        ws_ping_timeout=settings.heartbeat_s * 4,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=15,
        ssl_certfile=settings.certfile,
        ssl_keyfile=settings.keyfile,
    )
    for name in PATH_LOGGERS:  # after uvicorn.Config, which configures its loggers
        logging.getLogger(name).addFilter(QUERY_REDACTOR)
    return Server(config, lambda: getattr(asgi.state, "services", None))
