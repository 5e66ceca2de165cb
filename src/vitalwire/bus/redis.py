"""Redis bus (``redis://host:port/db?prefix=NAME``): fan-out and history shared by every process.

What each process sees:

- Its own events reach its listener at once, inside :meth:`RedisBus.publish`, exactly as with
  the memory bus: the commit path never waits on the network. The same events then go to Redis
  from one background task, in the order they were published, at most every
  ``WRITE_INTERVAL_S``: each round's events are appended to their streams' histories (a Redis
  stream per event stream, its entry id the event's offset, trimmed to ``history_size``
  entries) and published as one message on one channel, by one script that Redis runs whole.
- The other processes' events arrive from that channel, read by one task per process (one bus
  reader, however many clients watch), and reach the same listener in the order they were
  published. A message whose first offset of a stream is past the next one expected (this
  process lost its channel connection for a while) is preceded by the missing events, read back
  from the stream's Redis history.
- :meth:`RedisBus.history` answers from this process's own recent history first (events it
  published or received), then from Redis, which also holds what other processes published
  before this one started.

Offsets come from the store's commit (docs/reliability.md); the bus never invents one. Each
stream must have one publishing process at a time: Redis refuses an entry id that does not grow.
When that happens, a history left in Redis by an earlier store (offsets that went back to 1) is
dropped and started again; an entry this process already wrote (a retry) is left as it is.

Limits (docs/configuration.md): at most ``MAX_PENDING_BATCHES`` batches wait for Redis; past that
(Redis down or too slow) the oldest are dropped from the shared history and the channel, with an
error in the log: this process's own clients are not affected, other processes' clients catch up
from the store when they resubscribe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Sequence
from itertools import islice
from typing import Any
from urllib.parse import parse_qs, urlparse, urlunparse

import msgspec

from vitalwire.bus.base import HISTORY_BYTES, History, Listener
from vitalwire.wire import Event

log = logging.getLogger("vitalwire.bus")

#: Batches published locally and not yet written to Redis, at most (each is one commit's events).
MAX_PENDING_BATCHES = 10_000
#: A channel message starts with its publisher's id (these many bytes), then the msgpack items.
ORIGIN_BYTES = 16
#: Seconds between two writes to Redis, at least: the commits in between go in one round trip.
#: Only other processes see this delay; this process's clients get its events at the commit.
WRITE_INTERVAL_S = 0.005
#: Batches written to Redis in one round trip, at most.
WRITE_BATCHES = 256
#: Seconds between attempts to reach Redis again after the channel's connection failed.
RECONNECT_S = 1.0
#: Seconds :meth:`RedisBus.close` waits for the batches still pending to reach Redis.
CLOSE_FLUSH_S = 5.0
#: /readyz gives Redis this long to answer a PING.
READY_TIMEOUT_S = 2.0

_ITEM = tuple[str, int, str]  # stream, offset, entry: JSON [kind, ts, data]
_encode_items = msgspec.msgpack.Encoder().encode
_decode_items = msgspec.msgpack.Decoder(list[_ITEM]).decode
_encode_entry = msgspec.json.Encoder().encode
_decode_entry = msgspec.json.Decoder(tuple[str, float, msgspec.Raw]).decode

#: Events into their streams' histories and onto the channel, in one command that Redis runs
#: whole (a process reading the channel finds every event of a message already in the history).
#: ARGV: key prefix of the histories, their length, the channel, the message: ORIGIN_BYTES of
#: the publisher's id, then msgpack ``[[stream, offset, entry], ...]`` (Redis's Lua reads msgpack
#: strings, not binary: an entry is JSON text). Returns the 1-based positions of the events
#: refused (an id not above the stream's last).
_PUBLISH_LUA = """
local items = cmsgpack.unpack(string.sub(ARGV[4], ORIGIN_BYTES + 1))
local refused = {}
for i, item in ipairs(items) do
  local r = redis.pcall('XADD', ARGV[1] .. item[1], 'MAXLEN', ARGV[2],
                        string.format('%d-0', item[2]), 'e', item[3])
  if type(r) == 'table' and r.err then
    if not string.find(r.err, 'equal or smaller', 1, true) then
      return redis.error_reply(r.err)
    end
    refused[#refused + 1] = i
  end
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return refused
""".replace("ORIGIN_BYTES", str(ORIGIN_BYTES))


def _entry(e: Event) -> str:
    """What a history entry holds of an event (its stream and offset are the key and the id)."""
    return _encode_entry((e.kind, e.ts, msgspec.Raw(e.data_json))).decode()


def _event(stream: str, offset: int, entry: bytes | str) -> Event:
    kind, ts, data = _decode_entry(entry)
    return Event.from_stored(stream, offset, kind, ts, bytes(data))


def parse_url(url: str) -> tuple[str, str]:
    """The connection URL for redis-py and the key prefix (``?prefix=``, default ``vitalwire``)."""
    parts = urlparse(url)
    query = parse_qs(parts.query)
    prefix = query.pop("prefix", ["vitalwire"])[-1]
    if not prefix or any(c in prefix for c in " {}*?[]"):
        raise ValueError(f"bus URL: prefix must be a plain non-empty name, got {prefix!r}")
    rest = "&".join(f"{k}={v}" for k, values in query.items() for v in values)
    return urlunparse(parts._replace(query=rest)), prefix


class RedisBus:
    """``redis://`` — the bus for several processes (see the module)."""

    backend = "redis"

    def __init__(
        self, url: str, history_size: int = 1000, history_bytes: int = HISTORY_BYTES
    ) -> None:
        if history_size < 1:
            raise ValueError(f"bus history size must be at least 1, got {history_size}")
        self.url, self.prefix = parse_url(url)
        self.history_size = history_size
        self.origin = uuid.uuid4().hex  # this process, to skip its own batches on the channel
        self._origin = bytes.fromhex(self.origin)  # what each of its messages starts with
        self.channel = f"{self.prefix}:events"
        #: the name this process's Redis connections carry (CLIENT LIST)
        self.client_name = f"{self.prefix}-{self.origin[:12]}"
        #: subscribed to the channel now
        self.connected = False
        #: this process's own recent history (bus/base.py): ``history_size`` events per stream,
        #: ``history_bytes`` in all; Redis keeps ``history_size`` per stream for every process
        self.recent = History(history_size, history_bytes)
        self._seen: dict[str, int] = {}  # highest offset delivered per stream
        self._listener: Listener | None = None
        self._redis: Any = None
        self._pending: deque[list[Event]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # nothing pending
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()
        #: batches never written to Redis (the pending bound was reached)
        self.dropped = 0
        self._failing = False
        #: Several nodes (services/cluster.py): reads committed events of a stream from the
        #: store, ``(stream, after, upto) -> events``, for a gap that Redis cannot fill (a node
        #: killed before its last batches reached Redis; the events are in the store).
        self.fill: Any = None

    def _key(self, stream: str) -> str:
        return f"{self.prefix}:history:{stream}"

    async def open(self, listener: Listener) -> None:
        import redis.asyncio as aioredis

        self._listener = listener
        self._redis = aioredis.from_url(self.url, client_name=self.client_name)
        self._publish_script = self._redis.register_script(_PUBLISH_LUA)
        try:
            await self._redis.ping()  # a wrong URL fails here, at start, not at the first event
        except Exception as exc:
            await self._redis.aclose()
            self._redis = None
            u = urlparse(self.url)  # named without its password
            where = urlunparse(u._replace(netloc=u.netloc.rpartition("@")[2]))
            raise ConnectionError(f"bus: cannot reach Redis at {where}: {exc}") from exc
        self._tasks = [
            asyncio.create_task(self._send_loop(), name="bus-redis-send"),
            asyncio.create_task(self._read_loop(), name="bus-redis-read"),
        ]
        await asyncio.wait_for(self._subscribed.wait(), 10)

    async def close(self) -> None:
        if self._redis is None:
            return
        if self._pending and not self._failing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), CLOSE_FLUSH_S)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        await self._redis.aclose()
        self._redis = None
        self._listener = None

    async def ready(self) -> bool:
        """Redis answers a PING within READY_TIMEOUT_S (/readyz)."""
        if self._redis is None:
            return False
        try:
            return bool(await asyncio.wait_for(self._redis.ping(), READY_TIMEOUT_S))
        except Exception:
            return False

    # -- publishing ------------------------------------------------------------------------------

    async def publish(self, events: Sequence[Event]) -> None:
        if not events:
            return
        batch = list(events)
        self._deliver(batch)
        if len(self._pending) >= MAX_PENDING_BATCHES:
            self._pending.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error(
                    "Redis bus: %d batches not written (more than %d waiting); other processes "
                    "miss them until their clients resubscribe",
                    self.dropped,
                    MAX_PENDING_BATCHES,
                )
        self._pending.append(batch)
        self._idle.clear()
        self._wake.set()

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batches = list(islice(self._pending, WRITE_BATCHES))
                try:
                    await self._write(batches)
                except Exception as exc:  # Redis unreachable: keep the batches, try again
                    if not self._failing:
                        log.error("Redis bus: cannot write to Redis (%s); retrying", exc)
                    self._failing = True
                    await asyncio.sleep(RECONNECT_S)
                    continue
                if self._failing:
                    log.warning("Redis bus: writing to Redis again")
                    self._failing = False
                for batch in batches:  # the bound may have dropped some meanwhile
                    if self._pending and self._pending[0] is batch:
                        self._pending.popleft()
                # let the next commits gather: one round trip (and one message back to this
                # process's own channel reader) for several commits, not one each
                await asyncio.sleep(WRITE_INTERVAL_S)
            self._idle.set()

    def _xadd(self, pipe: Any, e: Event) -> None:
        pipe.xadd(
            self._key(e.stream),
            {"e": _entry(e)},
            id=f"{e.offset}-0",
            maxlen=self.history_size,
            approximate=False,
        )

    async def _write(self, batches: list[list[Event]]) -> None:
        """Every event of ``batches`` into its stream's history and onto the channel, in one
        command (one round trip, and per event no command for the client library to build)."""
        events = [e for batch in batches for e in batch]
        message = self._origin + _encode_items([(e.stream, e.offset, _entry(e)) for e in events])
        refused = await self._publish_script(
            args=[f"{self.prefix}:history:", self.history_size, self.channel, message]
        )
        if refused:
            await self._refused([events[int(i) - 1] for i in refused], events)

    async def _refused(self, refused: list[Event], written: list[Event]) -> None:
        """XADDs refused because the stream's history already reaches past them: either this
        process wrote them before (a retry after a lost reply: nothing to do), or the history
        comes from an earlier store whose offsets went further: drop it and start it over with
        every event of ``written`` (the round) in that stream, refused or not."""
        stale: set[str] = set()
        for e in refused:
            rows = await self._redis.xrange(
                self._key(e.stream), min=f"{e.offset}-0", max=f"{e.offset}-0"
            )
            mine = _entry(e).encode()
            if not rows:
                oldest = await self._redis.xrange(self._key(e.stream), count=1)
                if oldest and int(oldest[0][0].split(b"-")[0]) <= e.offset:
                    # a hole at its offset: another node took the stream over and wrote past
                    # it first (docs/architecture.md). The event is in the store: readers find
                    # the hole and read it there.
                    continue
            if rows[0][1].get(b"e") != mine:
                stale.add(e.stream)
        if not stale:
            return
        pipe = self._redis.pipeline(transaction=True)
        for stream in sorted(stale):
            log.warning(
                "Redis bus: history of %s is from an earlier store; starting it over", stream
            )
            pipe.delete(self._key(stream))
        for e in written:
            if e.stream in stale:
                self._xadd(pipe, e)
        await pipe.execute()

    # -- receiving -------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.connected = True
                self._subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    data = message["data"]
                    if data[:ORIGIN_BYTES] == self._origin:
                        continue  # this process's own: its listener had them at the commit
                    try:
                        items = _decode_items(data[ORIGIN_BYTES:])
                    except msgspec.DecodeError as exc:
                        log.error("Redis bus: a message on %s is not ours (%s)", self.channel, exc)
                        continue
                    await self._received(items)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected = False
                log.error("Redis bus: channel lost (%s); reconnecting", exc)
                await asyncio.sleep(RECONNECT_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _received(self, items: list[_ITEM]) -> None:
        events: list[Event] = []
        expect: dict[str, int] = {}  # next offset per stream
        for stream, offset, entry in items:
            nxt = expect.get(stream)
            if nxt is None:
                seen = self._seen.get(stream)
                nxt = offset if seen is None else seen + 1
            if offset > nxt:
                # a gap: this process missed batches (its channel connection dropped)
                missed = await self._from_redis(stream, nxt - 1, offset - 1)
                if missed is None and self.fill is not None:
                    missed = await self.fill(stream, nxt - 1, offset - 1)
                if missed is None:
                    log.warning(
                        "Redis bus: %s offsets %d..%d are no longer in Redis; clients that "
                        "watch it get them from the store when they resubscribe",
                        stream,
                        nxt,
                        offset - 1,
                    )
                else:
                    events.extend(missed)
            expect[stream] = offset + 1
            events.append(_event(stream, offset, entry))
        self._deliver(events)

    def catch_up(self, events: list[Event]) -> None:
        """Deliver committed events read elsewhere (the store) as if they came from the
        channel: the ones this process delivered already are skipped, and the same events
        arriving later on the channel are then skipped in turn."""
        self._deliver(events)

    def _deliver(self, events: list[Event]) -> None:
        """Remember ``events`` (offsets this process has not delivered yet) and hand them on."""
        fresh: list[Event] = []
        seen = self._seen
        recent = self.recent
        for event in events:
            last = seen.get(event.stream)
            if last is not None and event.offset <= last:
                continue
            seen[event.stream] = event.offset
            ring = recent.ring(event.stream)
            if ring and ring[-1].offset + 1 != event.offset:
                # a gap nothing filled: the history answers by position, from here
                recent.clear(event.stream)
            recent.add(event)
            fresh.append(event)
        if fresh and self._listener is not None:
            self._listener(fresh)

    # -- history ---------------------------------------------------------------------------------

    async def history(self, stream: str, after: int) -> list[Event] | None:
        events = self.recent.after(stream, after)
        if events is not None:
            return events
        return await self._from_redis(stream, after, None)

    async def _from_redis(self, stream: str, after: int, upto: int | None) -> list[Event] | None:
        """Events of ``stream`` after ``after`` (up to ``upto``) from Redis; None when its history
        does not reach back to ``after + 1``."""
        rows = await self._redis.xrange(
            self._key(stream), min=f"({after}-0", max="+" if upto is None else f"{upto}-0"
        )
        if upto is not None and len(rows) != upto - after:
            return None  # a bounded read (a gap to fill) must find every event of it
        if not rows:
            # nothing after `after`: the history reaches back if it holds `after` itself
            if after == 0:
                return None
            last = await self._redis.xrange(self._key(stream), min=f"{after}-0", max=f"{after}-0")
            return [] if last else None
        offsets = [int(i.split(b"-")[0]) for i, _ in rows]
        if offsets[0] != after + 1 or offsets[-1] - offsets[0] != len(offsets) - 1:
            # the history starts later, or has a hole: the node that wrote a stream before
            # this one died before its last events reached Redis (they are in the store)
            return None
        pairs = zip(offsets, rows, strict=True)
        return [_event(stream, o, fields[b"e"]) for o, (_, fields) in pairs]
