"""The GraphQL subscriber of ``vitalwire bench --against graphql``: the same shape as the
``/ws`` clients (each subscriber watches ``patients_per_client`` patients), over
graphql-transport-ws on ``/graphql``, one ``patientsEvents`` subscription for all its patients
(as a ``/ws`` client has one socket for all of them), selecting the event's plain fields
(``stream offset kind ts data``: the server's fast path, the whole event as ``/ws`` sends it).

Each subscriber first reads its patients' stream heads (``patients { id offset }``, on the same
socket) and subscribes with ``after`` = each stream's head: a reading committed while the
subscription is being set up is replayed, not lost, so a loss counted is a real one. The
readings' latency is measured as for ``/ws`` (device timestamp to arrival, in the same worker's
tracker).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec

#: One subscription per subscriber, for all its patients.
SUBSCRIPTION = (
    "subscription($p: [String!]!, $after: [StreamOffset!]) "
    "{ patientsEvents(patientIds: $p, after: $after) { stream offset kind ts data } }"
)
HEADS = "{ patients { id offset } }"
PROTOCOL = "graphql-transport-ws"

_decode = msgspec.json.Decoder()
#: One heads query at a time per worker: each reads the ward's patients from the store, and
#: 200 at once would only queue on the store's connection pool.
_heads_lock: asyncio.Lock | None = None


async def graphql_client(
    target: Any, watched: list[int], tracker: Any, ready: asyncio.Event
) -> None:
    """One subscriber (bench/load.py ``_client`` calls it for ``Target("graphql", ...)``)."""
    from websockets.asyncio.client import connect

    url = target.url.replace("http://", "ws://").replace("https://", "wss://").rstrip("/")
    pids = {target.devices[d][2]: d for d in watched}
    async with connect(
        url + "/graphql",
        proxy=None,
        compression=None,
        max_size=2**24,
        subprotocols=[PROTOCOL],  # type: ignore[list-item]
    ) as ws:
        init = {"type": "connection_init", "payload": {"Authorization": f"Bearer {target.token}"}}
        await ws.send(json.dumps(init))
        ack = _decode.decode(await ws.recv())
        if ack.get("type") != "connection_ack":
            raise RuntimeError(f"connection_init refused: {ack}")
        global _heads_lock
        if _heads_lock is None:
            _heads_lock = asyncio.Lock()
        heads: dict[str, int] = {}
        async with _heads_lock:
            query = {"id": "heads", "type": "subscribe", "payload": {"query": HEADS}}
            await ws.send(json.dumps(query))
            while not heads:
                msg = _decode.decode(await ws.recv())
                if msg.get("id") == "heads" and msg["type"] == "next":
                    if msg["payload"].get("errors"):
                        raise RuntimeError(f"heads query failed: {msg['payload']['errors']}")
                    heads = {p["id"]: p["offset"] for p in msg["payload"]["data"]["patients"]}
        index = {f"patient:{pid}": d for pid, d in pids.items()}
        after = [{"stream": f"patient:{pid}", "offset": heads.get(pid, 0)} for pid in pids]
        payload = {"query": SUBSCRIPTION, "variables": {"p": list(pids), "after": after}}
        await ws.send(json.dumps({"id": "events", "type": "subscribe", "payload": payload}))
        ready.set()
        async for raw in ws:
            msg = _decode.decode(raw)
            kind = msg.get("type")
            if kind == "next":
                payload = msg["payload"]
                data = payload.get("data") or {}
                event = data.get("patientsEvents")
                if event is None:
                    raise RuntimeError(f"subscription error: {payload.get('errors')}")
                if event["kind"] == "reading":
                    reading = event["data"]
                    tracker.got(index[event["stream"]], reading["seq"], reading["ts"])
            elif kind == "ping":
                await ws.send('{"type":"pong"}')
            elif kind == "error":
                raise RuntimeError(f"subscription error: {msg.get('payload')}")
