"""Login throttling: after repeated failures, a delay that doubles with each further failure.

Pure logic, time is an argument. One :class:`Throttle` counts failures per key (a client address,
or an account name); after ``policy.free`` failures each further one locks the key for a delay
that doubles, from ``policy.base_s`` to at most ``policy.max_s``. A key with no failure for
``policy.forget_s`` starts again from zero, and a success (``clear``) forgets its key at once.

This is the "increasing wait time after failed attempts" of NIST SP 800-63B §5.2.2 (rate
limiting) and the exponential lockout of the OWASP Authentication Cheat Sheet ("Account
lockout"), rather than a lockout until an administrator steps in: an attacker can deny a
clinician the account for at most ``max_s`` at a time, and the service (services/login.py) lets an
address that has logged into an account before through that account's lockout.

Memory is bounded: at most ``capacity`` keys are remembered; past it the key used longest ago is
forgotten. New keys come only from failures that were let through, and an address is locked after
its own few failures: to make the account table forget a locked account, an attacker needs about
``capacity / free`` addresses of its own.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    #: Failures allowed before the first delay.
    free: int
    #: The first delay (seconds); each further failure doubles it.
    base_s: float
    #: The longest delay (seconds).
    max_s: float
    #: A key with no failure for this long starts again from zero.
    forget_s: float

    def __post_init__(self) -> None:
        if self.free < 1 or self.base_s <= 0 or self.max_s < self.base_s or self.forget_s <= 0:
            raise ValueError(
                "free must be at least 1, base_s positive, max_s at least base_s and forget_s "
                f"positive, got {self}"
            )

    def delay_s(self, failures: int) -> float:
        """The lock after the ``failures``-th failure in a row: 0 while it is within ``free``."""
        over = failures - self.free
        if over <= 0:
            return 0.0
        return min(self.max_s, self.base_s * 2.0 ** min(over - 1, 64))


@dataclass(slots=True)
class _Entry:
    failures: int
    last_failure: float
    locked_until: float


class Throttle:
    """Failures per key under one :class:`ThrottlePolicy`, for at most ``capacity`` keys."""

    def __init__(self, policy: ThrottlePolicy, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.policy = policy
        self.capacity = capacity
        self._keys: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def retry_after(self, key: str, now: float) -> int:
        """Whole seconds until ``key`` may try again (rounded up); 0 when it may now."""
        entry = self._live(key, now)
        if entry is None or entry.locked_until <= now:
            return 0
        return max(1, math.ceil(entry.locked_until - now))

    def failed(self, key: str, now: float) -> int:
        """Count a failure of ``key``; return the lock it starts (whole seconds), 0 for none."""
        entry = self._live(key, now)
        if entry is None:
            entry = self._keys[key] = _Entry(0, now, now)
            if len(self._keys) > self.capacity:
                self._keys.popitem(last=False)
        entry.failures += 1
        entry.last_failure = now
        delay = self.policy.delay_s(entry.failures)
        entry.locked_until = now + delay
        return math.ceil(delay)

    def clear(self, key: str) -> None:
        """A success: forget ``key``'s failures."""
        self._keys.pop(key, None)

    def _live(self, key: str, now: float) -> _Entry | None:
        """``key``'s entry (marked as used) unless it was forgotten for being quiet too long."""
        entry = self._keys.get(key)
        if entry is None:
            return None
        if now - entry.last_failure >= self.policy.forget_s and entry.locked_until <= now:
            del self._keys[key]
            return None
        self._keys.move_to_end(key)
        return entry
