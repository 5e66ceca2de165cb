"""The composition root: settings -> store, bus, services -> the ASGI app with its lifespan."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from vitalwire import __version__
from vitalwire.services.container import Services, drain, open_services
from vitalwire.settings import Settings
from vitalwire.transports import rest, wsserver
from vitalwire.transports.client_ws import client_endpoint
from vitalwire.transports.common import Socket
from vitalwire.transports.device_ws import device_endpoint

log = logging.getLogger("vitalwire")

#: Libraries that log statement parameters or frame contents at DEBUG: health data and secrets
#: would end up in logs. They are held at WARNING whatever the root level (docs/security.md).
QUIET_LOGGERS = ("aiosqlite", "asyncpg", "sqlalchemy.engine", "websockets", "uvicorn.protocols")


#: The WebSocket endpoints, by path.
WEBSOCKETS: dict[str, Callable[[Socket, Services], Awaitable[None]]] = {
    "/ws/device": device_endpoint,
    "/ws": client_endpoint,
}


class VitalwireApp(FastAPI):
    """FastAPI for REST; the WebSocket endpoints are dispatched before its middleware.

    A connection to ``/ws/device`` or ``/ws`` goes straight from the server to its handler, on
    the server's own ``receive`` and ``send``: none of the middleware, routing and exception-
    handling layers stays on its stack for the life of the connection (memory per idle
    connection) or wraps each frame sent (CPU per event). REST requests go through FastAPI.
    """

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
        await super().__call__(scope, receive, send)


#: Swagger UI, vendored from npm's swagger-ui-dist (tools/vendor_swagger_ui.py, `make web-vendor`):
#: /docs works with no internet. Redoc is off.
SWAGGER_UI_DIR = Path(__file__).parent / "static" / "swagger-ui"
SWAGGER_UI_PATH = "/static/swagger-ui"


def install_api_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI for ``/openapi.json``, its script, style and icon from the package."""
    app.mount(SWAGGER_UI_PATH, StaticFiles(directory=SWAGGER_UI_DIR), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{SWAGGER_UI_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER_UI_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER_UI_PATH}/favicon-32x32.png",
            # no call to the public validator service: the spec stays on this server
            swagger_ui_parameters={"validatorUrl": None},
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
    install_api_docs(app)
    app.include_router(rest.router)
    rest.install_error_handlers(app)
    return app


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
    config = uvicorn.Config(
        asgi,
        host=settings.host,
        port=settings.port,
        ws=wsserver.protocol_class(),  # uvicorn's "websockets-sansio", holding less per connection
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
    return Server(config, lambda: getattr(asgi.state, "services", None))
