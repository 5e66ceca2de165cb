"""GraphQL subscriptions over graphql-transport-ws (gql as the client): live readings with their
offsets, resume mid-stream with ``after`` (contiguous, nothing doubled), the close codes of the
protocol (4406 legacy subprotocol, 4403 bad token, 4408 no connection_init), the pre-auth frame
bound, and a subscription ended when its user's access is taken back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from gql import Client, GraphQLRequest
from gql.transport.exceptions import TransportQueryError
from gql.transport.websockets import WebsocketsTransport

from tests.conftest import RunningServer, login_token, start_server, stop_server, wait_until
from vitalwire.transports.graphql.subscriptions import GraphQLSubscription

EVENTS = """subscription($p: String!, $after: Int) {
  patientEvents(patientId: $p, after: $after) { stream offset kind ts data }
}"""


def events(pid: str, after: int | None) -> GraphQLRequest:
    return GraphQLRequest(EVENTS, variable_values={"p": pid, "after": after})


PROTOCOL = WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL  # "graphql-transport-ws"


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running, task = await start_server(tmp_path, patients=2, auth_timeout_s=1.0)
    try:
        yield running
    finally:
        await stop_server(running, task)


def transport(srv: RunningServer, token: str) -> WebsocketsTransport:
    return WebsocketsTransport(
        url=f"{srv.ws_url}/graphql",
        init_payload={"Authorization": f"Bearer {token}"},
        subprotocols=[PROTOCOL],
    )


async def take(
    srv: RunningServer, token: str, pid: str, after: int | None, n: int
) -> list[dict[str, Any]]:
    """The first ``n`` events of a subscription, then disconnect."""
    out: list[dict[str, Any]] = []
    async with Client(transport=transport(srv, token)) as session:
        async for result in session.subscribe(events(pid, after)):
            out.append(result["patientEvents"])
            if len(out) == n:
                break
    return out


async def readings(srv: RunningServer, n: int, start: float = 60.0) -> None:
    from vitalwire.sdk import DeviceClient

    did, secret, _ = srv.device(0)
    async with DeviceClient(srv.url, did, secret) as dev:
        for i in range(n):
            dev.send(hr=start + i)
        await dev.flush()


async def test_live_readings_carry_offsets_and_resume_is_contiguous(srv: RunningServer) -> None:
    svc = srv.services
    pid = srv.device(0)[2]
    stream = f"patient:{pid}"
    token = await login_token(srv, "viewer")

    # live: subscribe from now, then readings arrive with their offsets
    got: list[dict[str, Any]] = []
    subscribed = asyncio.Event()

    async def live() -> None:
        async with Client(transport=transport(srv, token)) as session:
            subscribed.set()
            async for result in session.subscribe(events(pid, None)):
                got.append(result["patientEvents"])
                if any(e["kind"] == "reading" and e["data"].get("hr") == 64.0 for e in got):
                    break

    task = asyncio.create_task(live())
    await subscribed.wait()
    await wait_until(lambda: svc.streams.subscriber_count() == 1, 10, "the subscription")
    await readings(srv, 5)
    await asyncio.wait_for(task, 20)
    live_offsets = [e["offset"] for e in got]
    assert live_offsets == list(range(live_offsets[0], live_offsets[0] + len(got))), got
    assert {e["stream"] for e in got} == {stream}
    assert [e["data"]["hr"] for e in got if e["kind"] == "reading"] == [
        60.0,
        61.0,
        62.0,
        63.0,
        64.0,
    ]

    # resume mid-stream: take some, disconnect, more readings, resume with after = last offset
    first = await take(srv, token, pid, 0, 4)
    await readings(srv, 3, start=90.0)
    head = svc.streams.head(stream)
    rest = await take(srv, token, pid, first[-1]["offset"], head - first[-1]["offset"])
    offsets = [e["offset"] for e in first + rest]
    assert offsets == list(range(1, head + 1)), offsets  # contiguous, nothing doubled
    assert [e["data"]["hr"] for e in rest if e["kind"] == "reading"][-3:] == [90.0, 91.0, 92.0]
    await svc.writer.flush()
    subscribed_rows = [r for r in await svc.store.audit_log(200, pid) if r["action"] == "subscribe"]
    assert len(subscribed_rows) == 3  # audited as the socket's subscribe

    # an offset past the head cannot be resumed from: an error naming the field
    with pytest.raises(TransportQueryError) as err:
        await take(srv, token, pid, head + 100, 1)
    assert err.value.errors is not None
    assert err.value.errors[0]["extensions"] == {"code": "invalid_message", "field": "after"}


async def test_the_protocol_close_codes_and_the_pre_auth_bounds(srv: RunningServer) -> None:
    url = f"{srv.ws_url}/graphql"
    # the legacy graphql-ws subprotocol is refused after the handshake with 4406
    async with websockets.connect(url, subprotocols=["graphql-ws"]) as ws:  # type: ignore[list-item]
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 4406

    async def closed_with(init: dict[str, Any] | None) -> int | None:
        async with websockets.connect(url, subprotocols=[PROTOCOL]) as ws:  # type: ignore[list-item]
            if init is not None:
                await ws.send(json.dumps(init))
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await ws.recv()
        return ws.close_code

    # connection_init without a valid token: 4403 (Forbidden), as graphql-transport-ws defines
    assert await closed_with({"type": "connection_init", "payload": {}}) == 4403
    bad = {"type": "connection_init", "payload": {"Authorization": "Bearer nope"}}
    assert await closed_with(bad) == 4403
    # a subscribe before connection_init: 4401; none at all within auth_timeout_s: 4408
    sub = {"id": "1", "type": "subscribe", "payload": {"query": "{ patients { id } }"}}
    assert await closed_with(sub) == 4401
    assert await closed_with(None) == 4408
    # before it authenticates, a socket's frames are bounded by pre_auth_frame_bytes (1009)
    big = {"type": "connection_init", "payload": {"pad": "x" * 20_000}}
    assert await closed_with(big) == 1009

    # authenticated: a query larger than the pre-auth bound goes through (hard_frame_bytes)
    token = await login_token(srv, "clinician")
    async with websockets.connect(url, subprotocols=[PROTOCOL]) as ws:  # type: ignore[list-item]
        init = {"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}}
        await ws.send(json.dumps(init))
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        query = "{ patients { id } }" + " " * 20_000
        await ws.send(json.dumps({"id": "q", "type": "subscribe", "payload": {"query": query}}))
        reply = json.loads(await ws.recv())
    assert reply["type"] == "next" and len(reply["payload"]["data"]["patients"]) == 2, reply


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("revoke", "token was revoked (password reset)"),
        ("ward", "the patient is no longer in your care"),
    ],
)
async def test_a_subscription_ends_when_access_is_taken_back(
    srv: RunningServer, change: str, why: str
) -> None:
    svc = srv.services
    pid = srv.device(0)[2]
    token = await login_token(srv, "clinician")
    # a raw graphql-transport-ws client: it sees every frame in order, and the close
    ws = await websockets.connect(f"{srv.ws_url}/graphql", subprotocols=[PROTOCOL])  # type: ignore[list-item]
    init = {"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}}
    await ws.send(json.dumps(init))
    assert json.loads(await ws.recv())["type"] == "connection_ack"
    sub = {"query": EVENTS, "variables": {"p": pid, "after": None}}
    await ws.send(json.dumps({"id": "s", "type": "subscribe", "payload": sub}))
    await wait_until(lambda: svc.streams.subscriber_count() == 1, 10, "the subscription")
    if change == "revoke":
        await svc.store.update_user("clinician", revoke_tokens=True)
    else:
        assert await svc.store.remove_ward_member("clinician", "ward-a")
    await svc.access.refresh()  # what the service making the change does
    errors: list[Any] = []
    while not errors:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert msg["id"] == "s", msg
        if msg["type"] == "error":
            errors = msg["payload"]
        elif msg["type"] == "next" and msg["payload"].get("errors"):
            errors = msg["payload"]["errors"]
    assert errors[0]["message"] == why, errors
    assert errors[0]["extensions"]["code"] in ("unauthenticated", "forbidden")
    if change == "revoke":
        # the user may no longer connect: after the subscription's error, the socket closes
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        assert (ws.close_code, ws.close_reason) == (4403, why)
    else:
        # still a user: the socket stays open for their other operations
        await ws.send(
            json.dumps(
                {"id": "q", "type": "subscribe", "payload": {"query": "{ patients { id } }"}}
            )
        )
        while (msg := json.loads(await asyncio.wait_for(ws.recv(), 10)))["id"] != "q":
            pass
        assert msg["type"] == "next", msg
        await ws.close()
    await wait_until(lambda: not svc.clients, 10, "the socket's sessions to end")
    assert svc.streams.subscriber_count() == 0


async def test_sockets_count_in_the_users_limit_and_end_when_the_user_is_disabled(
    tmp_path: Path,
) -> None:
    """A /graphql socket counts in max_connections_per_user with /ws ones (one more is closed
    4403); disabling the user closes their idle sockets with 4403 naming why."""
    running, task = await start_server(tmp_path, patients=1, max_connections_per_user=2)
    try:
        svc = running.services
        url = f"{running.ws_url}/graphql"
        token = await login_token(running, "clinician")
        init = json.dumps(
            {"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}}
        )
        sockets = []
        for _ in range(2):
            ws = await websockets.connect(url, subprotocols=[PROTOCOL])  # type: ignore[list-item]
            await ws.send(init)
            assert json.loads(await ws.recv())["type"] == "connection_ack"
            sockets.append(ws)
        # a third: past the limit, closed with graphql-transport-ws's Forbidden
        async with websockets.connect(url, subprotocols=[PROTOCOL]) as third:  # type: ignore[list-item]
            await third.send(init)
            with pytest.raises(websockets.ConnectionClosed):
                await third.recv()
        assert third.close_code == 4403
        # another user is not affected by the clinician's count
        other = await login_token(running, "viewer")
        async with websockets.connect(url, subprotocols=[PROTOCOL]) as ws4:  # type: ignore[list-item]
            auth = {"type": "connection_init", "payload": {"Authorization": f"Bearer {other}"}}
            await ws4.send(json.dumps(auth))
            assert json.loads(await ws4.recv())["type"] == "connection_ack"
        # the user is disabled: their idle sockets end at once, naming why
        await svc.store.update_user("clinician", disabled=True)
        await svc.access.refresh()
        for ws in sockets:
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert (ws.close_code, ws.close_reason) == (4403, "user is disabled")
        await wait_until(lambda: not svc.clients, 10, "the sockets' sessions to end")
    finally:
        await stop_server(running, task)


async def test_ward_alerts_come_from_the_alerts_stream_scoped_to_the_user(
    srv: RunningServer,
) -> None:
    from vitalwire.sdk import DeviceClient

    svc = srv.services
    await svc.registry.create_patient("Q001", "Other Ward", "ward-b")
    await svc.access.refresh()
    token = await login_token(srv, "viewer")
    got: list[dict[str, Any]] = []
    query = GraphQLRequest("subscription { wardAlerts { stream offset kind data } }")

    async def watch() -> None:
        async with Client(transport=transport(srv, token)) as session:
            async for result in session.subscribe(query):
                got.append(result["wardAlerts"])
                break

    task = asyncio.create_task(watch())
    await wait_until(lambda: svc.streams.subscriber_count() == 1, 10, "the subscription")
    did, secret, pid = srv.device(0)
    async with DeviceClient(srv.url, did, secret) as dev:
        dev.send(temp_c=40.5)
        await dev.flush()
    await asyncio.wait_for(task, 10)
    assert got[0]["stream"] == "alerts" and got[0]["offset"] >= 1
    assert got[0]["data"]["patient_id"] == pid, got


def test_bench_measures_graphql_subscribers_beside_ws_at_a_tiny_size(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vitalwire.cli import app

    out = tmp_path / "load.json"
    args = "bench --devices 4 --rate 10 --clients 2 --patients-per-client 2 --duration 1"
    r = CliRunner().invoke(
        app, [*args.split(), "--workers", "1", "--against", "graphql", "--json", str(out)]
    )
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())
    assert [row["target"] for row in rows] == ["vitalwire", "graphql"]
    for row in rows:
        assert row["published"] >= 20 and row["lost"] == 0 and row["duplicated"] == 0, row
        assert row["delivered"] == row["published"] and not row["errors"], row
    assert rows[1]["p99_vs_ws"] > 0  # the two measured in the same run, on the same server


MANY = """subscription($p: [String!]!, $after: [StreamOffset!]) {
  patientsEvents(patientIds: $p, after: $after) { stream offset kind ts data }
}"""


async def device_readings(srv: RunningServer, i: int, n: int, start: float) -> None:
    """``n`` readings from the bound device ``i`` (heart rate ``start``, ``start + 1``, ...)."""
    from vitalwire.sdk import DeviceClient

    did, secret, _ = srv.device(i)
    async with DeviceClient(srv.url, did, secret) as dev:
        for k in range(n):
            dev.send(hr=start + k, spo2=97.5)
        await dev.flush()
    # the device's going offline is an event too: in the stream before the caller reads its head
    svc = srv.services
    await wait_until(lambda: did not in svc.ingest.sessions, 5, "the device's goodbye")
    await svc.writer.flush()


async def test_one_subscription_for_several_patients_resumes_each_stream(
    srv: RunningServer,
) -> None:
    svc = srv.services
    pids = [srv.device(0)[2], srv.device(1)[2]]
    streams = [f"patient:{p}" for p in pids]
    token = await login_token(srv, "clinician")
    await device_readings(srv, 0, 3, 60.0)
    await device_readings(srv, 1, 3, 70.0)

    def request(after: dict[str, int]) -> GraphQLRequest:
        positions = [{"stream": s, "offset": o} for s, o in after.items()]
        return GraphQLRequest(MANY, variable_values={"p": pids, "after": positions})

    async def take_many(after: dict[str, int], n: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        async with Client(transport=transport(srv, token)) as session:
            async for result in session.subscribe(request(after)):
                out.append(result["patientsEvents"])
                # one session (one queue) for both patients, as one /ws client (beside the
                # socket's own GraphQLConnection, which subscribes to nothing)
                subs = [c for c in svc.clients if isinstance(c, GraphQLSubscription)]
                assert len(subs) == 1 and svc.streams.subscriber_count() == 2
                if len(out) == n:
                    break
        return out

    first = await take_many({s: 0 for s in streams}, 5)
    # more on both streams while nobody watches, then resume each from its last offset
    await device_readings(srv, 0, 2, 90.0)
    await device_readings(srv, 1, 2, 95.0)
    heads = {s: svc.streams.head(s) for s in streams}
    last = {s: max((e["offset"] for e in first if e["stream"] == s), default=0) for s in streams}
    rest = await take_many(last, sum(heads[s] - last[s] for s in streams))
    for s in streams:
        offsets = [e["offset"] for e in first + rest if e["stream"] == s]
        assert offsets == list(range(1, heads[s] + 1)), (s, offsets)  # nothing lost or doubled
    hr = {
        s: [e["data"]["hr"] for e in first + rest if e["stream"] == s and "hr" in e["data"]]
        for s in streams
    }
    assert hr == {
        streams[0]: [60.0, 61.0, 62.0, 90.0, 91.0],
        streams[1]: [70.0, 71.0, 72.0, 95.0, 96.0],
    }
    await wait_until(lambda: not svc.clients, 10, "the sessions to end")

    # bounds and scoping: each error names its field; an out-of-team patient is not found
    await svc.registry.create_patient("Q001", "Other Ward", "ward-b")
    await svc.access.refresh()
    cases = [
        ({"p": [], "after": None}, "invalid_message", "patientIds"),
        (
            {"p": [pids[0]], "after": [{"stream": streams[1], "offset": 0}]},
            "invalid_message",
            "after",
        ),
        ({"p": [pids[0], "Q001"], "after": None}, "not_found", "patient_id"),
        (
            {"p": pids, "after": [{"stream": streams[0], "offset": heads[streams[0]] + 5}]},
            "invalid_message",
            "after",
        ),
    ]
    for variables, code, field in cases:
        with pytest.raises(TransportQueryError) as err:
            async with Client(transport=transport(srv, token)) as session:
                async for _ in session.subscribe(GraphQLRequest(MANY, variable_values=variables)):
                    break
        assert err.value.errors is not None
        assert err.value.errors[0]["extensions"] == {"code": code, "field": field}, variables
    assert not svc.clients and svc.streams.subscriber_count() == 0


async def test_fast_path_frames_equal_what_graphql_executes_for_the_same_events(
    srv: RunningServer,
) -> None:
    from vitalwire.transports.graphql.subscriptions import FastFrames

    svc = srv.services
    pids = [srv.device(0)[2], srv.device(1)[2]]
    token = await login_token(srv, "viewer")
    await device_readings(srv, 0, 3, 60.0)
    await device_readings(srv, 1, 2, 70.0)
    after = [{"stream": f"patient:{p}", "offset": 0} for p in pids]
    args = "patientsEvents(patientIds: $p, after: $after)"
    head = "subscription($p: [String!]!, $after: [StreamOffset!])"
    # the same selections, on the fast path (plain fields: the whole frame, or some of its
    # fields, aliased and in another order) and on GraphQL's own (a fragment, a directive)
    ops = {
        "fast": f"{head} {{ {args} {{ stream offset kind ts data }} }}",
        "slow": f"{head} {{ {args} {{ ...E }} }} fragment E on StreamEvent "
        "{ stream offset kind ts data }",
        "fast_some": f"{head} {{ ev: {args} {{ data k: kind offset __typename }} }}",
        "slow_some": f"{head} {{ ev: {args} {{ data k: kind @include(if: true) offset "
        "__typename } }",
    }
    url = f"{srv.ws_url}/graphql"
    got: dict[str, list[tuple[str, dict[str, Any]]]] = {op: [] for op in ops}
    sent_before = FastFrames.sent
    async with websockets.connect(url, subprotocols=[PROTOCOL]) as ws:  # type: ignore[list-item]
        init = {"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}}
        await ws.send(json.dumps(init))
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        for op, query in ops.items():
            payload = {"query": query, "variables": {"p": pids, "after": after}}
            await ws.send(json.dumps({"id": op, "type": "subscribe", "payload": payload}))
        await wait_until(lambda: svc.streams.subscriber_count() == 8, 10, "the subscriptions")
        await device_readings(srv, 0, 2, 80.0)  # and live ones, past the replay
        total = sum(svc.streams.head(f"patient:{p}") for p in pids)

        async def collect() -> None:
            while any(len(v) < total for v in got.values()):
                raw = await ws.recv()
                msg = json.loads(raw)
                assert msg["type"] == "next", msg
                got[msg["id"]].append((str(raw), msg["payload"]))

        await asyncio.wait_for(collect(), 20)
    assert FastFrames.sent - sent_before == 2 * total  # only the plain selections took it
    for fast, slow in (("fast", "slow"), ("fast_some", "slow_some")):
        assert [p for _, p in got[fast]] == [p for _, p in got[slow]], fast
    first = got["fast"][0][1]["data"]["patientsEvents"]
    assert list(first) == ["stream", "offset", "kind", "ts", "data"]  # the selection's order
    some = got["fast_some"][0][1]["data"]["ev"]
    assert list(some) == ["data", "k", "offset", "__typename"]
    assert some["__typename"] == "StreamEvent"
    readings_seen = [
        p["data"]["ev"]["data"]["hr"]
        for _, p in got["fast_some"]
        if p["data"]["ev"]["k"] == "reading"
    ]
    assert sorted(readings_seen) == [60.0, 61.0, 62.0, 70.0, 71.0, 80.0, 81.0]
