"""Settings writes through two proxy replicas sharing one real Redis lose no update.

``POST /settings`` and ``POST /settings/{id}`` are read-modify-write (by the proxy for a user
confined to their own folder, by ComfyUI's ``AppSettings`` otherwise), and a ``/userdata`` write
of ``comfy.settings.json`` replaces the file. Two replicas writing one user's settings at once
must each see the other's change (``proxy/userdata/settings_lock.py``). The fake ComfyUI holds a
chosen request at a gate, so the interleaving is forced, not hoped for; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as redis
from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.principal import comfy_user_id
from proxy.redis.client import REDIS
from proxy.userdata.handler import USERDATA
from proxy.userdata.paths import PREFIX_ROOT
from proxy.userdata.settings_lock import (
    KEY_PREFIX,
    REDIS_OP,
    MemorySettingsLocks,
    RedisSettingsLocks,
    SettingsLocks,
)
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.support import Client, sample

A, B = bearer("alice"), bearer("bob")
ALICE = comfy_user_id("alice")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Gate:
    """Holds the first request the fake receives that ``matches`` until :meth:`open`, and tells
    when a request for a path of :meth:`arrival` reaches ComfyUI's handler."""

    matches: Callable[[web.Request], bool] = lambda _r: False
    held: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    arrivals: dict[str, asyncio.Event] = field(default_factory=dict)

    def arrival(self, path: str) -> asyncio.Event:
        return self.arrivals.setdefault(path, asyncio.Event())

    def middleware(self) -> Middleware:
        @web.middleware
        async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path in self.arrivals:
                self.arrivals[request.path].set()
            if not self.held.is_set() and self.matches(request):
                self.held.set()
                await self.opened.wait()
            return await handler(request)

        return cast(Middleware, gate)

    def open(self) -> None:
        self.opened.set()


@dataclass
class Replicas:
    fake: FakeComfyUI
    gate: Gate
    one: Client
    two: Client
    multi_user: bool

    def settings(self) -> dict[str, Any]:
        """Alice's comfy.settings.json as ComfyUI stored it."""
        users = Path(self.fake.paths.user)
        if self.multi_user:
            ids = [i for i, name in self.fake.userdata.users.items() if name == ALICE]
            folder = users / ids[0]
        else:
            folder = users / "default" / PREFIX_ROOT / ALICE
        return cast(dict[str, Any], json.loads((folder / "comfy.settings.json").read_bytes()))

    def writes(self) -> list[str]:
        """The settings requests the fake received, in order (method and decoded path)."""
        return [
            f"{r.method} {r.path}"
            for r in self.fake.received
            if "settings" in r.path or "comfy.settings.json" in r.path
        ]


async def start_replicas(
    make_proxy: ProxyFactory, redis_url: str, root: Path, *, multi: bool
) -> Replicas:
    fake = FakeComfyUI(root=root / "comfyui", multi_user=multi)
    gate = Gate()
    fake.app.middlewares.append(gate.middleware())  # innermost: after the request is recorded
    await fake.start()
    auth = {"comfy_multi_user": True} if multi else {}
    one = await make_proxy(fake.url, token=None, redis={"url": redis_url}, auth=auth)
    two = await make_proxy(fake.url, token=None, redis={"url": redis_url}, auth=auth)
    for client in (one, two):
        assert isinstance(client.app[USERDATA].settings_locks, RedisSettingsLocks)
    pair = Replicas(fake, gate, one, two, multi)
    assert await post(one, "/api/settings/Comfy.First", A, b'"first"') == (200, b"")
    fake.received.clear()
    return pair


@pytest.fixture(params=["single-user", "multi-user"])
async def replicas(
    request: pytest.FixtureRequest, make_proxy: ProxyFactory, redis_url: str, tmp_path: Path
) -> AsyncIterator[Replicas]:
    pair = await start_replicas(
        make_proxy, redis_url, tmp_path, multi=request.param == "multi-user"
    )
    yield pair
    pair.gate.open()
    await pair.fake.stop()


async def post(client: Client, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
    async with client.post(path, headers=headers, data=body) as resp:
        raw = await resp.read()
        return resp.status, (json.loads(raw) if raw else raw)


def reading_settings(request: web.Request) -> bool:
    """The first step of a settings write: the proxy's read of the confined user's file, or
    ComfyUI's own ``POST /settings`` (which reads the file itself)."""
    return (request.method == "GET" and request.path.endswith("comfy.settings.json")) or (
        request.method == "POST" and request.path.split("/")[-2:-1] == ["settings"]
    )


class Watched:
    """A replica's locks, telling when a write has started waiting for one."""

    def __init__(self, inner: SettingsLocks) -> None:
        self.inner = inner
        self.waiting = asyncio.Event()

    def hold(self, key: str) -> Any:
        self.waiting.set()
        return self.inner.hold(key)


class Acquired:
    """A replica's locks, telling when a write holds one."""

    def __init__(self, inner: SettingsLocks) -> None:
        self.inner = inner
        self.held = asyncio.Event()

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        async with self.inner.hold(key):
            self.held.set()
            yield


class Contended:
    """A Redis client that tells when a ``SET NX`` of a lock was refused (someone holds it)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.refused = asyncio.Event()

    async def set(self, *args: Any, **kwargs: Any) -> Any:
        taken = await self.client.set(*args, **kwargs)
        if not taken:
            self.refused.set()
        return taken

    async def eval(self, *args: Any) -> Any:
        return await self.client.eval(*args)


async def first_of(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


def watch(client: Client) -> Watched:
    data = client.app[USERDATA]
    watched = Watched(data.settings_locks)
    data.settings_locks = watched
    return watched


# -- the lost update, forced --------------------------------------------------------------------


async def test_a_write_on_another_replica_waits_and_keeps_the_first_change(
    replicas: Replicas,
) -> None:
    replicas.gate.matches = reading_settings
    first = asyncio.create_task(post(replicas.one, "/api/settings/Comfy.A", A, b'"one"'))
    await replicas.gate.held.wait()  # replica one holds the lock, its read held at ComfyUI
    watched = watch(replicas.two)
    second = asyncio.create_task(
        post(replicas.two, "/api/settings", A, json.dumps({"Comfy.B": "two"}).encode())
    )
    await watched.waiting.wait()
    before = replicas.writes()
    replicas.gate.open()
    assert await first == (200, b"")
    assert await second == (200, b"")
    assert replicas.settings() == {"Comfy.First": "first", "Comfy.A": "one", "Comfy.B": "two"}
    # Replica two reached ComfyUI only after replica one's write was stored.
    assert len(before) == 1
    writes = replicas.writes()
    if replicas.multi_user:
        assert writes == ["POST /api/settings/Comfy.A", "POST /api/settings"]
    else:
        assert [w.split(" ")[0] for w in writes] == ["GET", "POST", "GET", "POST"]


async def test_a_userdata_write_of_the_settings_file_is_not_undone_by_a_merge(
    replicas: Replicas,
) -> None:
    replicas.gate.matches = reading_settings
    merge = asyncio.create_task(post(replicas.one, "/api/settings/Comfy.A", A, b'"one"'))
    await replicas.gate.held.wait()
    watched = watch(replicas.two)
    whole = json.dumps({"Comfy.Whole": "file"}).encode()
    replace = asyncio.create_task(
        post(replicas.two, "/api/userdata/comfy.settings.json?overwrite=true", A, whole)
    )
    await watched.waiting.wait()
    replicas.gate.open()
    assert (await merge)[0] == 200
    assert await replace == (200, "comfy.settings.json")
    assert replicas.settings() == {"Comfy.Whole": "file"}  # the later, whole-file write stands


async def test_many_concurrent_writes_through_both_replicas_all_arrive(
    replicas: Replicas,
) -> None:
    count = 24
    writes = [
        post(
            (replicas.one, replicas.two)[i % 2],
            f"/api/settings/Comfy.K{i}" if i % 3 else "/api/settings",
            A,
            json.dumps(i if i % 3 else {f"Comfy.K{i}": i}).encode(),
        )
        for i in range(count)
    ]
    assert [status for status, _ in await asyncio.gather(*writes)] == [200] * count
    expected: dict[str, Any] = {"Comfy.First": "first"}
    expected.update({f"Comfy.K{i}": i for i in range(count)})
    assert replicas.settings() == expected


async def test_a_forwarded_write_whose_body_is_slow_keeps_the_other_replicas_change(
    make_proxy: ProxyFactory, redis_url: str, tmp_path: Path
) -> None:
    """``--multi-user``: the proxy forwards, and ComfyUI reads the file before awaiting the body
    (``tests/fakes/test_fake_vs_real.py``). A streamed body that arrives late would undo a write
    made meanwhile through another replica; the lock makes that one wait instead."""
    pair = await start_replicas(make_proxy, redis_url, tmp_path, multi=True)
    try:
        pair.gate.open()  # not holding anything: it only tells when A reached ComfyUI's handler
        pair.gate.matches = reading_settings
        rest = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield b'"o'
            await rest.wait()
            yield b'ne"'

        data = pair.one.app[USERDATA]
        acquired = Acquired(data.settings_locks)
        data.settings_locks = acquired
        first = asyncio.create_task(post_stream(pair.one, "/api/settings/Comfy.A", slow_body()))
        await acquired.held.wait()
        await pair.gate.held.wait()  # ComfyUI has read the file and waits for A's body
        contended = Contended(pair.two.app[REDIS])
        pair.two.app[USERDATA].settings_locks = RedisSettingsLocks(cast(Any, contended))
        reached = pair.gate.arrival("/api/settings/Comfy.B")
        second = asyncio.create_task(post(pair.two, "/api/settings/Comfy.B", A, b'"two"'))
        await first_of(contended.refused, reached)
        # B found the lock taken and did not reach ComfyUI (where it would be undone by A).
        assert contended.refused.is_set()
        assert not reached.is_set()
        rest.set()
        assert await first == 200
        assert await second == (200, b"")
        assert pair.settings() == {"Comfy.First": "first", "Comfy.A": "one", "Comfy.B": "two"}
        assert pair.writes() == ["POST /api/settings/Comfy.A", "POST /api/settings/Comfy.B"]
    finally:
        await pair.fake.stop()


async def post_stream(client: Client, path: str, body: AsyncIterator[bytes]) -> int:
    """A ``POST`` whose chunked body the client sends as ``body`` yields it."""
    async with client.post(path, headers=A, data=body) as resp:
        await resp.read()
        return resp.status


# -- bounded waits, clear refusals -------------------------------------------------------------


async def test_a_write_that_cannot_get_the_lock_in_time_is_refused_before_comfyui(
    replicas: Replicas,
) -> None:
    replicas.gate.matches = reading_settings
    first = asyncio.create_task(post(replicas.one, "/api/settings/Comfy.A", A, b'"one"'))
    await replicas.gate.held.wait()
    locks = replicas.two.app[USERDATA].settings_locks
    assert isinstance(locks, RedisSettingsLocks)
    locks.wait_seconds = 0.05  # the first write is held at ComfyUI: this one cannot get in
    received = replicas.writes()
    async with replicas.two.post("/api/settings/Comfy.B", headers=A, data=b'"two"') as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        body = await resp.json()
    assert body["error"]["type"] == "settings_busy"
    assert body["error"]["retry_after"] == 1
    assert "try again" in body["error"]["message"]
    assert replicas.writes() == received  # nothing of it reached ComfyUI
    replicas.gate.open()
    assert await first == (200, b"")
    assert "Comfy.B" not in replicas.settings()


async def test_reads_take_no_lock(replicas: Replicas) -> None:
    replicas.gate.matches = reading_settings
    first = asyncio.create_task(post(replicas.one, "/api/settings/Comfy.A", A, b'"one"'))
    await replicas.gate.held.wait()
    async with replicas.two.get("/api/settings/Comfy.First", headers=A) as resp:
        assert (resp.status, await resp.json()) == (200, "first")
    replicas.gate.open()
    assert (await first)[0] == 200


async def test_the_lock_is_released_and_leaves_no_key(replicas: Replicas, redis_url: str) -> None:
    assert await post(replicas.two, "/api/settings/Comfy.A", A, b'"one"') == (200, b"")
    client = redis.Redis.from_url(redis_url)
    try:
        assert [key async for key in client.scan_iter(match=f"{KEY_PREFIX}*")] == []
    finally:
        await client.aclose()


async def test_without_redis_a_process_serialises_its_own_writes(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(fake_comfy.url, token=None)
    locks = client.app[USERDATA].settings_locks
    assert isinstance(locks, MemorySettingsLocks)
    writes = [post(client, f"/api/settings/Comfy.K{i}", A, str(i).encode()) for i in range(12)]
    assert [status for status, _ in await asyncio.gather(*writes)] == [200] * 12
    async with client.get("/api/settings", headers=A) as resp:
        stored = await resp.json()
    assert stored == {f"Comfy.K{i}": i for i in range(12)}
    assert len(locks) == 0  # nothing kept once nobody holds or waits


async def test_an_unreachable_lock_store_refuses_the_write_with_a_clear_503(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, own_redis: Any
) -> None:
    client = await make_proxy(fake_comfy.url, token=None, redis={"url": own_redis.url})
    own_redis.stop()
    received = len(fake_comfy.received)
    async with client.post("/api/settings/Comfy.A", headers=A, data=b'"one"') as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["error"]["type"] == "settings_lock_unavailable", body
    assert resp.headers["Retry-After"] == "1"
    assert [r for r in fake_comfy.received[received:] if "settings" in r.path] == []
    failures = sample(client, "comfygate_redis_errors_total", op=REDIS_OP, kind="connection")
    assert failures >= 1


async def test_a_holder_whose_lease_ran_out_never_deletes_the_next_holders_lock(
    redis_url: str,
) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        locks = RedisSettingsLocks(client)
        name = f"{KEY_PREFIX}gpu|alice|"
        async with locks.hold("gpu|alice|"):
            assert await client.pttl(name) > 0  # a lease, never a key without expiry
            await client.set(name, b"next-holder")  # the lease ran out; another took it
        assert await client.get(name) == b"next-holder"
    finally:
        await client.aclose()
