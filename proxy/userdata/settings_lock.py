"""One writer at a time for each user's ``comfy.settings.json``, across every proxy replica.

``POST /settings`` and ``POST /settings/{id}`` are read-modify-write: the proxy does it itself
for a user confined to their own folder (ComfyUI without ``--multi-user``), and ComfyUI's own
``AppSettings`` reads the file *before* it awaits the request body, so even a forwarded write
can undo a concurrent one. Two replicas (or workers) writing the same user's settings at once
would each read the old file and the second write would drop the first one's change. A
``POST``, ``DELETE`` or ``move`` of the settings file through ``/userdata`` replaces it
wholesale and must not be undone by a merge that read the file before it either.

So every such write holds a per-file lock for its whole exchange with ComfyUI:

- with Redis, ``SET key token NX PX lease`` (one key per command: Cluster-safe), renewed while
  held so a slow ComfyUI cannot outlive the lease, released by a compare-and-delete of the
  holder's own token (a lease that did expire is never someone else's to delete);
- without Redis, an ``asyncio.Lock`` per key (one process is the only writer).

Waiting is bounded (:data:`WAIT_SECONDS`): a write that cannot get the lock in time, or cannot
reach Redis, is refused with 503 and ``Retry-After`` (``settings_busy``,
``settings_lock_unavailable``) before anything reaches ComfyUI - never a silent lost update.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import redis.asyncio as redis
import structlog

from proxy.errors import ServiceUnavailable
from proxy.redis.client import RedisClient
from proxy.upstream.pool import unavailable

log = structlog.get_logger("comfygate.userdata")

WAIT_SECONDS = 5.0
"""Longest a write waits for another write of the same file (each takes two short exchanges
with ComfyUI; the stock frontend sends a handful at startup)."""
LEASE_SECONDS = 15.0
"""A Redis lock's lifetime unless renewed: what a replica that died while holding it costs."""
RETRY_MIN_SECONDS = 0.005
RETRY_MAX_SECONDS = 0.1
KEY_PREFIX = "comfygate:settings-lock:"
REDIS_OP = "settings_lock"
"""``op`` of ``comfygate_redis_errors_total`` for the lock's Redis failures."""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def busy(key: str) -> ServiceUnavailable:
    log.warning("settings_lock_timeout", key=key, wait_seconds=WAIT_SECONDS)
    return unavailable(
        "Another change to these settings is still being saved; try again shortly",
        "settings_busy",
        retry_after=1,
    )


def lock_unavailable(error: Exception) -> ServiceUnavailable:
    log.warning("settings_lock_unavailable", error=type(error).__name__)
    return unavailable(
        "Settings cannot be saved right now (the shared lock store is unreachable); "
        "try again shortly",
        "settings_lock_unavailable",
        retry_after=1,
    )


class SettingsLocks(Protocol):
    """Per-file mutual exclusion for settings writes."""

    def hold(self, key: str) -> AbstractAsyncContextManager[None]:
        """Held for the whole write of ``key``'s file.

        Raises:
            ServiceUnavailable: not had within :data:`WAIT_SECONDS` (or Redis unreachable).
        """
        ...


@asynccontextmanager
async def hold_all(locks: SettingsLocks, keys: Iterable[str]) -> AsyncIterator[None]:
    """Every lock of ``keys``, taken in one global order (no two writers wait on each other)."""
    async with contextlib.AsyncExitStack() as stack:
        for key in sorted(set(keys)):
            await stack.enter_async_context(locks.hold(key))
        yield


class MemorySettingsLocks:
    """One ``asyncio.Lock`` per key, dropped when nobody holds or waits for it."""

    def __init__(self, wait_seconds: float = WAIT_SECONDS) -> None:
        self.wait_seconds = wait_seconds
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            try:
                async with asyncio.timeout(self.wait_seconds):
                    await lock.acquire()
            except TimeoutError:
                raise busy(key) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class RedisSettingsLocks:
    """A lease in Redis per key, shared by every replica."""

    def __init__(
        self,
        client: RedisClient,
        *,
        wait_seconds: float = WAIT_SECONDS,
        lease_seconds: float = LEASE_SECONDS,
        on_error: Callable[[str], None] = lambda _kind: None,
    ) -> None:
        """``on_error``: called with the kind (``timeout``, ``connection``, ``error``) of every
        Redis failure (the app counts them in ``comfygate_redis_errors_total``)."""
        self._redis = client
        self.wait_seconds = wait_seconds
        self.lease_seconds = lease_seconds
        self.on_error = on_error

    def _failed(self, exc: redis.RedisError) -> None:
        if isinstance(exc, redis.TimeoutError):
            self.on_error("timeout")
        elif isinstance(exc, redis.ConnectionError):
            self.on_error("connection")
        else:
            self.on_error("error")

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        name = KEY_PREFIX + key
        token = secrets.token_hex(16)
        lease_ms = max(1, int(self.lease_seconds * 1000))
        try:
            await self._acquire(key, name, token, lease_ms)
        except redis.RedisError as exc:
            self._failed(exc)
            raise lock_unavailable(exc) from None
        renewer = asyncio.create_task(self._renew(name, token, lease_ms), name="settings-lease")
        try:
            yield
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            try:
                await self._redis.eval(_RELEASE, 1, name, token)
            except redis.RedisError as exc:  # the lease then runs out on its own
                self._failed(exc)
                log.warning("settings_lock_release_failed", error=type(exc).__name__)

    async def _acquire(self, key: str, name: str, token: str, lease_ms: int) -> None:
        deadline = time.monotonic() + self.wait_seconds
        pause = RETRY_MIN_SECONDS
        while not await self._redis.set(name, token, nx=True, px=lease_ms):
            left = deadline - time.monotonic()
            if left <= 0:
                raise busy(key)
            # Another replica holds it for two short exchanges with ComfyUI: poll, backing off.
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, RETRY_MAX_SECONDS)

    async def _renew(self, name: str, token: str, lease_ms: int) -> None:
        while True:
            await asyncio.sleep(lease_ms / 3000)
            try:
                if not await self._redis.eval(_RENEW, 1, name, token, lease_ms):
                    log.warning("settings_lock_lost", key=name)
                    return
            except redis.RedisError as exc:
                self._failed(exc)
                log.warning("settings_lock_renew_failed", error=type(exc).__name__)


def settings_locks(
    client: RedisClient | None, on_error: Callable[[str], None] = lambda _kind: None
) -> SettingsLocks:
    """Redis locks when the replicas share one, else in-process ones."""
    if client is None:
        return MemorySettingsLocks()
    return RedisSettingsLocks(client, on_error=on_error)
