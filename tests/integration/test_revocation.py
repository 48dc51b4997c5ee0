"""The ``jti`` denylist: the in-memory and the Redis implementation (a real redis-server) behave
the same, down to the expiry they give an entry. Time is an injected clock; nothing sleeps.

Redis keeps its own time, so the Redis flavour's expiry is read back as the key's PTTL (set from
the injected clock) instead of being waited for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import jwt
import pytest
import redis.asyncio as redis

from proxy.auth.keys import StaticKeys
from proxy.auth.revocation import (
    EXPIRY_GRACE_SECONDS,
    MAX_UNKNOWN_EXPIRY_SECONDS,
    MemoryRevocationList,
    RedisRevocationList,
    RevocationList,
    RevocationUnavailable,
)
from proxy.auth.tokens import InvalidToken, TokenVerifier
from proxy.settings.auth import DEFAULT_ROLES, JwtSettings
from tests.redis_server import free_port

NOW = 1_700_000_000.0
SECRET = "revocation-test-secret-0123456789abcdef0123456789"
PREFIX = "comfygate:revoked:"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    name: str
    revocations: RevocationList
    clock: Clock
    client: redis.Redis | None = None
    memory: MemoryRevocationList | None = None

    async def remaining(self, token_id: str) -> float | None:
        """Seconds until the entry expires; None when there is none."""
        if self.client is not None:
            pttl = await self.client.pttl(PREFIX + token_id)
            return None if pttl < 0 else pttl / 1000
        assert self.memory is not None
        expires = self.memory._entries.get(token_id)  # the store's own view
        return None if expires is None else expires - self.clock()


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    clock = Clock()
    if request.param == "memory":
        memory = MemoryRevocationList(clock=clock)
        yield Backend("memory", memory, clock, memory=memory)
        return
    url: str = request.getfixturevalue("redis_url")
    client = redis.Redis.from_url(url)
    yield Backend("redis", RedisRevocationList(client, clock=clock), clock, client=client)
    await client.aclose()


async def test_unknown_id_is_not_revoked(backend: Backend) -> None:
    assert not await backend.revocations.is_revoked("never-seen")


async def test_revoke_until_the_tokens_exp(backend: Backend) -> None:
    await backend.revocations.revoke("jti-1", until=NOW + 600)
    assert await backend.revocations.is_revoked("jti-1")
    assert not await backend.revocations.is_revoked("jti-2")
    remaining = await backend.remaining("jti-1")
    assert remaining == pytest.approx(600 + EXPIRY_GRACE_SECONDS, abs=1.0)


async def test_unknown_expiry_is_kept_thirty_days(backend: Backend) -> None:
    await backend.revocations.revoke("jti-1", until=None)
    assert await backend.revocations.is_revoked("jti-1")
    remaining = await backend.remaining("jti-1")
    assert remaining == pytest.approx(MAX_UNKNOWN_EXPIRY_SECONDS, abs=1.0)
    assert MAX_UNKNOWN_EXPIRY_SECONDS == 30 * 24 * 3600


async def test_long_dead_token_is_not_stored(backend: Backend) -> None:
    await backend.revocations.revoke("old", until=NOW - EXPIRY_GRACE_SECONDS - 1)
    assert not await backend.revocations.is_revoked("old")
    assert await backend.remaining("old") is None


async def test_recently_expired_token_is_still_stored(backend: Backend) -> None:
    """Within the grace: the verifier's leeway may still accept it."""
    await backend.revocations.revoke("just-expired", until=NOW - 10)
    assert await backend.revocations.is_revoked("just-expired")


async def test_revoke_is_idempotent_and_never_shortens(backend: Backend) -> None:
    await backend.revocations.revoke("jti-1", until=NOW + 10_000)
    await backend.revocations.revoke("jti-1", until=NOW + 10)
    await backend.revocations.revoke("jti-1", until=NOW + 10_000)
    assert await backend.revocations.is_revoked("jti-1")
    remaining = await backend.remaining("jti-1")
    assert remaining == pytest.approx(10_000 + EXPIRY_GRACE_SECONDS, abs=1.0)
    await backend.revocations.revoke("jti-1", until=NOW + 20_000)  # a longer one extends it
    remaining = await backend.remaining("jti-1")
    assert remaining == pytest.approx(20_000 + EXPIRY_GRACE_SECONDS, abs=1.0)


@pytest.mark.parametrize("token_id", ["", "x" * 513])
async def test_bad_token_ids_are_refused(backend: Backend, token_id: str) -> None:
    with pytest.raises(ValueError, match="token id"):
        await backend.revocations.revoke(token_id, until=None)


async def test_ids_are_opaque_strings(backend: Backend) -> None:
    odd = "a:b*c?[d] \r\n\x00é"
    await backend.revocations.revoke(odd, until=None)
    assert await backend.revocations.is_revoked(odd)
    assert not await backend.revocations.is_revoked("a:b*c?[d]")
    assert not await backend.revocations.is_revoked("*")


async def test_verifier_refuses_a_revoked_token_with_either_backend(backend: Backend) -> None:
    settings = JwtSettings(secret=SECRET)
    verifier = TokenVerifier(
        settings,
        DEFAULT_ROLES,
        keys=StaticKeys(secret=SECRET.encode()),
        revocations=backend.revocations,
        clock=backend.clock,
    )
    claims = {"sub": "alice", "roles": ["user"], "iat": int(NOW), "exp": int(NOW) + 600}
    token = jwt.encode({**claims, "jti": "t-1"}, SECRET, algorithm="HS256")
    assert (await verifier.verify(token)).token_id == "t-1"  # also cached now
    await backend.revocations.revoke("t-1", until=NOW + 600)
    with pytest.raises(InvalidToken) as caught:
        await verifier.verify(token)
    assert caught.value.reason == "token_revoked"


# --- one flavour only -----------------------------------------------------------------------


async def test_redis_key_layout(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        await RedisRevocationList(client).revoke("abc", until=None)
        assert await client.get("comfygate:revoked:abc") == b"1"
        other = RedisRevocationList(client, prefix="tenant-b:revoked:")
        assert not await other.is_revoked("abc")
    finally:
        await client.aclose()


async def test_redis_down_fails_closed() -> None:
    # The client retries with backoff for seconds; the list's own timeout bounds each call.
    client = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1.0)
    revocations = RedisRevocationList(client, timeout_seconds=0.2)
    try:
        with pytest.raises(RevocationUnavailable) as caught:
            await revocations.is_revoked("abc")
        assert caught.value.status == 503
        assert caught.value.error_type == "revocation_unavailable"
        with pytest.raises(RevocationUnavailable):
            await revocations.revoke("abc", until=None)
    finally:
        await client.aclose()


async def test_memory_entries_expire_with_the_clock() -> None:
    clock = Clock()
    revocations = MemoryRevocationList(grace_seconds=60, clock=clock)
    await revocations.revoke("a", until=NOW + 100)
    clock.now = NOW + 159
    assert await revocations.is_revoked("a")
    clock.now = NOW + 160
    assert not await revocations.is_revoked("a")
    assert len(revocations) == 0


async def test_memory_is_bounded_dropping_expired_then_soonest() -> None:
    clock = Clock()
    revocations = MemoryRevocationList(max_entries=3, grace_seconds=0, clock=clock)
    await revocations.revoke("short", until=NOW + 10)
    await revocations.revoke("long", until=NOW + 1000)
    await revocations.revoke("mid", until=NOW + 500)
    clock.now = NOW + 20  # "short" is expired: making room drops it first
    await revocations.revoke("new", until=NOW + 2000)
    assert len(revocations) == 3
    assert [await revocations.is_revoked(t) for t in ("long", "mid", "new")] == [True] * 3
    await revocations.revoke("newer", until=NOW + 3000)  # full of live entries: "mid" goes
    assert len(revocations) == 3
    assert not await revocations.is_revoked("mid")
    assert await revocations.is_revoked("newer")


async def test_both_implement_the_protocol(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert isinstance(MemoryRevocationList(), RevocationList)
    assert isinstance(RedisRevocationList(client), RevocationList)
    await client.aclose()
