"""Script calls of concurrent requests coalesced into one Redis round trip (the GCRA checks of
the rate limiter, :class:`proxy.limits.gcra.GcraPipe`; the ownership claims).

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
import contextlib
import hashlib
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import redis.asyncio as redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, ResponseError

T = TypeVar("T")
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")
DEFAULT_CONNECT_TIMEOUT = 1.0
"""For a pool configured without a connect timeout."""
ScriptCall = tuple[Sequence[Any], Sequence[Any]]
"""``(keys, args)``: the arguments of one ``EVALSHA``."""


class ScriptPipe:
    """Runs batches of ``EVALSHA`` of one script on one dedicated connection, one at a time.

    The caller bounds each batch with its own deadline (``asyncio.timeout``); any failure,
    including that timeout, drops the connection (replies may still be in flight) and the next
    batch connects afresh, through the pool's settings (address, TLS, credentials, Sentinel
    lookup of the current primary).
    """

    def __init__(self, pool: redis.ConnectionPool, lua: str) -> None:
        self._pool = pool
        self._lua = lua
        self.sha = hashlib.sha1(lua.encode(), usedforsecurity=False).hexdigest()
        self._conn: AbstractConnection | None = None

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.is_connected

    async def connect(self) -> None:
        """(Re)connect, bounded by the pool's own connect timeout (``redis.connect_timeout_
        seconds``): a TCP and TLS handshake is not a command, and must not have to fit in the
        batches' budget (a fresh TLS connection on a busy host takes tens of milliseconds)."""
        conn = self._conn
        if conn is None:
            conn = self._conn = self._pool.make_connection()  # type: ignore[no-untyped-call]
            # Batches run under the caller's own deadline: no per-write or per-reply timers.
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
        """``SCRIPT LOAD`` on the pipe's connection (startup)."""
        await self.connect()
        assert self._conn is not None
        await self._guarded(self._exchange(self._conn, [("SCRIPT", "LOAD", self._lua)]))

    async def exchange(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Every call's reply, in order: one round trip (two when the script must be loaded
        first). An error reply of one call (other than NOSCRIPT) is returned as its exception.

        Raises:
            redis.RedisError, OSError: the batch failed as a whole; nothing is known of it.
        """
        reused = self.connected
        await self.connect()
        assert self._conn is not None
        try:
            return await self._guarded(self._calls(self._conn, calls))
        except (redis.ConnectionError, ConnectionError) as exc:
            if not reused or isinstance(exc, TimeoutError):
                raise
        # A connection that sat idle may have been closed by Redis (or a proxy in between)
        # without our noticing: like redis-py's own single retry, once more on a fresh one.
        await self.connect()
        assert self._conn is not None
        return await self._guarded(self._calls(self._conn, calls))

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.disconnect(nowait=True)

    def _evalsha(self, call: ScriptCall) -> tuple[Any, ...]:
        keys, args = call
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    async def _calls(self, conn: AbstractConnection, calls: Sequence[ScriptCall]) -> list[Any]:
        replies = await self._exchange(conn, [self._evalsha(c) for c in calls])
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:  # Redis restarted, SCRIPT FLUSH, failover: those calls did not run
            again = await self._exchange(
                conn, [("SCRIPT", "LOAD", self._lua), *(self._evalsha(calls[i]) for i in missing)]
            )
            for i, reply in zip(missing, again[1:], strict=True):
                replies[i] = reply
        return replies

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


class Coalescer(Generic[ItemT, ResultT]):
    """Items submitted while a batch is in flight go together in the next one.

    ``send`` runs one batch and returns one result per item, in order, or raises for the batch
    as a whole (every item of it then raises that error). An idle coalescer sends the first
    item from its caller's task (no task hop when requests come one by one); items that arrive
    meanwhile are sent by a pump task once that batch is done, all in one batch.

    A caller cancelled while it sends a batch abandons that batch: the others in it get
    ``abandoned()`` (the replies may never be read). A caller cancelled while waiting leaves
    its item in its batch (the request was made).
    """

    def __init__(
        self,
        send: Callable[[list[ItemT]], Awaitable[Sequence[ResultT]]],
        abandoned: Callable[[], BaseException],
    ) -> None:
        self._send = send
        self._abandoned = abandoned
        self._queue: list[tuple[ItemT, asyncio.Future[ResultT]]] = []
        self._busy = False
        """A batch is in flight (sent by a caller or by the pump)."""
        self._pump: asyncio.Task[None] | None = None

    async def submit(self, item: ItemT) -> ResultT:
        """``item``'s result. Raises: whatever ``send`` raised for its batch."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ResultT] = loop.create_future()
        self._queue.append((item, future))
        if self._busy:
            return await future
        self._busy = True
        try:
            await self._run_batch()
        except BaseException:
            if not future.cancelled():
                future.exception()  # this caller is going away: mark it retrieved
            raise
        finally:
            if self._queue:
                self._pump = loop.create_task(self._run_batches())
            else:
                self._busy = False
        return future.result()

    async def close(self) -> None:
        """Stop the pump (app cleanup); the queued items fail as abandoned."""
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

    async def _run_batches(self) -> None:
        try:
            while self._queue:
                await self._run_batch()
        finally:
            self._pump = None
            self._busy = False
            batch, self._queue = self._queue, []
            for _, future in batch:
                if not future.done():
                    future.set_exception(self._abandoned())

    async def _run_batch(self) -> None:
        batch, self._queue = self._queue, []
        try:
            results = await self._send([item for item, _ in batch])
        except Exception as exc:  # noqa: BLE001 - the batch's error, whatever it is, is each item's
            for _, future in batch:
                if not future.done():  # done: its caller was cancelled
                    future.set_exception(exc)
            return
        except BaseException:
            for _, future in batch:
                if not future.done():
                    future.set_exception(self._abandoned())
            raise
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


__all__ = ["Coalescer", "ScriptCall", "ScriptPipe"]
