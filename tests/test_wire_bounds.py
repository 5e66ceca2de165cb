"""What a peer may send freely is bounded when it is decoded: free-form JSON by depth and size,
numbers to what the server can hold, stored strings by length, ids by a full match; and an
error quotes only a bounded part of what it refuses. Each bound is named in the error, and
costs the peer nothing else: the connection stays, the command settles, the stream keeps its
offsets."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import RunningServer, start_server, stop_server
from tests.test_commands import device, monitor, next_command, send, statuses
from vitalwire import wire
from vitalwire.core import events as ev
from vitalwire.core.errors import MAX_QUOTE, InvalidMessage, NotFound

BIG_INT = "1" + "0" * 400  # 10^400 as a JSON integer: Python decodes it exactly
BIG_FLOAT = "1e400"  # past a double: msgspec refuses it


def nest(depth: int, leaf: str = "1") -> str:
    """A JSON object ``depth`` levels deep, as text (json.dumps would itself recurse)."""
    return '{"a":' * (depth - 1) + '{"a":' + leaf + "}" * depth


def deep_list(depth: int) -> str:
    return "[" * depth + "]" * depth


# (decode, message as JSON text with {} where the free-form value goes, field)
FREE_FORM = [
    pytest.param(
        wire.decode_device,
        '{"type":"command_result","command_id":"cmd-1","status":"completed","data":{}}',
        "data",
        id="command_result.data",
    ),
    pytest.param(
        wire.decode_client,
        '{"type":"command","patient_id":"P001","name":"set_interval","args":{}}',
        "args",
        id="command.args",
    ),
]


def _refused(decode: Any, text: str) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as info:
        decode(text)
    return info.value


@pytest.mark.parametrize(("decode", "template", "field"), FREE_FORM)
@pytest.mark.parametrize(
    ("value", "bound"),
    [
        pytest.param(nest(wire.MAX_DEPTH + 1), "at most 16 levels deep", id="depth-17"),
        pytest.param(nest(975), "at most 16 levels deep", id="depth-975"),
        pytest.param(nest(5000), "at most 16 levels deep", id="depth-5000"),
        pytest.param(
            '{"a":' + deep_list(5000) + "}", "at most 16 levels deep", id="depth-5000-list"
        ),
        pytest.param(
            json.dumps({"a": list(range(wire.MAX_ITEMS))}),
            "at most 1000 values",
            id="items-1001",
        ),
        pytest.param(
            json.dumps({f"k{i}": {"v": i} for i in range(501)}),
            "at most 1000 values",
            id="items-nested-1002",
        ),
        pytest.param(
            '{"interval_s":' + BIG_INT + "}", "between -9223372036854775808 and", id="int-10^400"
        ),
        pytest.param('{"a":[' + str(2**63) + "]}", "9223372036854775807", id="int-2^63"),
        pytest.param('{"interval_s":' + BIG_FLOAT + "}", "at most 1.798e+308", id="float-1e400"),
    ],
)
def test_free_form_fields_are_bounded_when_decoded(
    decode: Any, template: str, field: str, value: str, bound: str
) -> None:
    err = _refused(decode, template.replace("{}", value, 1))
    assert err.field == field
    assert bound in err.message
    assert len(err.message) < 200


@pytest.mark.parametrize(("decode", "template", "field"), FREE_FORM)
def test_free_form_fields_within_the_bounds_decode(decode: Any, template: str, field: str) -> None:
    at_limit = nest(wire.MAX_DEPTH)
    msg = decode(template.replace("{}", at_limit, 1))
    assert json.dumps(getattr(msg, field)).count("{") == wire.MAX_DEPTH
    many = json.dumps({"a": list(range(wire.MAX_ITEMS - 2)), "n": -(2**63)})  # 1000 values
    assert len(getattr(decode(template.replace("{}", many, 1)), field)["a"]) == 998


def test_the_message_a_device_sends_with_its_answer_is_cut() -> None:
    msg = wire.decode_device(
        json.dumps(
            {"type": "command_result", "command_id": "c", "status": "failed", "message": "m" * 900}
        )
    )
    assert len(msg.message) == wire.MAX_NOTE and msg.message.endswith("…")


def test_an_sdk_building_a_too_deep_result_learns_it_before_sending() -> None:
    data: dict[str, Any] = {}
    inner = data
    for _ in range(wire.MAX_DEPTH):
        inner["a"] = inner = {}
    with pytest.raises(InvalidMessage, match="at most 16 levels"):
        wire.CommandResult("cmd-1", "completed", data=data)


# (decode, message with "@" where the number goes, the field the error names): every number a
# peer sends. A path through a mapping stops at it: msgspec names no key.
D, C = wire.decode_device, wire.decode_client
NUMBERS = [
    (D, {"type": "hello", "device_id": "d", "secret": "s", "max_silence_s": "@"}, "max_silence_s"),
    (D, {"type": "hello", "device_id": "d", "secret": "s", "last_seq": "@"}, "last_seq"),
    (D, {"type": "hello", "device_id": "d", "secret": "s", "protocol": "@"}, "protocol"),
    (D, {"type": "reading", "seq": 1, "ts": "@"}, "ts"),
    (D, {"type": "reading", "seq": 1, "ts": 1, "spo2": "@"}, "spo2"),
    (D, {"type": "readings", "items": [{"seq": 1, "ts": 1, "hr": "@"}]}, "items[0].hr"),
    (D, {"type": "waveform", "ts": 1, "rate_hz": "@", "samples": [1]}, "rate_hz"),
    (D, {"type": "waveform", "ts": 1, "rate_hz": 1, "samples": [1, "@"]}, "samples[1]"),
    (D, {"type": "ping", "id": "@"}, "id"),
    (D, {"type": "ping", "ts": "@"}, "ts"),
    (D, {"type": "pong", "id": "@"}, "id"),
    (C, {"type": "auth", "token": "t", "id": "@"}, "id"),
    (C, {"type": "subscribe", "streams": ["alerts"], "since": {"alerts": "@"}}, "since"),
    (C, {"type": "unsubscribe", "streams": ["alerts"], "id": "@"}, "id"),
    (C, {"type": "ack_alert", "alert_id": "a", "id": "@"}, "id"),
    (C, {"type": "set_limits", "patient_id": "P", "limits": {"spo2": {"low": "@"}}}, "limits"),
    (C, {"type": "get_limits", "patient_id": "P", "id": "@"}, "id"),
    (C, {"type": "set_observations", "patient_id": "P", "scale": "@"}, "scale"),
    (C, {"type": "command", "patient_id": "P", "name": "x", "ttl_s": "@"}, "ttl_s"),
    (C, {"type": "command", "patient_id": "P", "name": "x", "timeout_s": "@"}, "timeout_s"),
    (C, {"type": "break_glass", "patient_id": "P", "reason": "r", "id": "@"}, "id"),
    (C, {"type": "ping", "id": "@"}, "id"),
]


@pytest.mark.parametrize(("decode", "msg", "field"), NUMBERS, ids=lambda x: None)
@pytest.mark.parametrize("literal", [BIG_INT, BIG_FLOAT, "-1e400", "NaN", "Infinity"])
def test_every_number_is_bounded_when_decoded(
    decode: Any, msg: dict[str, Any], field: str, literal: str
) -> None:
    err = _refused(decode, json.dumps(msg).replace('"@"', literal))
    if literal in ("NaN", "Infinity"):  # not JSON: no number from a peer is NaN or infinite
        assert err.message.startswith("malformed JSON")
        return
    assert err.field == field
    assert any(
        bound in err.message
        for bound in ("at most 1.798e+308", "<= 9223372036854775807", "Expected `int`, got `float`")
    ), err.message


@pytest.mark.parametrize(
    ("decode", "msg", "field", "limit"),
    [
        (wire.decode_device, {"type": "hello", "device_id": "d", "secret": "s"}, "firmware", 64),
        (wire.decode_device, {"type": "hello", "device_id": "d"}, "secret", 256),
        (
            wire.decode_device,
            {"type": "waveform", "ts": 1, "rate_hz": 1, "samples": [1]},
            "command_id",
            64,
        ),
        (wire.decode_client, {"type": "auth"}, "token", 4096),
    ],
)
def test_strings_the_server_keeps_are_bounded(
    decode: Any, msg: dict[str, Any], field: str, limit: int
) -> None:
    decode(json.dumps({**msg, field: "x" * limit}))
    err = _refused(decode, json.dumps({**msg, field: "x" * (limit + 1)}))
    assert err.field == field and f"length <= {limit}" in err.message


@pytest.mark.parametrize("bad", ["P001\n", "P001\r\n", "\nP001", "P 001", "", "x" * 65])
def test_ids_and_stream_names_must_match_in_full(bad: str) -> None:
    with pytest.raises(InvalidMessage):
        ev.check_id("patient_id", bad)
    with pytest.raises(InvalidMessage) as info:
        ev.check_stream("patient:" + bad)
    assert info.value.field == "streams"
    with pytest.raises(InvalidMessage):
        ev.check_stream("alerts\n")
    assert ev.check_stream("patient:P001") == "patient:P001"


def test_an_error_quotes_at_most_a_bounded_part_of_a_value() -> None:
    err = NotFound(f"alert {'A' * 60_000} is not open", field="B" * 60_000)
    assert err.message == f"alert {'A' * MAX_QUOTE}… is not open"
    assert err.field == "B" * MAX_QUOTE + "…"
    spaced = NotFound("word " * 20_000)
    assert len(spaced.message) <= 500


# -- end to end ---------------------------------------------------------------------------------


async def next_of(ws: ClientConnection, kind: str, timeout: float = 5.0) -> dict[str, Any]:
    """The next frame of type ``kind`` (acks, pings and events before it are passed over)."""
    while True:
        msg: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if msg["type"] == kind:
            return msg


async def still_open(ws: ClientConnection, before: str = "pong") -> list[dict[str, Any]]:
    """Ping and wait for the pong: the connection is open; return what came before it."""
    await ws.send(json.dumps({"type": "ping", "id": 99}))
    seen = []
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if msg["type"] == before:
            return seen
        seen.append(msg)


def server_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("vitalwire") and r.levelno >= logging.ERROR
    ]


def offsets(db: Path, stream: str) -> list[int]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute('SELECT "offset" FROM events WHERE stream=? ORDER BY 1', (stream,))
        return [o for (o,) in rows]


async def test_a_too_deep_command_result_is_refused_and_the_command_settles_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    srv, task = await start_server(tmp_path, patients=1)
    _, _, pid = srv.device(0)
    stream = ev.patient_stream(pid)
    try:
        mon = await monitor(srv)
        try:
            async with device(srv) as dev:
                cmd = (await send(mon, pid, "set_interval", args={"interval_s": 5})).data
                cid = cmd["command"]["command_id"]
                assert (await next_command(dev))["command_id"] == cid
                head = f'{{"type":"command_result","command_id":"{cid}","status":"completed"'
                for depth in (975, 5000):
                    await dev.send(f'{head},"data":{nest(depth)}}}')
                    err = await next_of(dev, "error")
                    assert (err["code"], err["field"]) == ("invalid_message", "data")
                    assert "at most 16 levels" in err["message"]
                assert await still_open(dev) == []  # nothing more, no close
                await srv.services.writer.flush()
                row = await srv.services.store.get_command(cid)
                assert row is not None and row["status"] == "sent"  # waits for a valid answer
                await dev.send(
                    json.dumps(
                        {
                            "type": "command_result",
                            "command_id": cid,
                            "status": "completed",
                            "data": {"interval_s": 5.0},
                        }
                    )
                )
                assert await statuses(mon, cid, "completed") == ["queued", "sent", "completed"]
        finally:
            await mon.close()
    finally:
        await stop_server(srv, task)
    assert server_errors(caplog) == []
    before = offsets(tmp_path / "vitalwire.db", stream)
    assert before == list(range(1, len(before) + 1))

    srv, task = await start_server(tmp_path, patients=1)  # a restart: nothing is sent again
    try:
        assert await srv.services.store.open_commands() == []
        async with device(srv) as dev:  # queued commands would come right after welcome
            assert [m for m in await still_open(dev) if m["type"] == "command"] == []
        row = await srv.services.store.get_command(cid)
        assert row is not None and (row["status"], json.loads(row["result"])) == (
            "completed",
            {"interval_s": 5.0},
        )
    finally:
        await stop_server(srv, task)
    after = offsets(tmp_path / "vitalwire.db", stream)
    assert after == list(range(1, len(after) + 1))


async def _client(srv: RunningServer) -> ClientConnection:
    user, pw = srv.user()
    async with httpx.AsyncClient(base_url=srv.url) as http:
        token = (await http.post("/auth/login", json={"username": user, "password": pw})).json()
    ws = await connect(srv.ws_url + "/ws", proxy=None, max_size=2**20)
    await ws.send(json.dumps({"type": "auth", "token": token["access_token"], "id": 1}))
    assert json.loads(await ws.recv())["type"] == "result"
    return ws


async def test_a_clients_unbounded_values_get_invalid_message_and_the_socket_stays(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, pid = server.device(0)
    ws = await _client(server)
    try:

        def command(i: int, interval: str) -> str:
            head = f'{{"type":"command","patient_id":"{pid}","name":"set_interval","id":{i}'
            return f'{head},"args":{{"interval_s":{interval}}}}}'

        cases = [
            (command(2, nest(5000)), "args", "16 levels"),
            (command(3, BIG_INT), "args", "9223372036854775807"),
            (command(4, BIG_FLOAT), "args", "1.798e+308"),
            (
                json.dumps({"type": "subscribe", "streams": [f"patient:{pid}\n"], "id": 5}),
                "streams",
                "1 to 64 letters",
            ),
        ]
        for frame, field, bound in cases:
            await ws.send(frame)
            err = await next_of(ws, "error")
            assert (err["code"], err["field"]) == ("invalid_message", field), err
            assert bound in err["message"]
        await ws.send(json.dumps({"type": "ack_alert", "alert_id": "A" * 60_000, "id": 6}))
        err = await next_of(ws, "error")
        assert (err["code"], err["field"], err["id"]) == ("not_found", "alert_id", 6)
        assert "A" * MAX_QUOTE + "…" in err["message"] and len(err["message"]) < 200
        assert await still_open(ws) == []
    finally:
        await ws.close()
    assert server_errors(caplog) == []
