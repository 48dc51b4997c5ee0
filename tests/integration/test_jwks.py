"""The JWKS client against a real local JWKS endpoint (an aiohttp app on a loopback port).

Startup fetch, key rotation through an unknown ``kid``, the refetch cooldown, the max age, and
stale keys kept while the endpoint is down. Time is an injected clock; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pytest_aiohttp import AiohttpServer

from proxy.auth.keys import JwksKeys
from proxy.auth.revocation import MemoryRevocationList
from proxy.auth.tokens import InvalidToken, TokenVerifier, build_verifier
from proxy.settings.auth import DEFAULT_ROLES, JwtSettings

NOW = 1_700_000_000.0
MAX_AGE = 600.0
COOLDOWN = 30.0

KEY_1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def jwk(key: rsa.RSAPrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    public: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**public, "kid": kid, "use": "sig", **extra}


@dataclass
class Jwks:
    """The identity provider's endpoint: what it serves, whether it is up, how often it was hit."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    hits: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.status != 200:
            return web.Response(status=self.status, text="down")
        return web.json_response({"keys": self.keys})


@dataclass
class Setup:
    idp: Jwks
    server: TestServer
    clock: Clock
    keys: JwksKeys
    verifier: TokenVerifier

    def token(self, key: rsa.RSAPrivateKey, kid: str, **claims: Any) -> str:
        payload = {"sub": "alice", "roles": ["user"], "iat": int(self.clock.now)}
        payload.update({"exp": int(self.clock.now) + 300, **claims})
        return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})

    async def reason(self, token: str) -> str:
        with pytest.raises(InvalidToken) as caught:
            await self.verifier.verify(token)
        return caught.value.reason


@pytest.fixture
async def setup(aiohttp_server: AiohttpServer) -> AsyncIterator[Setup]:
    idp = Jwks(keys=[jwk(KEY_1, "kid-1")])
    app = web.Application()
    app.router.add_get("/jwks", idp.handle)
    server = await aiohttp_server(app)
    clock = Clock()
    settings = JwtSettings(algorithms=("RS256", "PS256"), cache_size=0, leeway_seconds=0)
    async with aiohttp.ClientSession() as session:
        keys = JwksKeys(
            str(server.make_url("/jwks")),
            session=session,
            max_age_seconds=MAX_AGE,
            refetch_cooldown_seconds=COOLDOWN,
            clock=clock,
        )
        verifier = TokenVerifier(
            settings,
            DEFAULT_ROLES,
            keys=keys,
            revocations=MemoryRevocationList(clock=clock),
            clock=clock,
        )
        yield Setup(idp, server, clock, keys, verifier)
        await verifier.close()


async def test_startup_fetch_then_served_from_cache(setup: Setup) -> None:
    await setup.verifier.start()
    assert setup.idp.hits == 1
    assert setup.keys.key_ids == {"kid-1"}
    for jti in ("a", "b", "c"):
        principal = await setup.verifier.verify(setup.token(KEY_1, "kid-1", jti=jti))
        assert principal.subject == "alice"
    setup.clock.advance(MAX_AGE - 1)
    await setup.verifier.verify(setup.token(KEY_1, "kid-1"))
    assert setup.idp.hits == 1


async def test_keys_older_than_max_age_are_refetched(setup: Setup) -> None:
    await setup.verifier.start()
    setup.clock.advance(MAX_AGE)
    await setup.verifier.verify(setup.token(KEY_1, "kid-1"))
    assert setup.idp.hits == 2
    await setup.verifier.verify(setup.token(KEY_1, "kid-1"))
    assert setup.idp.hits == 2


async def test_unknown_kid_triggers_refetch_and_rotation_works(setup: Setup) -> None:
    await setup.verifier.start()
    setup.idp.keys = [jwk(KEY_2, "kid-2"), jwk(KEY_1, "kid-1")]  # the IdP rotates
    setup.clock.advance(COOLDOWN)
    principal = await setup.verifier.verify(setup.token(KEY_2, "kid-2"))
    assert principal.subject == "alice"
    assert setup.idp.hits == 2
    assert setup.keys.key_ids == {"kid-1", "kid-2"}
    await setup.verifier.verify(setup.token(KEY_1, "kid-1"))  # the old key still verifies
    assert setup.idp.hits == 2


async def test_refetch_cooldown_is_honoured(setup: Setup) -> None:
    await setup.verifier.start()
    # Within the cooldown of the startup fetch: unknown kids do not reach the IdP.
    for i in range(5):
        assert await setup.reason(setup.token(KEY_2, f"forged-{i}")) == "token_unknown_key"
    assert setup.idp.hits == 1
    setup.clock.advance(COOLDOWN)
    assert await setup.reason(setup.token(KEY_2, "forged-x")) == "token_unknown_key"
    assert setup.idp.hits == 2
    setup.clock.advance(COOLDOWN - 1)
    assert await setup.reason(setup.token(KEY_2, "forged-y")) == "token_unknown_key"
    assert setup.idp.hits == 2
    # Rotation after a refused kid: accepted as soon as the cooldown allows a refetch.
    setup.idp.keys = [jwk(KEY_2, "kid-2")]
    assert await setup.reason(setup.token(KEY_2, "kid-2")) == "token_unknown_key"
    setup.clock.advance(1)
    assert (await setup.verifier.verify(setup.token(KEY_2, "kid-2"))).subject == "alice"
    assert setup.idp.hits == 3


async def test_concurrent_unknown_kids_cause_one_fetch(setup: Setup) -> None:
    await setup.verifier.start()
    setup.clock.advance(COOLDOWN)
    tokens = [setup.token(KEY_2, f"forged-{i}") for i in range(20)]
    results = await asyncio.gather(
        *(setup.verifier.verify(t) for t in tokens), return_exceptions=True
    )
    assert all(isinstance(r, InvalidToken) and r.reason == "token_unknown_key" for r in results)
    assert setup.idp.hits == 2


@pytest.mark.parametrize("outage", ["http-503", "connection-refused"])
async def test_endpoint_down_keeps_stale_keys(setup: Setup, outage: str) -> None:
    await setup.verifier.start()
    if outage == "http-503":
        setup.idp.status = 503
    else:
        await setup.server.close()
    setup.clock.advance(MAX_AGE * 10)  # far past the max age
    principal = await setup.verifier.verify(setup.token(KEY_1, "kid-1"))
    assert principal.subject == "alice"
    assert setup.keys.fetches == 2  # it tried, failed, and kept the keys
    # Unknown kid while down: refused as unknown, and the cooldown still limits the attempts.
    assert await setup.reason(setup.token(KEY_2, "kid-2")) == "token_unknown_key"
    assert setup.keys.fetches == 2
    setup.clock.advance(COOLDOWN)
    assert await setup.reason(setup.token(KEY_2, "kid-2")) == "token_unknown_key"
    assert setup.keys.fetches == 3
    assert (await setup.verifier.verify(setup.token(KEY_1, "kid-1"))).subject == "alice"


async def test_endpoint_down_at_startup_recovers(setup: Setup) -> None:
    setup.idp.status = 500
    await setup.verifier.start()  # logged, not raised
    assert await setup.reason(setup.token(KEY_1, "kid-1")) == "token_unknown_key"
    setup.idp.status = 200
    assert await setup.reason(setup.token(KEY_1, "kid-1")) == "token_unknown_key"  # cooldown
    setup.clock.advance(COOLDOWN)
    assert (await setup.verifier.verify(setup.token(KEY_1, "kid-1"))).subject == "alice"


async def test_bad_documents_keep_the_previous_keys(setup: Setup) -> None:
    await setup.verifier.start()
    setup.idp.keys = [{"kty": "oct", "k": "c2VjcmV0", "kid": "kid-1"}, {"kty": "RSA"}, "junk"]  # type: ignore[list-item]
    setup.clock.advance(MAX_AGE)
    await setup.verifier.verify(setup.token(KEY_1, "kid-1"))
    assert setup.keys.fetches == 2
    assert setup.keys.key_ids == {"kid-1"}


async def test_unusable_jwks_entries_are_skipped(setup: Setup) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    ec_jwk: dict[str, Any] = jwt.algorithms.ECAlgorithm.to_jwk(p256.public_key(), as_dict=True)
    setup.idp.keys = [
        {"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ", "kid": "hmac", "alg": "HS256"},
        jwk(KEY_2, "enc-key", use="enc"),
        jwk(KEY_2, "none-alg", alg="none"),
        {**ec_jwk, "kid": "ec"},
        jwk(KEY_1, "rs-only", alg="RS256"),
        jwk(rsa.generate_private_key(public_exponent=65537, key_size=1024), "weak"),
    ]
    await setup.verifier.start()
    assert setup.keys.key_ids == {"ec", "rs-only"}
    # A key pinned to RS256 by its JWK is not offered for PS256, even with the right kid.
    ps = jwt.encode(
        {"sub": "a", "roles": ["user"], "exp": int(NOW) + 60},
        KEY_1,
        algorithm="PS256",
        headers={"kid": "rs-only"},
    )
    assert await setup.reason(ps) == "token_unknown_key"
    assert (await setup.verifier.verify(setup.token(KEY_1, "rs-only"))).subject == "alice"


async def test_token_without_kid_tries_every_fitting_key(setup: Setup) -> None:
    setup.idp.keys = [jwk(KEY_2, "kid-2"), jwk(KEY_1, "kid-1")]
    await setup.verifier.start()
    token = jwt.encode(
        {"sub": "bob", "roles": ["user"], "exp": int(NOW) + 60}, KEY_1, algorithm="RS256"
    )
    assert (await setup.verifier.verify(token)).subject == "bob"
    assert setup.idp.hits == 1


async def test_build_verifier_with_jwks_and_its_own_session(aiohttp_server: AiohttpServer) -> None:
    idp = Jwks(keys=[jwk(KEY_1, "kid-1")])
    app = web.Application()
    app.router.add_get("/jwks", idp.handle)
    server = await aiohttp_server(app)
    settings = JwtSettings(algorithms=("RS256",), jwks_url=str(server.make_url("/jwks")))
    verifier = build_verifier(
        settings, DEFAULT_ROLES, session=None, revocations=MemoryRevocationList()
    )
    await verifier.start()
    try:
        now = int(time.time())  # build_verifier's verifier runs on the real clock
        token = jwt.encode(
            {"sub": "carol", "roles": ["admin"], "iat": now, "exp": now + 60},
            KEY_1,
            algorithm="RS256",
            headers={"kid": "kid-1"},
        )
        principal = await verifier.verify(token)
        assert (principal.subject, principal.roles) == ("carol", frozenset({"admin"}))
        assert idp.hits == 1
    finally:
        await verifier.close()
