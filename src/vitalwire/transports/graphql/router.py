"""``/graphql``: the Strawberry view over HTTP (POST) and over graphql-transport-ws.

HTTP: the bearer token is checked before Strawberry runs (a missing or bad token is a 401 in
GraphQL's error shape, ``extensions.code`` ``unauthenticated``); every answer carries
``Cache-Control: no-store``. The route is a plain Starlette route, out of the OpenAPI schema.

WebSocket: ``app.py`` hands a ``/graphql`` socket straight to :func:`graphql_ws_endpoint` (as it
does ``/ws``), on the server's own ``receive`` and ``send``, so the pre-authentication bounds of
transports/wsserver.py hold until the socket authenticates: frames of at most
``pre_auth_frame_bytes``, the per-address and total counts of unauthenticated sockets. Only
``graphql-transport-ws`` is spoken (the legacy ``graphql-ws`` subprotocol is closed with 4406).
The token comes in ``connection_init``'s payload ``{"Authorization": "Bearer <token>"}`` (never
in the URL) within ``auth_timeout_s`` (else 4408); a bad one is closed with 4403. Once it
authenticates, the bounds are lifted: frames up to ``hard_frame_bytes``, as ``/ws``.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL

from vitalwire.core.errors import PeerError, Unauthenticated
from vitalwire.services.clients import ClientSession
from vitalwire.transports.common import Socket, close_quietly, origin_allowed
from vitalwire.transports.errors import public_message, row_for
from vitalwire.transports.graphql.schema import schema
from vitalwire.transports.graphql.subscriptions import HANDLER_KEY, SOCKET_KEY, TransportWSHandler
from vitalwire.wire import Close

if TYPE_CHECKING:
    from fastapi import FastAPI

    from vitalwire.services.auth import Principal
    from vitalwire.services.container import Services

#: Where the principal of an HTTP request is left in the ASGI scope for the view.
PRINCIPAL_KEY = "vitalwire.principal"
#: Where a socket's :class:`GraphQLConnection` is kept in the scope, to end it with the socket.
CONNECTIONS_KEY = "vitalwire.graphql_connections"


class GraphQLConnection(ClientSession):
    """An authenticated ``/graphql`` socket in ``svc.clients``: it subscribes to nothing, counts
    in the user's limit of connections (``max_connections_per_user``, shared with ``/ws``), and
    the access-change hook (``Access.recheck``) ends the socket when its user may no longer
    connect."""

    __slots__ = ()


def _bearer(value: object) -> str | None:
    if not isinstance(value, str) or value[:7].lower() != "bearer ":
        return None
    return value[7:].strip() or None


class View(GraphQL):
    """Strawberry's ASGI view with vitalwire's context: services, the user, the origin."""

    #: Tells each operation's resolvers their operation (the subscriptions' fast path).
    graphql_transport_ws_handler_class = TransportWSHandler

    async def get_context(self, request: Any, response: Any) -> dict[str, Any]:
        scope = request.scope
        client = scope.get("client")
        return {
            "svc": scope["app"].state.services if "app" in scope else scope["vitalwire.svc"],
            "who": scope.get(PRINCIPAL_KEY),
            "origin": client[0] if client else None,
            "request": request,
            "response": response,
        }

    async def on_ws_connect(self, context: dict[str, Any]) -> dict[str, object] | None:
        """Authenticate the socket from ``connection_init`` (4403 when it cannot)."""
        svc: Services = context["svc"]
        params = context.get("connection_params") or {}
        token = _bearer(params.get("Authorization") or params.get("authorization"))
        try:
            if token is None:
                raise Unauthenticated(
                    'connection_init payload must be {"Authorization": "Bearer <token>"}',
                    field="Authorization",
                )
            who = await svc.access.current(svc.tokens.verify(token, svc.clock()))
        except PeerError as exc:
            raise ConnectionRejectionError({"code": row_for(exc).code}) from exc
        socket: Socket = context["request"].scope[SOCKET_KEY]
        s = svc.settings
        open_now = sum(
            1 for c in svc.clients if c.counts_as_connection and c.principal.name == who.name
        )
        if open_now >= s.max_connections_per_user:
            raise ConnectionRejectionError(
                {
                    "code": "rate_limited",
                    "field": "connections",
                    "message": f"connections per user must be at most {s.max_connections_per_user}",
                }
            )
        context["who"] = who
        connection = GraphQLConnection(who, svc.streams)

        def revoked(exc: PeerError) -> None:
            # the user may no longer connect (disabled, deleted, tokens revoked): the socket
            # ends, not only its subscriptions (each of which ends with the error naming why)
            connection.close()
            asyncio.get_running_loop().create_task(end(public_message(exc)))

        async def end(why: str) -> None:
            # the socket's operations first end with their errors (their sessions were revoked
            # in the same pass), bounded, so each client sees why before the close
            handler = context.get(HANDLER_KEY)
            tasks = [op.task for op in handler.operations.values() if op.task] if handler else []
            if tasks:
                await asyncio.wait(tasks, timeout=2.0)
            await close_quietly(socket, Close.GRAPHQL_FORBIDDEN, why)

        connection.on_revoked = revoked
        connection.origin = context.get("origin")
        svc.clients.add(connection)
        context["request"].scope[CONNECTIONS_KEY].append(connection)
        socket.authenticated()  # lift the pre-authentication bounds (transports/wsserver.py)
        return None


#: One view for HTTP (its settings need no Services).
_HTTP_VIEW = View(schema, graphql_ide=None, allow_queries_via_get=False)


async def graphql_http(scope: Scope, receive: Receive, send: Send) -> None:
    """POST /graphql: the bearer token first (401 without a good one), then Strawberry."""

    async def no_store(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [
                *[h for h in message.get("headers", ()) if h[0].lower() != b"cache-control"],
                (b"cache-control", b"no-store"),
            ]
        await send(message)

    request = Request(scope)
    svc: Services = scope["app"].state.services
    try:
        token = _bearer(request.headers.get("authorization"))
        if token is None:
            raise Unauthenticated(
                "Authorization: Bearer <token> is required", field="authorization"
            )
        who: Principal = await svc.access.current(svc.tokens.verify(token, svc.clock()))
    except PeerError as exc:
        row = row_for(exc)
        body = json.dumps(
            {
                "data": None,
                "errors": [
                    {
                        "message": public_message(exc),
                        "extensions": {"code": row.code, "field": exc.field},
                    }
                ],
            }
        ).encode()
        await no_store(
            {
                "type": "http.response.start",
                "status": row.http,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await no_store({"type": "http.response.body", "body": body})
        return
    scope[PRINCIPAL_KEY] = who
    await _HTTP_VIEW(scope, receive, no_store)


async def graphql_ws_endpoint(ws: Socket, svc: Services) -> None:
    """A ``/graphql`` WebSocket (see the module): graphql-transport-ws only."""
    s = svc.settings
    if not origin_allowed(ws, s.allowed_origins, s.public_url):
        await ws.close(Close.FORBIDDEN)  # before accept: the handshake gets HTTP 403
        return
    view = View(
        schema,
        graphql_ide=None,
        allow_queries_via_get=False,
        subscription_protocols=[GRAPHQL_TRANSPORT_WS_PROTOCOL],
        connection_init_wait_timeout=timedelta(seconds=s.auth_timeout_s),
        max_subscriptions_per_connection=s.max_streams_per_connection,
    )
    scope = dict(ws.scope)
    scope[SOCKET_KEY] = ws
    scope["vitalwire.svc"] = svc
    connections: list[ClientSession] = []
    scope[CONNECTIONS_KEY] = connections
    try:
        await view(scope, ws._receive, ws._send)  # noqa: SLF001 (the server's own receive, send)
    finally:
        for connection in connections:
            connection.close()
            svc.clients.discard(connection)


def install(app: FastAPI) -> None:
    """Route ``POST /graphql`` (out of the OpenAPI schema); the socket is dispatched by app.py."""
    app.add_route("/graphql", _HttpEndpoint(), methods=["POST"], include_in_schema=False)


class _HttpEndpoint:
    """:func:`graphql_http` as an ASGI app object (Starlette wraps plain functions as request
    handlers)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await graphql_http(scope, receive, send)
