"""MQTT devices end to end: a real vitalwire, a real Mosquitto, devices as real MQTT clients.

Most tests use the broker on 127.0.0.1:1883 (each with its own topic prefix and client ids);
the identity test and the broker restart start a Mosquitto of their own on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import paho.mqtt.client as paho
import pytest

from tests.conftest import (
    REQUIRE_SERVICES,
    RunningServer,
    free_port,
    start_server,
    stop_server,
    wait_until,
)
from vitalwire import wire
from vitalwire.sdk import MonitorClient
from vitalwire.simulator import MqttDevice, MqttOptions, SimDevice, run_ward
from vitalwire.transports import mqtt

BROKER = ("127.0.0.1", 1883)
BROKER_URL = "mqtt://127.0.0.1:1883"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def need_broker() -> None:
    if not _reachable(*BROKER):
        why = f"no MQTT broker on {BROKER[0]}:{BROKER[1]} (Mosquitto)"
        if REQUIRE_SERVICES:
            pytest.fail(why + " and VITALWIRE_REQUIRE_SERVICES=1")
        pytest.skip(why)


def need_mosquitto() -> str:
    exe = shutil.which("mosquitto")
    if exe is None:
        if REQUIRE_SERVICES:
            pytest.fail("the mosquitto program is missing and VITALWIRE_REQUIRE_SERVICES=1")
        pytest.skip("the mosquitto program is missing (a test broker cannot be started)")
    return exe


class Broker:
    """A Mosquitto of the test's own, on a free port, with a generated config."""

    def __init__(self, tmp_path: Path, extra: str = "") -> None:
        self.exe = need_mosquitto()
        self.port = free_port()
        self.conf = tmp_path / "mosquitto.conf"
        # as the test's user: a broker started as root would read its files as "mosquitto"
        user = f"user {getpass.getuser()}\n"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\n{user}persistence false\n{extra}")
        self.log = tmp_path / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.exe, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        await wait_until(
            lambda: _reachable("127.0.0.1", self.port) or self.proc.poll() is not None,  # type: ignore[union-attr]
            10,
            "test broker start",
        )
        assert self.proc.poll() is None, self.log.read_text()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


class Device:
    """A device as an MQTT client: last will ``offline`` (retained), ``online`` on connect,
    reading what vitalwire publishes on its acks, errors and commands topics."""

    def __init__(
        self,
        prefix: str,
        did: str,
        port: int = BROKER[1],
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.prefix, self.did = prefix, did
        self.client = aiomqtt.Client(
            "127.0.0.1",
            port,
            username=username,
            password=password,
            identifier=f"{prefix}-{did}",
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(self.topic(mqtt.STATUS), mqtt.OFFLINE, qos=1, retain=True),
        )
        self.got: list[tuple[str, dict[str, Any]]] = []
        self._reader: asyncio.Task[None] | None = None

    def topic(self, kind: str) -> str:
        return mqtt.topic(self.prefix, self.did, kind)

    async def __aenter__(self) -> Device:
        await self.client.__aenter__()
        for kind in (mqtt.ACKS, mqtt.ERRORS, mqtt.COMMANDS):
            await self.client.subscribe(self.topic(kind), qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._reader is not None
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.publish(self.topic(mqtt.STATUS), b"", qos=1, retain=True)
            await self.client.__aexit__(None, None, None)

    async def _read(self) -> None:
        async for m in self.client.messages:
            assert isinstance(m.payload, bytes)
            self.got.append((m.topic.value.rsplit("/", 1)[1], json.loads(m.payload)))

    async def publish(self, kind: str, body: Any, retain: bool = False, qos: int = 1) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        await self.client.publish(self.topic(kind), payload, qos=qos, retain=retain)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for k, m in self.got if k == kind]

    def acked(self) -> int:
        return max((m["seq"] for m in self.of(mqtt.ACKS)), default=0)


def puback_of(port: int, user: str, password: str, topic: str, payload: bytes) -> str:
    """Publish once (QoS 1, MQTT 5, as ``user``) and return the reason of the broker's PUBACK."""
    done: queue.Queue[str] = queue.Queue()
    c = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=f"{user}-probe", protocol=paho.MQTTv5
    )
    c.username_pw_set(user, password)
    c.on_publish = lambda _c, _u, _mid, reason, _p: done.put(str(reason))
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1)
        return done.get(timeout=10)
    finally:
        c.disconnect()
        c.loop_stop()


def reading(seq: int, **values: Any) -> dict[str, Any]:
    return {"type": "reading", **item(seq, **values)}


def item(seq: int, **values: Any) -> dict[str, Any]:
    """A reading in a ``readings`` batch."""
    return {"seq": seq, "ts": time.time(), **values}


@contextlib.asynccontextmanager
async def bridged(
    tmp_path: Path,
    url: str = "mqtt://127.0.0.1:1883",
    prefix: str | None = None,
    wait: bool = True,
    **overrides: Any,
) -> AsyncIterator[tuple[RunningServer, str]]:
    """A vitalwire bridged to the broker at ``url``, with a topic prefix of its own."""
    prefix = prefix or "vwtest-" + uuid.uuid4().hex[:10]
    srv, task = await start_server(
        tmp_path,
        mqtt_url=url,
        mqtt_topic_prefix=prefix,
        mqtt_client_id=prefix + "-server",
        mqtt_session_expiry_s=overrides.pop("mqtt_session_expiry_s", 0),
        **overrides,
    )
    try:
        if wait:
            await asyncio.wait_for(srv.services.mqtt.connected.wait(), 10)
        yield srv, prefix
    finally:
        await stop_server(srv, task)


async def eventually(check: Any, timeout: float, what: str) -> None:
    """Wait until the coroutine function ``check`` returns True, failing after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def stream_events(srv: RunningServer, pid: str, kind: str) -> list[dict[str, Any]]:
    await srv.services.writer.flush()
    events = await srv.services.store.events_after(f"patient:{pid}", 0, 100_000)
    return [e.data for e in events if e.kind == kind]


async def test_readings_land_once_and_are_acked_after_they_are_durable(tmp_path: Path) -> None:
    need_broker()
    async with bridged(tmp_path) as (srv, prefix):
        did, _, pid = srv.device(0)
        async with Device(prefix, did) as dev:
            await dev.publish(mqtt.READINGS, reading(1, spo2=97, pulse=70))
            await dev.publish(
                mqtt.READINGS,
                {"type": "readings", "items": [item(2, spo2=96), item(3, spo2=95)]},
            )
            await wait_until(lambda: dev.acked() == 3, 10, "ack of seq 3")
            # acknowledged means durable: the store has them now, without a flush
            stored = await srv.services.store.events_after(f"patient:{pid}", 0, 1000)
            assert [e.data["seq"] for e in stored if e.kind == "reading"] == [1, 2, 3]
            ts2 = next(e for e in stored if e.data.get("seq") == 2).data["ts"]
            dup = {"type": "reading", "seq": 2, "ts": ts2, "spo2": 96}
            n_acks = len(dev.of(mqtt.ACKS))
            await dev.publish(mqtt.READINGS, dup)  # a resend: acked again, not stored twice
            await wait_until(lambda: len(dev.of(mqtt.ACKS)) > n_acks, 10, "ack of the resend")
            assert dev.acked() == 3
            seqs = [d["seq"] for d in await stream_events(srv, pid, "reading")]
            assert seqs == [1, 2, 3]
            assert dev.of(mqtt.ERRORS) == []


async def test_a_bad_reading_gets_an_error_naming_the_field_and_the_others_land(
    tmp_path: Path,
) -> None:
    need_broker()
    async with bridged(tmp_path) as (srv, prefix):
        did, _, pid = srv.device(0)
        async with Device(prefix, did) as dev:
            items = [item(1, spo2=97), item(2, spo2=140), item(3, spo2=96)]
            await dev.publish(mqtt.READINGS, {"type": "readings", "items": items})
            await dev.publish(mqtt.READINGS, b"{not json")
            await dev.publish(mqtt.READINGS, {"type": "ping"})
            await wait_until(lambda: len(dev.of(mqtt.ERRORS)) == 3, 10, "three errors")
            bad, garbled, wrong_type = dev.of(mqtt.ERRORS)
            assert (bad["code"], bad["field"], bad["seq"]) == ("invalid_reading", "spo2", 2)
            assert "100" in bad["message"] and "140" in bad["message"]
            assert garbled["code"] == "invalid_message"
            assert wrong_type["field"] == "type" and "readings" in wrong_type["message"]
            await wait_until(lambda: dev.acked() == 3, 10, "ack of seq 3")
            assert [d["seq"] for d in await stream_events(srv, pid, "reading")] == [1, 3]


async def test_messages_past_the_bounds_are_refused_alone(tmp_path: Path) -> None:
    """max_frame_bytes and max_batch hold on MQTT as on the socket: an error naming the bound,
    nothing stored, and the next reading still taken."""
    need_broker()
    async with bridged(tmp_path, max_frame_bytes=2048, max_batch=3) as (srv, prefix):
        did, _, pid = srv.device(0)
        async with Device(prefix, did) as dev:
            big = {"type": "readings", "items": [item(s, spo2=97) for s in range(1, 60)]}
            await dev.publish(mqtt.READINGS, big)
            four = {"type": "readings", "items": [item(s, spo2=97) for s in range(1, 5)]}
            await dev.publish(mqtt.READINGS, four)
            await dev.publish(mqtt.READINGS, reading(1, spo2=97))
            await wait_until(lambda: dev.acked() == 1, 10, "ack of seq 1")
            too_big, too_many = dev.of(mqtt.ERRORS)
            assert too_big["field"] == "frame" and "at most 2048 bytes" in too_big["message"]
            assert too_many["field"] == "items" and "at most 3 readings" in too_many["message"]
            assert [d["seq"] for d in await stream_events(srv, pid, "reading")] == [1]


async def test_a_device_over_its_rate_is_refused_until_it_publishes_again(
    tmp_path: Path,
) -> None:
    """The /ws/device bound on MQTT: past it an error names the bound and the first refused
    seq; later readings wait until the device publishes again from it, so no ack ever covers
    a refused reading; the bridge, the session and another device are not touched."""
    need_broker()
    async with bridged(tmp_path, device_msgs_per_s=1.0, device_msgs_burst=2) as (srv, prefix):
        bridge = srv.services.mqtt
        now = [1000.0]
        bridge.clock = lambda: now[0]  # the bucket refills only when the test says
        (did, _, pid), (other, _, other_pid) = srv.device(0), srv.device(1)
        async with Device(prefix, did) as dev, Device(prefix, other) as dev_b:
            await dev.publish(mqtt.READINGS, reading(1, spo2=97))
            await dev.publish(mqtt.READINGS, reading(2, spo2=96))
            await dev.publish(mqtt.READINGS, reading(3, spo2=95))  # past the burst of 2
            await dev.publish(mqtt.READINGS, reading(4, spo2=94))
            for seq in (1, 2):
                await dev_b.publish(mqtt.READINGS, reading(seq, spo2=98))
            await wait_until(lambda: len(dev.of(mqtt.ERRORS)) == 2, 10, "two refusals")
            await wait_until(lambda: dev_b.acked() == 2, 10, "the other device's ack")
            over, still = dev.of(mqtt.ERRORS)
            assert (over["code"], over["seq"]) == ("rate_limited", 3)
            assert "at most 1/s, burst 2" in over["message"]
            assert (still["code"], still["seq"]) == ("rate_limited", 3)
            assert dev.acked() == 2
            now[0] += 10  # tokens again: a new reading is refused until 3 comes again
            await dev.publish(mqtt.READINGS, reading(5, spo2=93))
            await wait_until(lambda: len(dev.of(mqtt.ERRORS)) == 3, 10, "a third refusal")
            owed = dev.of(mqtt.ERRORS)[2]
            assert (owed["code"], owed["field"], owed["seq"]) == ("rate_limited", "seq", 3)
            assert "from seq 3" in owed["message"] and "got seq 5" in owed["message"]
            assert dev.acked() == 2  # nothing refused is covered by an ack
            items = [item(3, spo2=95), item(4, spo2=94), item(5, spo2=93)]
            await dev.publish(mqtt.READINGS, {"type": "readings", "items": items})
            await wait_until(lambda: dev.acked() == 5, 10, "ack of seq 5")
            assert len(dev.of(mqtt.ERRORS)) == 3
            assert [d["seq"] for d in await stream_events(srv, pid, "reading")] == [1, 2, 3, 4, 5]
            assert [d["seq"] for d in await stream_events(srv, other_pid, "reading")] == [1, 2]
            assert dev_b.of(mqtt.ERRORS) == []
            assert bridge.connected.is_set() and did in srv.services.ingest.sessions


async def test_a_gap_after_the_high_seq_is_refused_until_the_device_publishes_again(
    tmp_path: Path,
) -> None:
    """A QoS 1 message that skips seqs may follow messages the broker dropped: it is refused
    (``seq_gap``, naming the seq to publish again from) and so is every later one, until the
    device publishes again from its first reading not acknowledged; a device whose seqs skip
    on purpose publishes the refused reading again and it is taken; QoS 0 is not held; a
    refusal no resend answers lapses after ``mqtt_resend_wait_s`` and the gap is taken."""
    need_broker()
    async with bridged(tmp_path, mqtt_resend_wait_s=15) as (srv, prefix):
        bridge = srv.services.mqtt
        now = [1000.0]
        bridge.clock = lambda: now[0]
        did, _, pid = srv.device(0)

        def errors() -> list[tuple[str, int, str]]:
            return [(e["code"], e["seq"], e["message"]) for e in dev.of(mqtt.ERRORS)]

        async with Device(prefix, did) as dev:
            await dev.publish(mqtt.READINGS, reading(1, spo2=97))
            await dev.publish(mqtt.READINGS, reading(2, spo2=96))
            await wait_until(lambda: dev.acked() == 2, 10, "ack of seq 2")
            await dev.publish(mqtt.READINGS, reading(5, spo2=95))  # 3 and 4 never arrived
            await dev.publish(mqtt.READINGS, reading(6, spo2=94))  # in flight behind it
            await wait_until(lambda: len(dev.of(mqtt.ERRORS)) == 2, 10, "two refusals")
            (code, seq, msg), (code2, seq2, msg2) = errors()
            assert (code, seq, dev.of(mqtt.ERRORS)[0]["field"]) == ("seq_gap", 3, "seq")
            assert "seq 5 leaves a gap after seq 2" in msg and "from seq 3" in msg
            assert (code2, seq2) == ("seq_gap", 3) and "got seq 6" in msg2
            assert dev.acked() == 2  # no ack covers what the broker may have dropped
            items = [item(s, spo2=90 + s) for s in (3, 4, 5, 6)]  # the spool, from seq 3
            await dev.publish(mqtt.READINGS, {"type": "readings", "items": items})
            await wait_until(lambda: dev.acked() == 6, 10, "ack of seq 6")
            assert bridge.refusals == {} and bridge.gaps_refused == 1

            # seqs that skip on purpose: the refused reading, published again, is taken
            await dev.publish(mqtt.READINGS, reading(10, spo2=93))
            await wait_until(lambda: len(dev.of(mqtt.ERRORS)) == 3, 10, "a third refusal")
            assert errors()[2][:2] == ("seq_gap", 7)
            await dev.publish(mqtt.READINGS, reading(10, spo2=93))
            await wait_until(lambda: dev.acked() == 10, 10, "ack of seq 10")

            # QoS 0 promises nothing: what arrives is taken, gap and all
            await dev.publish(mqtt.READINGS, reading(20, spo2=92), qos=0)
            await wait_until(lambda: dev.acked() == 20, 10, "ack of seq 20")

            # a device with no spool: refused until mqtt_resend_wait_s, then taken
            await dev.publish(mqtt.READINGS, reading(30, spo2=91))
            await dev.publish(mqtt.READINGS, reading(31, spo2=91))
            await wait_until(lambda: len(dev.of(mqtt.ERRORS)) == 5, 10, "two more refusals")
            assert [e[:2] for e in errors()[3:]] == [("seq_gap", 21), ("seq_gap", 21)]
            now[0] += 14.9
            await dev.publish(mqtt.READINGS, reading(32, spo2=91))
            await wait_until(lambda: len(dev.of(mqtt.ERRORS)) == 6, 10, "refused still")
            now[0] += 0.1
            await dev.publish(mqtt.READINGS, reading(33, spo2=91))
            await wait_until(lambda: dev.acked() == 33, 10, "ack of seq 33")
            assert len(dev.of(mqtt.ERRORS)) == 6
            stored = [d["seq"] for d in await stream_events(srv, pid, "reading")]
            assert stored == [1, 2, 3, 4, 5, 6, 10, 20, 33]
            assert (bridge.gaps_refused, bridge.gaps_taken) == (3, 1)
            async with httpx.AsyncClient(base_url=srv.url) as http:
                metrics = (await http.get("/metrics")).text
            assert "vitalwire_mqtt_gaps_refused_total 3.0" in metrics
            assert "vitalwire_mqtt_gaps_taken_total 1.0" in metrics


async def test_readings_a_restarted_broker_dropped_are_published_again_not_acked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker restarts without persistence and the device is back on it before vitalwire:
    what it publishes meanwhile is PUBACKed by the broker and dropped (nobody subscribes). Its
    next reading leaves a gap: refused, so the device publishes again from vitalwire's last
    ack, and every reading is stored once, in order (taken, the ack would have covered the
    dropped ones, which the device then deletes)."""
    monkeypatch.setattr(mqtt, "RECONNECT_S", (2.0, 5.0))  # vitalwire comes back after the device
    broker = Broker(tmp_path, "allow_anonymous true\n")
    await broker.start()
    try:
        async with bridged(
            tmp_path, f"mqtt://127.0.0.1:{broker.port}", mqtt_session_expiry_s=600
        ) as (srv, prefix):
            bridge = srv.services.mqtt
            did, _, pid = srv.device(0)
            async with Device(prefix, did, broker.port) as dev:
                for s in (1, 2, 3):
                    await dev.publish(mqtt.READINGS, reading(s, spo2=90 + s))
                await wait_until(lambda: dev.acked() == 3, 10, "ack of seq 3")
            broker.kill()
            await broker.start()
            async with Device(prefix, did, broker.port) as dev:
                for s in (4, 5, 6):
                    await dev.publish(mqtt.READINGS, reading(s, spo2=90 + s))  # PUBACKed
                assert not bridge.connected.is_set()  # ... and dropped: nobody subscribes
                await asyncio.wait_for(bridge.connected.wait(), 15)
                await dev.publish(mqtt.READINGS, reading(7, spo2=97))
                await wait_until(lambda: dev.of(mqtt.ERRORS) != [], 10, "the refusal")
                assert [(e["code"], e["seq"]) for e in dev.of(mqtt.ERRORS)] == [("seq_gap", 4)]
                assert dev.acked() <= 3
                items = [item(s, spo2=90 + s) for s in range(4, 9)]  # the spool, from seq 4
                await dev.publish(mqtt.READINGS, {"type": "readings", "items": items})
                await wait_until(lambda: dev.acked() == 8, 10, "ack of seq 8")
            seqs = [d["seq"] for d in await stream_events(srv, pid, "reading")]
            assert seqs == list(range(1, 9))
    finally:
        broker.kill()


async def test_the_simulated_mqtt_device_publishes_again_when_refused_for_a_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulator's MQTT device reads its errors: a ``seq_gap`` makes it publish its spool
    again at once (its periodic resend is put out of reach here), so the readings the
    restarted broker dropped are stored, once and in order."""
    monkeypatch.setattr(mqtt, "RECONNECT_S", (4.0, 5.0))  # vitalwire comes back after the device
    broker = Broker(tmp_path, "allow_anonymous true\n")
    await broker.start()
    url = f"mqtt://127.0.0.1:{broker.port}"
    try:
        async with bridged(tmp_path, url, mqtt_session_expiry_s=600) as (srv, prefix):
            bridge = srv.services.mqtt
            did, _, pid = srv.device(0)
            dev = MqttDevice(url, did, prefix=prefix)
            dev.RESEND_S = 600.0  # only the refusal can make it publish again in time
            await dev.start()
            try:
                for _ in range(3):
                    dev.send(spo2=97)
                await dev.flush(10)
                broker.kill()
                await broker.start()
                await wait_until(lambda: dev.connections == 2, 10, "the device back first")
                for _ in range(3):
                    dev.send(spo2=96)  # to a broker nobody subscribes to yet: dropped
                assert not bridge.connected.is_set()
                await asyncio.wait_for(bridge.connected.wait(), 15)
                dev.send(spo2=95)
                await dev.flush(10)
                assert [(e["code"], e["seq"]) for e in dev.errors][:1] == [("seq_gap", 4)]
                assert dev.acked == 7
            finally:
                await dev.close()
            seqs = [d["seq"] for d in await stream_events(srv, pid, "reading")]
            assert seqs == list(range(1, 8))
    finally:
        broker.kill()


async def test_an_unknown_device_is_refused_with_an_error(tmp_path: Path) -> None:
    need_broker()
    async with bridged(tmp_path) as (srv, prefix):
        async with Device(prefix, "no-such-device") as dev:
            await dev.publish(mqtt.READINGS, reading(1, spo2=97))
            await wait_until(lambda: dev.of(mqtt.ERRORS), 10, "an error")
            err = dev.of(mqtt.ERRORS)[0]
            assert (err["code"], err["field"]) == ("unauthenticated", "device_id")
            assert dev.of(mqtt.ACKS) == []
        assert "no-such-device" not in srv.services.ingest.sessions


async def test_a_critical_reading_raises_an_alert(tmp_path: Path) -> None:
    need_broker()
    async with bridged(tmp_path) as (srv, prefix):
        did, _, pid = srv.device(0)
        async with Device(prefix, did) as dev:
            await dev.publish(mqtt.READINGS, reading(1, spo2=80, pulse=110, probe=True, pi=2.0))
            await wait_until(lambda: dev.acked() == 1, 10, "ack")
            await srv.services.writer.flush()
            alerts = await stream_events(srv, pid, "alert")
            raised = [a for a in alerts if a["condition"] == "spo2_low"]
            assert raised and raised[0]["priority"] == "high" and raised[0]["action"] == "raised"


async def test_presence_and_the_last_will_give_device_status_events(tmp_path: Path) -> None:
    need_broker()
    async with bridged(tmp_path) as (srv, prefix):
        did, _, pid = srv.device(0)
        will = mqtt.topic(prefix, did, mqtt.STATUS)
        # a device process that dies without a DISCONNECT: the broker publishes its will
        sub = subprocess.Popen(
            ["mosquitto_sub", "-h", BROKER[0], "-p", str(BROKER[1]), "-V", "mqttv5"]
            + ["-i", f"{prefix}-will", "-t", f"{prefix}/probe"]
            + ["--will-topic", will, "--will-payload", "offline", "--will-retain"]
            + ["--will-qos", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            async with aiomqtt.Client(*BROKER, identifier=f"{prefix}-pub") as pub:
                # connected and subscribed once it has printed the retained probe
                await pub.publish(f"{prefix}/probe", b"ready", qos=1, retain=True)
                assert sub.stdout is not None
                line = await asyncio.wait_for(asyncio.to_thread(sub.stdout.readline), 10)
                assert line.strip() == b"ready"
                await pub.publish(f"{prefix}/probe", b"", qos=1, retain=True)
                await pub.publish(will, b"online", qos=1, retain=True)

                await wait_until(lambda: did in srv.services.ingest.sessions, 10, "a session")
                statuses = [d["status"] for d in await stream_events(srv, pid, "device_status")]
                assert statuses[-1] == "online"
                srv.services.alerts.offline_grace_s = 0  # as for a closed socket, no grace
                sub.send_signal(signal.SIGKILL)
                sub.wait(10)
                await wait_until(
                    lambda: did not in srv.services.ingest.sessions, 15, "the last will"
                )
                last = (await stream_events(srv, pid, "device_status"))[-1]
                assert (last["status"], last["reason"]) == ("offline", "offline (last will)")

                async def offline_alert() -> bool:
                    alerts = await stream_events(srv, pid, "alert")
                    return any(a["condition"] == "device_offline" for a in alerts)

                await eventually(offline_alert, 10, "the device_offline alert")
                await pub.publish(will, b"", qos=1, retain=True)
        finally:
            if sub.poll() is None:
                sub.kill()
                sub.wait(10)
            if sub.stdout is not None:
                sub.stdout.close()


async def test_a_command_runs_its_lifecycle_over_mqtt(tmp_path: Path) -> None:
    need_broker()
    async with bridged(tmp_path) as (srv, prefix):
        did, _, pid = srv.device(0)
        user, pw = srv.user("clinician")
        mon = MonitorClient(srv.url, username=user, password=pw)
        await mon.connect()
        try:
            # queued while the device is away (no session yet) ...
            queued = await mon.request(wire.SendCommand(patient_id=pid, name="report_now"))
            assert isinstance(queued, wire.Result), queued
            cmd = queued.data["command"]
            assert (cmd["status"], cmd["device_connected"]) == ("queued", False)
            cid = cmd["command_id"]
            async with Device(prefix, did) as dev:
                await dev.publish(mqtt.STATUS, b"online", retain=True)  # ... delivered at once
                await wait_until(lambda: dev.of(mqtt.COMMANDS), 10, "the command")
                cmd = dev.of(mqtt.COMMANDS)[0]
                assert (cmd["command_id"], cmd["name"]) == (cid, "report_now")
                for status in ("acknowledged", "completed"):
                    body = {"type": "command_result", "command_id": cid, "status": status}
                    await dev.publish(mqtt.COMMAND_RESULTS, body)
                seen: list[str] = []
                while seen[-1:] != ["completed"]:
                    e = await mon.next_event(10)
                    if e.kind == "command" and e.data["command_id"] == cid:
                        seen.append(e.data["status"])
                assert seen == ["queued", "sent", "acknowledged", "completed"]
                await dev.publish(
                    mqtt.COMMAND_RESULTS,
                    {"type": "command_result", "command_id": "cmd-unknown", "status": "completed"},
                )
                await wait_until(lambda: dev.of(mqtt.ERRORS), 10, "an error")
                assert dev.of(mqtt.ERRORS)[0]["field"] == "command_id"
        finally:
            await mon.close()


async def test_the_broker_enforces_each_devices_identity(tmp_path: Path) -> None:
    """Files from `vitalwire admin mqtt-acl`: a device publishing as another is refused."""
    need_mosquitto()
    server_pw = "srv-" + uuid.uuid4().hex
    broker = Broker(tmp_path, "allow_anonymous false\npassword_file {pw}\nacl_file {acl}\n")
    url = f"mqtt://vitalwire:{server_pw}@127.0.0.1:{broker.port}"
    pw_file, acl_file = tmp_path / "passwords", tmp_path / "acl"
    broker.conf.write_text(broker.conf.read_text().format(pw=pw_file, acl=acl_file))
    # the server runs first (its bridge retries until the broker is up): the files are written
    # from its registry as it stands, by the documented command
    async with bridged(tmp_path, url, prefix="vitalwire", wait=False) as (srv, _):
        (did_a, _, _), (did_b, _, _) = srv.device(0), srv.device(1)
        env = {**os.environ, "VITALWIRE_MQTT_URL": url, "VITALWIRE_MQTT_TOPIC_PREFIX": "vitalwire"}
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "vitalwire.cli", "admin", "mqtt-acl"]
            + ["--db", srv.services.settings.db, "--passwords", str(pw_file)]
            + ["--acl", str(acl_file), "--print-passwords"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        passwords = dict(line.split(" ") for line in lines if line.count(" ") == 1)
        assert {did_a, did_b} <= set(passwords)
        assert oct(pw_file.stat().st_mode & 0o777) == "0o600"
        await broker.start()
        try:
            await asyncio.wait_for(srv.services.mqtt.connected.wait(), 15)
            # a wrong password is refused by the broker
            with pytest.raises(aiomqtt.MqttError):
                async with Device("vitalwire", did_a, broker.port, did_a, "wrong"):
                    pass
            async with Device("vitalwire", did_a, broker.port, did_a, passwords[did_a]) as dev:
                # as itself: stored and acked
                await dev.publish(mqtt.READINGS, reading(1, spo2=97))
                await wait_until(lambda: dev.acked() == 1, 10, "ack")
                # as device b: the broker refuses (MQTT 5: PUBACK "not authorized")
                taken = srv.services.mqtt.received
                code = await asyncio.to_thread(
                    puback_of,
                    broker.port,
                    did_a,
                    passwords[did_a],
                    mqtt.topic("vitalwire", did_b, mqtt.READINGS),
                    json.dumps(reading(1, spo2=50)).encode(),
                )
                assert code == "Not authorized"
                # and nothing reached vitalwire: the next own reading is the next message
                await dev.publish(mqtt.READINGS, reading(2, spo2=96))
                await wait_until(lambda: dev.acked() == 2, 10, "ack")
                assert srv.services.mqtt.received == taken + 1
                assert did_b not in srv.services.ingest.sessions
        finally:
            broker.kill()


async def test_a_broker_restart_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """kill -9 of the broker mid-stream: the device resends what vitalwire did not ack; every
    reading is stored once, in order, and every ack was true."""
    broker = Broker(tmp_path, "allow_anonymous true\n")
    await broker.start()
    n = 400
    t0 = time.time() - n * 0.01
    bodies = [
        json.dumps({"type": "reading", "seq": s, "ts": t0 + s * 0.01, "spo2": 95 + s % 3}).encode()
        for s in range(n + 1)
    ]
    acked = 0
    acks_seen: list[int] = []
    try:
        async with bridged(
            tmp_path, f"mqtt://127.0.0.1:{broker.port}", mqtt_session_expiry_s=600
        ) as (srv, prefix):
            did, _, pid = srv.device(0)

            async def device() -> None:
                """Publish seq 1..n; after a reconnect, or when acks stop coming, resend from
                vitalwire's last ack (the device's spool)."""
                nonlocal acked
                while acked < n:
                    try:
                        async with Device(prefix, did, broker.port) as dev:
                            seq = acked + 1
                            while acked < n:
                                if seq <= n:
                                    await dev.client.publish(
                                        dev.topic(mqtt.READINGS), bodies[seq], qos=1
                                    )
                                    seq += 1
                                else:
                                    before = acked
                                    with contextlib.suppress(AssertionError):
                                        await wait_until(
                                            lambda b=before: dev.acked() > b, 2, "acks"
                                        )
                                    if dev.acked() <= before:
                                        seq = acked + 1  # nothing new acked: resend the rest
                                for a in (m["seq"] for m in dev.of(mqtt.ACKS)):
                                    acks_seen.append(a)
                                acked = max(acked, dev.acked())
                    except aiomqtt.MqttError:
                        await asyncio.sleep(0.1)  # the device's reconnect interval

            feeder = asyncio.create_task(device())
            await wait_until(lambda: acked >= 100 or feeder.done(), 30, "100 readings acked")
            acked_before_kill = acked
            broker.kill()
            await broker.start()
            await asyncio.wait_for(feeder, 60)
            seqs = [d["seq"] for d in await stream_events(srv, pid, "reading")]
            assert seqs == list(range(1, n + 1))  # every reading once, in order
            assert 100 <= acked_before_kill < n and acked == n  # the kill was mid-stream
            assert max(acks_seen) == n
    finally:
        broker.kill()


async def test_readings_published_while_vitalwire_is_away_land_when_it_is_back(
    tmp_path: Path,
) -> None:
    """The bridge's session outlives its connection (clean start off, session expiry): what the
    broker queued for it while vitalwire was stopped is delivered, stored once and acked."""
    need_broker()
    prefix = "vwtest-" + uuid.uuid4().hex[:10]
    async with bridged(tmp_path, prefix=prefix, mqtt_session_expiry_s=60) as (srv, _):
        did, _, pid = srv.device(0)
    # vitalwire is stopped: its subscriptions stay in the broker, which queues for it
    async with Device(prefix, did) as dev:
        await dev.publish(mqtt.READINGS, reading(1, spo2=97))
        await dev.publish(
            mqtt.READINGS, {"type": "readings", "items": [item(2, spo2=96), item(3, spo2=95)]}
        )
        assert dev.acked() == 0
        async with bridged(tmp_path, prefix=prefix, mqtt_session_expiry_s=1) as (srv, _):
            # (the test server's start rotates the devices' secrets, which ends the session the
            # queued readings opened: the device's presence opens it again, with its ack)
            await dev.publish(mqtt.STATUS, b"online")
            await wait_until(lambda: dev.acked() == 3, 15, "ack of what was queued")
            assert [d["seq"] for d in await stream_events(srv, pid, "reading")] == [1, 2, 3]
            assert dev.of(mqtt.ERRORS) == []


async def test_a_shared_subscription_takes_the_readings(tmp_path: Path) -> None:
    """``mqtt_shared``: readings come through ``$share/vitalwire/...``; presence is read as
    before (not shared)."""
    need_broker()
    async with bridged(tmp_path, mqtt_shared=True) as (srv, prefix):
        did, _, pid = srv.device(0)
        async with Device(prefix, did) as dev:
            await dev.publish(mqtt.STATUS, b"online", retain=True)
            await wait_until(lambda: did in srv.services.ingest.sessions, 10, "a session")
            await dev.publish(mqtt.READINGS, reading(1, spo2=97))
            await dev.publish(mqtt.READINGS, reading(2, spo2=96))
            await wait_until(lambda: dev.acked() == 2, 10, "ack of seq 2")
            assert [d["seq"] for d in await stream_events(srv, pid, "reading")] == [1, 2]


async def _packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One MQTT packet read by the scripted broker: (first byte, the rest)."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)


def _publish(name: bytes, payload: bytes, pid: int = 0, props: bytes = b"") -> bytes:
    """A PUBLISH as a broker sends it (QoS 1 when ``pid``), MQTT 5 properties ``props``."""
    body = len(name).to_bytes(2, "big") + name + (pid.to_bytes(2, "big") if pid else b"")
    body += mqtt.varint(len(props)) + props + payload
    return bytes([0x32 if pid else 0x30]) + mqtt.varint(len(body)) + body


async def test_the_bridges_reader_takes_packets_however_the_socket_cuts_them() -> None:
    """The bridge's MQTT 5 connection (BrokerLink) against a scripted broker on a real socket:
    the CONNECT asks for the persistent session; PUBLISH packets (QoS 0 and 1, with and
    without properties, a remaining length of one and of two bytes) are taken whole and in
    order whether they arrive a byte at a time or all at once; each QoS 1 one is PUBACKed
    after it was taken, none while reading is paused; vitalwire's own publishes keep to the
    broker's Receive Maximum."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put((r, w))

    broker = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = broker.sockets[0].getsockname()[1]
    taken: list[tuple[bytes, bytes, int]] = []
    loop = asyncio.get_running_loop()
    _, link = await loop.create_connection(
        lambda: mqtt.BrokerLink(lambda t, p, q: taken.append((t, p, q))), "127.0.0.1", port
    )
    reader, writer = await asyncio.wait_for(accepted.get(), 10)
    try:
        subs = [("p/devices/+/readings", 1), ("$share/vitalwire/p/devices/+/status", 1)]
        start = asyncio.create_task(link.start("vw", "user", "pw", 30, 600, 1000, subs))
        first, connect = await asyncio.wait_for(_packet(reader), 10)
        assert first == 0x10 and connect[:7] == b"\x00\x04MQTT\x05"
        assert connect[7] == 0x80 | 0x40  # user name and password; clean start off
        props, pos = mqtt.properties(connect, 10)
        assert props == {0x11: 600, 0x21: 1000}  # session expiry, Receive Maximum
        assert connect[pos:] == b"\x00\x02vw\x00\x04user\x00\x02pw"
        writer.write(b"\x20\x06\x01\x00\x03\x21\x00\x02")  # session present, Receive Maximum 2
        first, sub = await asyncio.wait_for(_packet(reader), 10)
        assert first == 0x82 and sub[2] == 0  # no properties
        assert sub.endswith(b"p/devices/+/readings\x01\x00#$share/vitalwire/p/devices/+/status\x01")
        writer.write(b"\x90\x05" + sub[:2] + b"\x00\x01\x01")  # both granted QoS 1
        await asyncio.wait_for(start, 10)
        assert link.up and link.session_present

        big = b'{"type":"readings","items":[' + b"1" * 300 + b"]}"
        stream = b"".join(
            [
                _publish(b"p/devices/d1/readings", b'{"seq":1}', pid=7),
                _publish(b"p/devices/d1/status", b"online"),  # QoS 0: no PUBACK
                _publish(
                    b"p/devices/d2/readings", b"x", pid=8, props=b"\x01\x01\x26\x00\x01k\x00\x01v"
                ),
                _publish(b"p/devices/d3/readings", big, pid=9),
            ]
        )
        want = [  # (topic, payload, QoS)
            (b"p/devices/d1/readings", b'{"seq":1}', 1),
            (b"p/devices/d1/status", b"online", 0),
            (b"p/devices/d2/readings", b"x", 1),
            (b"p/devices/d3/readings", big, 1),
        ]
        for i in range(len(stream)):
            link.data_received(stream[i : i + 1])
        assert taken == want
        link.data_received(stream)
        assert taken == want * 2
        for pid in (7, 8, 9, 7, 8, 9):
            assert await asyncio.wait_for(_packet(reader), 10) == (0x40, pid.to_bytes(2, "big"))

        link.pause()  # backpressure: read, not taken, not PUBACKed
        link.data_received(_publish(b"p/devices/d4/readings", b"late", pid=10))
        assert len(taken) == 8
        link.publish(b"\x00\x05p/ack", b"a1")  # goes out at once: PUBACKs did not
        link.resume()
        assert taken[-1] == (b"p/devices/d4/readings", b"late", 1)
        first, body = await asyncio.wait_for(_packet(reader), 10)
        assert first == 0x32 and body.endswith(b"p/ack\x00\x02\x00a1")  # 1: the SUBSCRIBE's
        assert await asyncio.wait_for(_packet(reader), 10) == (0x40, b"\x00\x0a")

        # the broker's Receive Maximum of 2: a third publish waits for a PUBACK (the PUBACK
        # vitalwire writes meanwhile goes out before it)
        link.publish(b"\x00\x05p/ack", b"a2")
        link.publish(b"\x00\x05p/ack", b"a3")
        link.data_received(_publish(b"p/devices/d4/readings", b"next", pid=11))
        first, body = await asyncio.wait_for(_packet(reader), 10)
        assert first == 0x32 and body.endswith(b"a2")
        assert await asyncio.wait_for(_packet(reader), 10) == (0x40, b"\x00\x0b")
        writer.write(b"\x40\x02\x00\x02")  # PUBACK of a1
        first, body = await asyncio.wait_for(_packet(reader), 10)
        assert first == 0x32 and body.endswith(b"a3")
    finally:
        link.close()
        writer.close()
        broker.close()
        await broker.wait_closed()


async def test_simulated_devices_stream_through_the_broker(tmp_path: Path) -> None:
    """What `vitalwire simulate --mqtt` runs: every reading sent is acked and stored once."""
    need_broker()
    async with bridged(tmp_path) as (srv, prefix):
        devs = [SimDevice(*srv.device(i)) for i in range(2)]
        clients = await run_ward(
            srv.url, devs, rate_hz=10, duration_s=1.0, mqtt=MqttOptions(BROKER_URL, prefix)
        )
        for client, dev in zip(clients, devs, strict=True):
            assert client.seq >= 5 and client.acked == client.seq
            seqs = [d["seq"] for d in await stream_events(srv, dev.patient_id or "", "reading")]
            assert seqs == list(range(1, client.seq + 1))


def test_simulate_refuses_a_bad_mqtt_url(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vitalwire.cli", "simulate", "--mqtt", "http://x", "--devices", "1"]
        + ["--db", f"sqlite:///{tmp_path / 'v.db'}", "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 1 and "mqtt_url must look like mqtt://" in out.stderr, out.stderr


def test_mqtt_acl_needs_the_servers_mqtt_user(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITALWIRE_MQTT")}
    base = [sys.executable, "-m", "vitalwire.cli", "admin", "mqtt-acl", "--db"]
    args = [f"sqlite:///{tmp_path / 'v.db'}", "--passwords", "p", "--acl", "a"]
    out = subprocess.run(base + args, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "VITALWIRE_MQTT_URL" in out.stderr, out.stderr
    env["VITALWIRE_MQTT_URL"] = "mqtt://127.0.0.1:1883"
    out = subprocess.run(base + args, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "user and password" in out.stderr, out.stderr
    assert not (tmp_path / "p").exists()


def test_passwords_are_mosquittos_pbkdf2_format() -> None:
    """The $7$ line Mosquitto reads: PBKDF2-SHA512, 101 iterations, a 12-byte salt."""
    import base64
    import hashlib

    line = mqtt.mosquitto_hash("secret-pw", salt=b"0123456789ab")
    _, seven, iterations, salt, digest = line.split("$")
    assert (seven, iterations, base64.b64decode(salt)) == ("7", "101", b"0123456789ab")
    want = hashlib.pbkdf2_hmac("sha512", b"secret-pw", b"0123456789ab", 101)
    assert base64.b64decode(digest) == want
    a = mqtt.device_password("k", "mon-001", "hash-1")
    assert a == mqtt.device_password("k", "mon-001", "hash-1")
    assert a != mqtt.device_password("k", "mon-001", "hash-2")  # a rotated secret: a new one
    assert a != mqtt.device_password("k2", "mon-001", "hash-1")


def test_a_bad_mqtt_url_is_refused_at_start() -> None:
    from pydantic import ValidationError

    from vitalwire.settings import Settings

    with pytest.raises(ValidationError, match="mqtt_url"):
        Settings(mqtt_url="http://broker:1883")
    assert Settings(mqtt_url="mqtt://u:p@broker:1883").mqtt_url == "mqtt://u:p@broker:1883"
    with pytest.raises(mqtt.MqttUrlError, match="mqtt://user:pass@host:port"):
        mqtt.parse_url("")
