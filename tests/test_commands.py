"""Two-way commands end to end over real sockets: client -> server -> device -> server -> client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import RunningServer, start_server, stop_server
from vitalwire import wire
from vitalwire.sdk import MonitorClient, StreamEvent


@asynccontextmanager
async def device(srv: RunningServer, i: int = 0) -> AsyncIterator[ClientConnection]:
    """A raw device connection: the test plays the device's side of the protocol."""
    did, secret, _ = srv.device(i)
    async with connect(srv.ws_url + "/ws/device", proxy=None) as ws:
        await ws.send(json.dumps({"type": "hello", "device_id": did, "secret": secret}))
        assert json.loads(await ws.recv())["type"] == "welcome"
        yield ws


async def next_command(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    while True:
        msg: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if msg["type"] == "command":
            return msg


async def answer(ws: ClientConnection, cid: str, status: str, **extra: Any) -> None:
    await ws.send(
        json.dumps({"type": "command_result", "command_id": cid, "status": status, **extra})
    )


async def statuses(mon: MonitorClient, cid: str, until: str, timeout: float = 10) -> list[str]:
    """The status events of one command, as they reach the requester, up to ``until``."""
    seen: list[str] = []
    while not seen or seen[-1] != until:
        e: StreamEvent = await mon.next_event(timeout)
        if e.kind == "command" and e.data["command_id"] == cid:
            seen.append(e.data["status"])
    return seen


async def send(mon: MonitorClient, pid: str, name: str, **kw: Any) -> Any:
    args = kw.pop("args", {})
    return await mon.request(wire.SendCommand(patient_id=pid, name=name, args=args, **kw))


async def monitor(srv: RunningServer, role: str = "clinician") -> MonitorClient:
    user, pw = srv.user(role)
    mon = MonitorClient(srv.url, username=user, password=pw)
    await mon.connect()
    return mon


async def test_command_to_an_online_device_completes(server: RunningServer) -> None:
    _, _, pid = server.device(0)
    mon = await monitor(server)
    try:
        async with device(server) as dev:
            reply = await send(mon, pid, "set_interval", args={"interval_s": 5})
            cmd = reply.data["command"]
            assert (cmd["status"], cmd["args"]) == ("queued", {"interval_s": 5.0})
            got = await next_command(dev)
            assert (got["command_id"], got["name"], got["args"]) == (
                cmd["command_id"],
                "set_interval",
                {"interval_s": 5.0},
            )
            await answer(dev, got["command_id"], "acknowledged")
            await answer(dev, got["command_id"], "completed", data={"interval_s": 5.0})
            seen = await statuses(mon, cmd["command_id"], "completed")
    finally:
        await mon.close()
    assert seen == ["queued", "sent", "acknowledged", "completed"]
    row = await server.services.store.get_command(cmd["command_id"])
    assert row is not None and (row["status"], json.loads(row["result"])) == (
        "completed",
        {"interval_s": 5.0},
    )
    events = await server.services.store.events_after(f"patient:{pid}", 0, 1000)
    assert [e.data["status"] for e in events if e.kind == "command"] == seen


async def test_offline_device_gets_queued_commands_in_order_on_reconnect(
    server: RunningServer,
) -> None:
    _, _, pid = server.device(0)
    mon = await monitor(server)
    try:
        first = (await send(mon, pid, "identify")).data["command"]
        second = (await send(mon, pid, "report_now")).data["command"]
        assert first["status"] == second["status"] == "queued"
        async with device(server) as dev:
            a = await next_command(dev)
            b = await next_command(dev)
            assert [a["command_id"], b["command_id"]] == [first["command_id"], second["command_id"]]
            for c in (a, b):
                await answer(dev, c["command_id"], "completed")
            assert await statuses(mon, second["command_id"], "completed") == [
                "queued",
                "sent",
                "completed",
            ]
    finally:
        await mon.close()


async def test_command_expires_when_its_ttl_passes_before_delivery(server: RunningServer) -> None:
    _, _, pid = server.device(0)
    mon = await monitor(server)
    try:
        cmd = (await send(mon, pid, "identify", ttl_s=1)).data["command"]
        assert await statuses(mon, cmd["command_id"], "expired") == ["queued", "expired"]
        async with device(server) as dev:  # the device comes back: nothing is delivered
            with pytest.raises(TimeoutError):
                await next_command(dev, timeout=0.5)
    finally:
        await mon.close()


async def test_command_times_out_when_the_device_never_answers(server: RunningServer) -> None:
    _, _, pid = server.device(0)
    mon = await monitor(server)
    try:
        async with device(server) as dev:
            cmd = (await send(mon, pid, "report_now", timeout_s=1)).data["command"]
            await next_command(dev)
            seen = await statuses(mon, cmd["command_id"], "timed_out")
    finally:
        await mon.close()
    assert seen == ["queued", "sent", "timed_out"]
    row = await server.services.store.get_command(cmd["command_id"])
    assert row is not None and row["message"] == "no answer within 1 s"


async def test_same_idempotency_key_returns_the_existing_command(server: RunningServer) -> None:
    _, _, pid = server.device(0)
    mon = await monitor(server)
    try:
        a = (await send(mon, pid, "identify", idempotency_key="k-1")).data["command"]
        b = (await send(mon, pid, "identify", idempotency_key="k-1")).data["command"]
        c = (await send(mon, pid, "identify", idempotency_key="k-2")).data["command"]
        assert a["command_id"] == b["command_id"] != c["command_id"]
        async with device(server) as dev:
            ids = {(await next_command(dev))["command_id"] for _ in range(2)}
            with pytest.raises(TimeoutError):
                await next_command(dev, timeout=0.5)
        assert ids == {a["command_id"], c["command_id"]}
    finally:
        await mon.close()


async def test_viewer_may_not_send_commands(server: RunningServer) -> None:
    _, _, pid = server.device(0)
    mon = await monitor(server, "viewer")
    try:
        err = await send(mon, pid, "reset")
    finally:
        await mon.close()
    assert (err.type if hasattr(err, "type") else "error", err.code, err.field) == (
        "error",
        "forbidden",
        "role",
    )


@pytest.mark.parametrize(
    ("name", "kw", "field", "text"),
    [
        ("set_interval", {"args": {"interval_s": 0}}, "args.interval_s", "between 0.1 and 3600"),
        ("silence", {"args": {"duration_s": 600}}, "args.duration_s", "between 1 and 120, got 600"),
        ("format_disk", {}, "name", "name must be one of"),
        ("identify", {"ttl_s": 0}, "ttl_s", "ttl_s must be between 1 and 86400"),
        ("identify", {"device_id": "mon-003"}, "device_id", "not bound to patient"),
    ],
)
async def test_bad_commands_are_refused_before_anything_is_sent(
    server: RunningServer, name: str, kw: dict[str, Any], field: str, text: str
) -> None:
    _, _, pid = server.device(0)
    mon = await monitor(server)
    try:
        async with device(server) as dev:
            err = await send(mon, pid, name, **kw)
            with pytest.raises(TimeoutError):
                await next_command(dev, timeout=0.3)
    finally:
        await mon.close()
    assert isinstance(err, wire.Error) and err.field == field and text in err.message


async def test_unknown_command_result_is_an_error_for_the_device(server: RunningServer) -> None:
    async with device(server) as dev:
        await answer(dev, "cmd-nope", "completed")
        while True:
            msg = json.loads(await asyncio.wait_for(dev.recv(), 5))
            if msg["type"] == "error":
                break
    assert (msg["code"], msg["field"]) == ("not_found", "command_id")


async def test_waveform_chunks_become_stream_events(server: RunningServer) -> None:
    _, _, pid = server.device(0)
    mon = await monitor(server)
    try:
        await mon.subscribe([f"patient:{pid}"])
        async with device(server) as dev:
            cmd = (await send(mon, pid, "request_data", args={"duration_s": 1})).data["command"]
            got = await next_command(dev)
            samples = [0.5] * 25
            for i in range(4):
                await dev.send(
                    json.dumps(
                        {
                            "type": "waveform",
                            "ts": time.time() + i * 0.25,
                            "rate_hz": 100,
                            "samples": samples,
                            "command_id": got["command_id"],
                        }
                    )
                )
            await answer(dev, got["command_id"], "completed", data={"samples": 100})
            chunks = []
            while len(chunks) < 4:
                e = await mon.next_event()
                if e.kind == "waveform":
                    chunks.append(e)
    finally:
        await mon.close()
    assert all(c.data["command_id"] == cmd["command_id"] for c in chunks)
    assert sum(len(c.data["samples"]) for c in chunks) == 100


async def test_queued_commands_survive_a_restart_and_in_flight_ones_resolve_honestly(
    tmp_path: Path,
) -> None:
    srv, task = await start_server(tmp_path, patients=2)
    _, _, p1 = srv.device(0)
    _, _, p2 = srv.device(1)
    mon = await monitor(srv)
    try:
        queued = (await send(mon, p1, "identify")).data["command"]
        async with device(srv, 1) as dev:
            reset = (await send(mon, p2, "reset")).data["command"]
            again = (await send(mon, p2, "report_now")).data["command"]
            await next_command(dev)
            await next_command(dev)  # both sent, neither answered
    finally:
        await mon.close()
        await stop_server(srv, task)
    srv, task = await start_server(tmp_path, patients=2)
    try:
        store = srv.services.store
        r = await store.get_command(reset["command_id"])
        assert r is not None and r["status"] == "timed_out"  # not idempotent: never resent
        assert "restarted" in (r["message"] or "")
        a = await store.get_command(again["command_id"])
        assert a is not None and a["status"] == "queued"  # idempotent: re-queued
        async with device(srv, 0) as dev0:
            assert (await next_command(dev0))["command_id"] == queued["command_id"]
        async with device(srv, 1) as dev1:
            assert (await next_command(dev1))["command_id"] == again["command_id"]
    finally:
        await stop_server(srv, task)


async def test_idempotency_key_still_answers_after_the_command_finished(
    server: RunningServer,
) -> None:
    _, _, pid = server.device(0)
    mon = await monitor(server)
    try:
        async with device(server) as dev:
            first = (await send(mon, pid, "identify", idempotency_key="same")).data["command"]
            got = await next_command(dev)
            await answer(dev, got["command_id"], "completed")
            await statuses(mon, first["command_id"], "completed")
            again = (await send(mon, pid, "identify", idempotency_key="same")).data["command"]
            with pytest.raises(TimeoutError):
                await next_command(dev, timeout=0.5)
    finally:
        await mon.close()
    assert again["command_id"] == first["command_id"] and again["status"] == "completed"


async def test_an_answer_whose_event_cannot_be_built_leaves_the_command_as_it_was(
    server: RunningServer,
) -> None:
    """Past the decode-time bounds (a server's own mistake): the command keeps its state and
    its stream keeps its offsets; the device's next valid answer settles it."""
    did, _, pid = server.device(0)
    stream = f"patient:{pid}"
    svc = server.services
    mon = await monitor(server)
    try:
        async with device(server) as dev:
            cmd = (await send(mon, pid, "set_interval", args={"interval_s": 5})).data["command"]
            cid = (await next_command(dev))["command_id"]
            await svc.writer.flush()
            head = svc.streams.head(stream)
            broken = wire.CommandResult(cid, "completed")
            inner = broken.data = {}
            for _ in range(5000):  # set after construction: what no decoder would let through
                inner["a"] = inner = {}
            with pytest.raises(RecursionError):
                svc.commands.on_result(svc.ingest.sessions[did], broken)
            await svc.writer.flush()
            assert svc.streams.head(stream) == head
            row = await svc.store.get_command(cid)
            assert row is not None and (row["status"], row["result"]) == ("sent", None)
            await answer(dev, cid, "completed", data={"interval_s": 5.0})
            assert await statuses(mon, cmd["command_id"], "completed") == [
                "queued",
                "sent",
                "completed",
            ]
    finally:
        await mon.close()
    events = await svc.store.events_after(stream, 0, 1000)
    assert [e.offset for e in events] == list(range(1, len(events) + 1))
