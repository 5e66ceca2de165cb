"""Login: password checks off the event loop, in a bounded pool, behind a throttle.

An argon2 check costs about 100 ms of CPU. On the event loop, every login held every device's
readings and every client's alarms that long (8 parallel wrong-password loops put the alarm
path's p99 at 0.5 to 1.1 s in ``vitalwire bench login-flood``). Here each check runs in a small
pool of threads at a lower CPU priority (argon2-cffi calls its C code through cffi, which
releases the GIL: the loop runs on meanwhile), and at most
``workers + queue`` checks are admitted at once: one more is answered 429 at once, never queued
without bound.

Before any check, the throttle (core/throttle.py) refuses, with 429 and ``Retry-After``:

- a client **address** after ``address_free`` failures, for a delay doubling from 1 s up to
  ``address_max_s`` (5 minutes by default): the strict one, since an address is the attacker's;
- an **account** after ``account_free`` failures, for a delay doubling from 1 s up to
  ``account_max_s`` (1 minute by default): short, because an attacker can trigger it, and not for
  an address that has logged into that account before (the clinician's own workstation still
  gets in while strangers are guessing their password).

A refused attempt reaches neither the store nor the hasher, and counts nothing. A success forgets
the account's failures (not the address's: an attacker with one valid account must not reset the
address it guesses from). Audited: ``login``, ``login_failed`` and ``login_throttled`` (once when
a lock starts, not for each attempt it refuses: a flood cannot flood the audit log).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from vitalwire.core.errors import RateLimited, Unauthenticated
from vitalwire.core.throttle import Throttle, ThrottlePolicy
from vitalwire.services import auth
from vitalwire.services.access import Access
from vitalwire.services.registry import Registry
from vitalwire.settings import Settings

T = TypeVar("T")

#: The first delay of a lock (seconds); each further failure doubles it.
FIRST_DELAY_S = 1.0
#: The nice value of the pool's threads (and the threads argon2 starts from them: one check uses
#: about 1.6 cores with its 4 lanes): when logins take every core, the kernel runs the event
#: loop's thread first, and alarms go out before passwords are checked. On Linux the threads are
#: also SCHED_IDLE (inherited by argon2's): with nice 10 alone, 8 loops of right-password logins
#: put the alarm path's p99 at 2.2x idle; with SCHED_IDLE at 1.5-1.9x, at the same logins a
#: second (docs/benchmarks.md, "Login flood").
POOL_NICE = 10


class LoginService:
    """``login``: the throttle, then the password check in the pool, then the audit row."""

    def __init__(
        self,
        registry: Registry,
        access: Access,
        clock: Callable[[], float],
        *,
        workers: int = 1,
        queue: int = 16,
        address_free: int = 10,
        address_max_s: float = 300.0,
        account_free: int = 5,
        account_max_s: float = 60.0,
        forget_s: float = 900.0,
        capacity: int = 10_000,
    ) -> None:
        self.registry = registry
        self.access = access
        self.clock = clock
        self.addresses = Throttle(
            ThrottlePolicy(address_free, FIRST_DELAY_S, address_max_s, forget_s), capacity
        )
        self.accounts = Throttle(
            ThrottlePolicy(account_free, FIRST_DELAY_S, account_max_s, forget_s), capacity
        )
        #: (account, address) pairs that logged in: let through the account's lock
        self._known: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._capacity = capacity
        self._pool = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="vitalwire-login", initializer=_yield_cpu
        )
        self._admit = workers + queue
        #: password checks and hashes admitted and not finished (running or waiting for a thread)
        self.in_pool = 0

    @classmethod
    def from_settings(
        cls, settings: Settings, registry: Registry, access: Access, clock: Callable[[], float]
    ) -> LoginService:
        return cls(
            registry,
            access,
            clock,
            workers=settings.login_workers,
            queue=settings.login_queue,
            address_free=settings.login_address_free,
            address_max_s=settings.login_address_max_delay_s,
            account_free=settings.login_account_free,
            account_max_s=settings.login_account_max_delay_s,
            forget_s=settings.login_forget_s,
            capacity=settings.login_throttle_keys,
        )

    async def login(self, username: str, password: str, address: str | None) -> auth.Principal:
        """The user, or :class:`Unauthenticated` (audited ``login_failed``), or
        :class:`RateLimited` with ``retry_after`` (throttled, or the pool is full)."""
        addr = address or "-"
        self._check_throttle(username, addr)
        self._check_room()
        try:
            who = await self.registry.authenticate_user(username, password, self.verify_password)
        except Unauthenticated:
            self.access.audit(username, "login_failed", None, {}, address)
            self._failed(username, addr, address)
            raise
        self.accounts.clear(username)
        self._remember(username, addr)
        self.access.audit(who.name, "login", None, {"role": who.role}, address)
        return who

    async def verify_password(self, password_hash: str | None, password: str) -> bool:
        """:func:`auth.verify_password` in the pool (429 when it is full)."""
        return await self._run(auth.verify_password, password_hash, password)

    async def hash_password_async(self, password: str) -> str:
        """:func:`auth.hash_password` in the pool (429 when it is full): for admin APIs."""
        return await self._run(auth.hash_password, password)

    def close(self) -> None:
        """Stop the pool's threads once the checks under way are done."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _check_throttle(self, username: str, addr: str) -> None:
        now = self.clock()
        wait = self.addresses.retry_after(addr, now)
        if wait:
            raise RateLimited(
                f"too many failed logins from this address: try again in {wait} s",
                retry_after=wait,
            )
        if (username, addr) in self._known:
            return
        wait = self.accounts.retry_after(username, now)
        if wait:
            raise RateLimited(
                f"too many failed logins for this account: try again in {wait} s",
                field="username",
                retry_after=wait,
            )

    def _check_room(self) -> None:
        if self.in_pool >= self._admit:
            raise RateLimited(
                f"the server is checking {self.in_pool} passwords already: try again in 1 s",
                retry_after=1,
            )

    def _failed(self, username: str, addr: str, address: str | None) -> None:
        now = self.clock()
        for scope, throttle, key in (
            ("address", self.addresses, addr),
            ("account", self.accounts, username),
        ):
            lock = throttle.failed(key, now)
            if lock:
                detail = {"scope": scope, "retry_after_s": lock}
                self.access.audit(username, "login_throttled", None, detail, address)

    def _remember(self, username: str, addr: str) -> None:
        self._known[(username, addr)] = None
        self._known.move_to_end((username, addr))
        if len(self._known) > self._capacity:
            self._known.popitem(last=False)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in the pool; counted in ``in_pool`` until its thread is done with it
        (not until the caller stops waiting: a cancelled request's check still holds a thread)."""
        self._check_room()
        loop = asyncio.get_running_loop()
        self.in_pool += 1

        def done(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed first (shutdown)
                loop.call_soon_threadsafe(self._release)

        future = self._pool.submit(fn, *args)
        future.add_done_callback(done)
        return await asyncio.wrap_future(future)

    def _release(self) -> None:
        self.in_pool -= 1


def _yield_cpu() -> None:
    """Lower this pool thread's priority (Linux: per thread, nice and SCHED_IDLE); elsewhere,
    leave it."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), POOL_NICE)
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
