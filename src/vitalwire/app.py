"""The composition root: settings -> store, bus, services -> the ASGI app with its lifespan."""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, WebSocket

from vitalwire import __version__
from vitalwire.bus import Bus, open_bus
from vitalwire.core.errors import PeerError
from vitalwire.services.auth import TokenService
from vitalwire.services.clients import ClientSession
from vitalwire.services.ingest import Ingest
from vitalwire.services.registry import Registry
from vitalwire.services.streams import Streams
from vitalwire.services.writer import BatchWriter
from vitalwire.settings import Settings
from vitalwire.store import Store, open_store
from vitalwire.transports import rest
from vitalwire.transports.client_ws import client_endpoint
from vitalwire.transports.common import close_quietly
from vitalwire.transports.device_ws import device_endpoint
from vitalwire.transports.errors import Close

log = logging.getLogger("vitalwire")


@dataclass
class Services:
    """Everything a transport may call. Built and torn down by :func:`open_services`."""

    settings: Settings
    clock: Callable[[], float]
    store: Store
    bus: Bus
    streams: Streams
    writer: BatchWriter
    registry: Registry
    ingest: Ingest
    tokens: TokenService
    clients: set[ClientSession] = field(default_factory=set)


@contextlib.asynccontextmanager
async def open_services(
    settings: Settings, clock: Callable[[], float] = time.time
) -> AsyncIterator[Services]:
    """Open the store and bus, start the writer; on exit flush every write and close."""
    store = open_store(settings.db, sqlite_synchronous=settings.sqlite_synchronous)
    await store.open()
    bus = open_bus(settings.bus, history_size=settings.bus_history)
    streams = Streams(store, bus)
    writer = BatchWriter(
        store, bus, max_rows=settings.batch_max_rows, max_wait_s=settings.batch_max_wait_ms / 1000
    )
    try:
        await streams.load()
        await bus.open(streams.on_events)
        secret = settings.jwt_secret or await store.get_meta("jwt_secret")
        if not secret:
            secret = secrets.token_urlsafe(48)
            await store.set_meta("jwt_secret", secret)
        registry = Registry(store, clock, streams, writer)
        ingest = Ingest(
            store,
            streams,
            writer,
            registry,
            clock,
            max_pending_rows=settings.max_pending_rows,
            heartbeat_s=settings.heartbeat_s,
            max_frame_bytes=settings.max_frame_bytes,
            max_batch=settings.max_batch,
        )
        svc = Services(
            settings,
            clock,
            store,
            bus,
            streams,
            writer,
            registry,
            ingest,
            TokenService(secret, settings.token_ttl_s),
        )
        writer.start()
        try:
            yield svc
        finally:
            await writer.stop()
    finally:
        await bus.close()
        await store.close()


def create_app(settings: Settings | None = None, clock: Callable[[], float] = time.time) -> FastAPI:
    """The ASGI app. Its lifespan opens the services; shutdown flushes every pending write."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_services(settings, clock) as svc:
            app.state.services = svc
            try:
                yield
            finally:
                await _shutdown_sockets(svc)

    app = FastAPI(title="vitalwire", version=__version__, lifespan=lifespan)
    app.include_router(rest.router)
    app.add_exception_handler(PeerError, rest.peer_error_handler)

    @app.websocket("/ws/device")
    async def ws_device(ws: WebSocket) -> None:
        await device_endpoint(ws, app.state.services)

    @app.websocket("/ws")
    async def ws_client(ws: WebSocket) -> None:
        await client_endpoint(ws, app.state.services)

    return app


async def _shutdown_sockets(svc: Services) -> None:
    """Flush what devices sent (so their acks go out), then close every socket with going-away."""
    await svc.writer.flush()
    for session in list(svc.ingest.sessions.values()):
        session.close(Close.GOING_AWAY, "server shutting down")
    for client in list(svc.clients):
        client.close()
    _ = close_quietly
