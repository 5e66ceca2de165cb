"""Fan-out and stream history behind a small interface; the URL scheme picks the backend."""

from __future__ import annotations

from urllib.parse import urlparse

from vitalwire.bus.base import HISTORY_BYTES, Bus, Listener


def open_bus(url: str, *, history_size: int = 1000, history_bytes: int = HISTORY_BYTES) -> Bus:
    """Return an (unopened) bus for ``url``: ``memory://`` (default, one process) or
    ``redis://host:port/db?prefix=NAME`` (several processes; needs the ``redis`` extra)."""
    scheme = urlparse(url).scheme
    if scheme == "memory":
        from vitalwire.bus.memory import MemoryBus

        return MemoryBus(history_size=history_size, history_bytes=history_bytes)
    if scheme in ("redis", "rediss"):
        try:
            import redis  # noqa: F401
        except ImportError:
            raise ValueError(
                "a redis:// bus needs the redis extra: pip install -e '.[redis]' in the clone"
            ) from None
        from vitalwire.bus.redis import RedisBus

        return RedisBus(url, history_size=history_size, history_bytes=history_bytes)
    raise ValueError(f"bus URL must start with memory:// or redis://, got {url!r}")


__all__ = ["Bus", "Listener", "open_bus"]
