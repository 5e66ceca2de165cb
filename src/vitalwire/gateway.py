"""``vitalwire gateway``: feed a sensor that speaks a flat format (the seed's) into vitalwire.

The seed's example sensor is a WebSocket *server* that pushes ``{"oxygen_level": 98,
"heart_rate": 72}`` every second to whoever connects. The gateway connects to it as a client,
maps each message to a reading with the format table (:data:`vitalwire.wire.FORMATS`:
``oxygen_level`` -> ``spo2`` in ``%``, ``heart_rate`` -> ``hr`` in ``/min``), stamps it with the
time of receipt (the flat message carries no time) and hands it to a
:class:`~vitalwire.sdk.device.DeviceClient` as the device it stands for: the SDK numbers it
(``seq``), keeps it (buffer, and the spool file when given) until vitalwire acknowledges it as
durable, and resends it after a reconnect, so readings taken while vitalwire is unreachable are
sent after, each once.

When the sensor drops (or is not there yet) the gateway reconnects with backoff (doubling from
``backoff_initial_s`` up to ``backoff_max_s``, with jitter). A message that is not the format's
shape (not JSON, a missing or unknown field, a value out of its metric's bounds) is refused
with one log line naming the field and the bound; the connection to the sensor stays.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from websockets.asyncio.client import connect

from vitalwire import wire
from vitalwire.core.errors import PeerError
from vitalwire.sdk.device import DeviceClient

log = logging.getLogger("vitalwire.gateway")

#: Largest message accepted from the sensor (a flat message is a few dozen bytes).
MAX_MESSAGE_BYTES = 4096


class Gateway:
    """Reads flat messages of ``fmt`` from the sensor at ``source`` and sends them as readings
    through ``client`` (started and closed by the caller)."""

    def __init__(
        self,
        source: str,
        fmt: str,
        client: DeviceClient,
        *,
        clock: Callable[[], float] = time.time,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 10.0,
    ) -> None:
        wire.check_format("format", fmt)
        self.source = source
        self.fmt = fmt
        self.client = client
        self.clock = clock
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        #: connections made to the sensor, messages taken, messages refused
        self.connections = 0
        self.received = 0
        self.refused = 0
        #: called with (seq, values) for each reading handed to the client (tests, logs)
        self.on_reading: Callable[[int, dict[str, float]], None] | None = None
        self._connected = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def take(self, raw: str | bytes) -> int:
        """One message from the sensor: the seq of its reading, or 0 when it was refused."""
        try:
            values = wire.decode_flat(self.fmt, raw)
        except PeerError as exc:
            self.refused += 1
            where = f" (field {exc.field})" if exc.field else ""
            log.warning("sensor %s: message refused: %s%s", self.source, exc.message, where)
            return 0
        self.received += 1
        seq = self.client.send(values, ts=self.clock())
        if self.on_reading is not None:
            self.on_reading(seq, values)
        return seq

    async def run(self) -> None:
        """Connect to the sensor and take its messages, reconnecting until cancelled."""
        delay = self.backoff_initial_s
        while True:
            try:
                async with connect(
                    self.source, proxy=None, open_timeout=5, max_size=MAX_MESSAGE_BYTES
                ) as ws:
                    self.connections += 1
                    self._connected.set()
                    delay = self.backoff_initial_s
                    log.info("sensor %s: connected", self.source)
                    async for raw in ws:
                        self.take(raw)
                log.info("sensor %s: connection closed; reconnecting", self.source)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # refused, dropped, a frame too big: retry with backoff
                log.info("sensor %s: %s; reconnecting", self.source, exc or type(exc).__name__)
            finally:
                self._connected.clear()
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.backoff_max_s)
