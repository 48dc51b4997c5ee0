"""GCRA checks of concurrent requests coalesced into one Redis round trip.

The hot path of every limited request is one ``EVALSHA``. Through redis-py's client each
command pays its own pool checkout, retry wrapper, timeouts and syscalls (~65 us of CPU). Here
the checks that become ready in the same event-loop iteration are written as one pipeline on a
connection of the limiter's own and their replies read back in order: one write and one wakeup
for the whole batch. At one request at a time a batch is one check and costs what a bare
command costs; under load the per-check cost falls with the batch size.

Only for a standalone or Sentinel-managed Redis (a connection pool to one primary); a cluster
spreads the keys over nodes and goes through :class:`~proxy.limits.gcra.GcraScript` per check.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import redis.asyncio as redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, ResponseError

from proxy.limits.gcra import GCRA_LUA, GCRA_SHA, MICROS, Decision

T = TypeVar("T")
DEFAULT_CONNECT_TIMEOUT = 1.0
"""For a pool configured without a connect timeout."""
Check = tuple[str, int, int]
"""``(key, emission, burst)``: the arguments of one GCRA check."""


class GcraPipe:
    """Runs batches of GCRA checks on one dedicated connection, one batch at a time.

    The caller bounds each batch with its own deadline (``asyncio.timeout``); any failure,
    including that timeout, drops the connection (replies may still be in flight) and the next
    batch connects afresh, through the pool's settings (address, TLS, credentials, Sentinel
    lookup of the current primary).
    """

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self._pool = pool
        self._conn: AbstractConnection | None = None

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.is_connected

    async def connect(self) -> None:
        """(Re)connect, bounded by the pool's own connect timeout (``redis.connect_timeout_
        seconds``): a TCP and TLS handshake is not a command, and must not have to fit in the
        checks' budget (a fresh TLS connection on a busy host takes tens of milliseconds)."""
        conn = self._conn
        if conn is None:
            conn = self._conn = self._pool.make_connection()  # type: ignore[no-untyped-call]
            # Batches run under the limiter's own deadline: no per-write or per-reply timers.
            conn.socket_timeout = None
        if not conn.is_connected:
            try:
                # The handshake's commands (HELLO, CLIENT SETINFO) have no socket timeout on
                # this connection: bound the whole of it.
                async with asyncio.timeout(conn.socket_connect_timeout or DEFAULT_CONNECT_TIMEOUT):
                    # connect() itself, not the implicit connect of a send: a Sentinel-managed
                    # connection looks up the current primary only there.
                    await conn.connect()
            except BaseException:
                self._conn = None
                await conn.disconnect(nowait=True)
                raise

    async def load(self) -> None:
        """``SCRIPT LOAD`` on the limiter's connection (startup)."""
        await self.connect()
        assert self._conn is not None
        await self._guarded(self._exchange(self._conn, [("SCRIPT", "LOAD", GCRA_LUA)]))

    async def run(self, checks: Sequence[Check]) -> list[Decision]:
        """One round trip (two when the script must be loaded first).

        Raises:
            redis.RedisError, OSError: the batch failed as a whole; nothing is known of it.
        """
        reused = self.connected
        await self.connect()
        assert self._conn is not None
        try:
            return await self._guarded(self._checks(self._conn, checks))
        except (redis.ConnectionError, ConnectionError) as exc:
            if not reused or isinstance(exc, TimeoutError):
                raise
        # A connection that sat idle may have been closed by Redis (or a proxy in between)
        # without our noticing: like redis-py's own single retry, once more on a fresh one.
        await self.connect()
        assert self._conn is not None
        return await self._guarded(self._checks(self._conn, checks))

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.disconnect(nowait=True)

    async def _checks(self, conn: AbstractConnection, checks: Sequence[Check]) -> list[Decision]:
        replies = await self._exchange(conn, [_evalsha(c) for c in checks])
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:  # Redis restarted, SCRIPT FLUSH, failover: those checks did not run
            again = await self._exchange(
                conn, [("SCRIPT", "LOAD", GCRA_LUA), *(_evalsha(checks[i]) for i in missing)]
            )
            for i, reply in zip(missing, again[1:], strict=True):
                replies[i] = reply
        return [_decision(r) for r in replies]

    async def _guarded(self, exchange: Awaitable[T]) -> T:
        """Any failure (including a deadline) drops the connection: replies may be in flight."""
        try:
            return await exchange
        except BaseException:
            conn, self._conn = self._conn, None
            if conn is not None:
                await conn.disconnect(nowait=True)
            raise

    @staticmethod
    async def _exchange(conn: AbstractConnection, commands: list[tuple[Any, ...]]) -> list[Any]:
        await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response(timeout=math.inf))
            except ResponseError as exc:  # one command's error reply: the stream stays in sync
                replies.append(exc)
        return replies


def _evalsha(check: Check) -> tuple[Any, ...]:
    key, emission, burst = check
    return ("EVALSHA", GCRA_SHA, 1, key, emission, burst)


def _decision(reply: Any) -> Decision:
    if isinstance(reply, Exception):
        raise reply  # an error other than NOSCRIPT (OOM, READONLY, ...): the batch failed
    allowed, remaining, retry_after, reset = (int(v) for v in reply)
    return Decision(bool(allowed), remaining, retry_after / MICROS, reset / MICROS)


__all__ = ["Check", "GcraPipe"]
