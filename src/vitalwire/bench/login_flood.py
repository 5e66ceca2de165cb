"""``vitalwire bench login-flood``: the alarm path while logins are being hammered.

One server (``vitalwire serve`` in a child process), one load (devices x rate, clients watching
them, from the load generator's worker processes) run three times in a row, each a phase:

- ``idle``: the load alone: the baseline.
- ``right password``: the load, and ``loops`` parallel loops logging in with the right password
  (each waits for its answer and sends the next at once): every one is a real password hash,
  which the throttle does not stop.
- ``wrong password``: the load, and ``loops`` parallel loops of wrong passwords, each from its own
  loopback address (127.0.0.2, .3, ...: an attacker with several addresses) and with a username of
  its own; they get 401 until the throttle answers 429, and go on at once (an attacker does not
  wait for ``Retry-After``).

The login loops run in a process of their own at a lower priority (nice 10): they stand for
clients on other machines, and on the bench's one machine they would otherwise take the CPU that
the load generator measures latency with (the server's CPU they cost is the server's, in full).

Each phase reports the readings' end-to-end latency (device -> server -> client, the path alarms
take), the WebSocket ping round trip of one more client (pinging every 20 ms), and the logins
answered in the phase by status. The target: p99 of each flood phase within 2x of idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from vitalwire import wire
from vitalwire.bench.runner import (
    _client_socket,
    _clinician,
    machine,
    percentiles,
    server_process,
)

PHASES = ("idle", "right password", "wrong password")
#: How often the ping client pings during a phase.
PING_EVERY_S = 0.02


async def bench_login_flood(
    loops: int = 8,
    duration: float = 20.0,
    devices: int = 20,
    rate: float = 5.0,
    clients: int = 4,
    workers: int = 1,
) -> dict[str, Any]:
    """The three phases on one server; one dict with a row per phase."""
    from vitalwire.bench.load import Shape, Target, run_load
    from vitalwire.sdk.monitor import login

    shape = Shape(devices, rate, clients, devices, duration, workers)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with server_process(Path(tmp), devices) as srv:
            user = _clinician(srv.creds)
            assert user is not None, "provision_ward writes a clinician"
            token = await login(srv.url, user["username"], user["password"])
            ids = tuple(
                (d["device_id"], d["secret"], d["patient_id"]) for d in srv.creds.devices[:devices]
            )
            target = Target("vitalwire", srv.url, devices=ids, token=token)
            for phase in PHASES:
                pings: list[tuple[float, float]] = []
                stop = asyncio.Event()
                pinger = asyncio.create_task(_pinger(srv.url, token, pings, stop))
                flood = None if phase == "idle" else _Flood(srv.url, loops, user, phase)
                try:
                    load = await asyncio.to_thread(run_load, target, shape, srv.proc.pid)
                finally:
                    stop.set()
                    await asyncio.gather(pinger, return_exceptions=True)
                    answers = [] if flood is None else await asyncio.to_thread(flood.stop)
                rows.append(_phase_row(phase, load, answers, pings, duration))
    idle_p99 = rows[0]["latency_ms"]["p99"]
    for row in rows:
        row["p99_vs_idle"] = row["latency_ms"]["p99"] / idle_p99 if idle_p99 else None
    return {
        "scenario": "login-flood",
        "loops": loops,
        "shape": {"devices": devices, "rate_hz": rate, "clients": clients, "duration_s": duration},
        "phases": rows,
        "machine": machine(),
    }


def _phase_row(
    phase: str,
    load: dict[str, Any],
    answers: list[tuple[float, int]],
    pings: list[tuple[float, float]],
    duration: float,
) -> dict[str, Any]:
    """What one phase measured, counting logins and pings only while the load ran."""
    start = load["load_started_at"]
    end = start + duration

    def during(t: float) -> bool:
        return start <= t <= end

    statuses: dict[int, int] = {}
    for t, status in answers:
        if during(t):
            statuses[status] = statuses.get(status, 0) + 1
    answered = sum(statuses.values())
    return {
        "phase": phase,
        "latency_ms": load["latency_ms"],
        "lost": load["lost"],
        "duplicated": load["duplicated"],
        "delivered_per_s": load["delivered_per_s"],
        "server_cpu_pct": load["server_cpu_pct"],
        "ping_ms": percentiles([ms for t, ms in pings if during(t)]),
        "logins_answered_per_s": answered / duration,
        "logins_ok": statuses.get(200, 0),
        "logins_refused_401": statuses.get(401, 0),
        "logins_throttled_429": statuses.get(429, 0),
        "logins_other": answered - sum(statuses.get(s, 0) for s in (200, 401, 429)),
        # per second of the phase: readings timed, those over 50 ms, the slowest, and the logins
        # answered 401 and 429 that second (where the tail came from)
        "timeline": [
            s
            | {
                str(code): sum(1 for t, c in answers if c == code and int(t - start) == s["s"])
                for code in (401, 429)
            }
            for s in load["timeline"]
        ],
        "errors": load["errors"],
    }


class _Flood:
    """``loops`` login loops in a child process (nice 10) until :meth:`stop`."""

    def __init__(self, url: str, loops: int, user: dict[str, str], phase: str) -> None:
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._out: Any = ctx.Queue()
        right = phase == "right password"
        self._proc = ctx.Process(
            target=_flood_main, args=(url, loops, user, right, self._stop, self._out)
        )
        self._proc.start()

    def stop(self) -> list[tuple[float, int]]:
        """Stop the loops; every answer they got, as (time, HTTP status; 0: no answer)."""
        self._stop.set()
        try:
            answers: list[tuple[float, int]] = self._out.get(timeout=60)
            return answers
        finally:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()


def _flood_main(
    url: str, loops: int, user: dict[str, str], right: bool, stop: Any, out: Any
) -> None:
    os.nice(10)
    answers: list[tuple[float, int]] = []

    async def run() -> None:
        done = asyncio.Event()
        tasks = [
            asyncio.create_task(_login_loop(url, i, user, right, answers, done))
            for i in range(loops)
        ]
        await asyncio.to_thread(stop.wait)
        done.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
    out.put(answers)


async def _login_loop(
    url: str,
    i: int,
    user: dict[str, str],
    right: bool,
    answers: list[tuple[float, int]],
    stop: asyncio.Event,
) -> None:
    """Log in again as soon as each answer comes, until ``stop``; record (time, status)."""
    if right:
        body = {"username": user["username"], "password": user["password"]}
        transport = httpx.AsyncHTTPTransport()
    else:  # an attacker's loop: its own address and account name, any password but the right one
        body = {"username": f"flood-{i}", "password": "not-the-password"}
        transport = httpx.AsyncHTTPTransport(local_address=f"127.0.0.{2 + i % 250}")
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=30) as http:
        while not stop.is_set():
            try:
                r = await http.post("/auth/login", json=body)
                answers.append((time.time(), r.status_code))
            except httpx.TransportError:
                answers.append((time.time(), 0))


async def _pinger(
    url: str, token: str, pings: list[tuple[float, float]], stop: asyncio.Event
) -> None:
    """A client pinging every ``PING_EVERY_S``: (time answered, round trip ms) of each."""
    ws = await _client_socket(url, token)
    try:
        n = 0
        while not stop.is_set():
            n += 1
            t0 = time.perf_counter()
            await ws.send(wire.encode_text(wire.Ping(id=n)))
            while True:
                msg = wire.decode_from_server_to_client(await asyncio.wait_for(ws.recv(), 30))
                if isinstance(msg, wire.Pong) and msg.id == n:
                    break
            pings.append((time.time(), (time.perf_counter() - t0) * 1000))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PING_EVERY_S)
    finally:
        await ws.close()
