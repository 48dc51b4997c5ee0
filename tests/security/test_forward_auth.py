"""Forward-auth (issue 20): an authenticating proxy in front vouches for the person, and only it.

The attacker talks to the proxy directly (or through a hop that is not trusted) and writes the
identity headers themselves; or forges the signed assertion. The test client connects from
127.0.0.1: "trusted" below means ``trusted_networks`` contains it, "untrusted" that it holds only
the documentation range 192.0.2.0/24 (no traffic goes there: it is configuration only).
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric import rsa
from pytest_aiohttp import AiohttpServer
from structlog.testing import capture_logs

from proxy.principal import comfy_user_id
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI

Client = TestClient[Any, Any]
TRUSTED = ["127.0.0.1/32"]
UNTRUSTED = ["192.0.2.0/24"]
ROLE_MAP = {"comfy-users": "user", "comfy-admins": "admin"}
FORGED = {"X-Forwarded-User": "root", "X-Forwarded-Groups": "comfy-admins,admin"}
LEAKY = ("X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Groups", "X-Auth-Assertion")


def forward_section(networks: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "forward_auth": {
            "enabled": True,
            "trusted_networks": networks,
            "role_map": ROLE_MAP,
            **extra,
        }
    }


def received(fake: FakeComfyUI, path: str) -> list[Any]:
    return [r for r in fake.received if r.raw_path == path]


def assert_no_identity_headers_leaked(fake: FakeComfyUI) -> None:
    for request in fake.received:
        for name in LEAKY:
            assert name not in request.headers, (request.raw_path, name)


async def test_headers_from_an_untrusted_address_are_ignored_and_stripped(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client: Client = await make_proxy(fake_comfy.url, token=None, auth=forward_section(UNTRUSTED))
    with capture_logs() as logs:
        attacker = await client.get("/api/system_stats", headers=FORGED)
    assert attacker.status == 401
    assert (await attacker.json())["error"]["type"] == "unauthenticated"
    assert fake_comfy.received == []
    assert not any(e["event"] == "forward_auth_refused" for e in logs)  # not even looked at

    # With their own (user) token, the forged headers change nothing and reach nobody.
    attacker = await client.get(
        "/api/system_stats", headers={**FORGED, **bearer("mallory", ("user",))}
    )
    assert attacker.status == 200
    (seen,) = received(fake_comfy, "/api/system_stats")
    assert seen.headers["Comfy-User"] == comfy_user_id("mallory")
    assert_no_identity_headers_leaked(fake_comfy)


async def test_headers_from_the_trusted_proxy_are_honoured(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client: Client = await make_proxy(fake_comfy.url, token=None, auth=forward_section(TRUSTED))
    headers = {
        "X-Forwarded-User": "alice",
        "X-Forwarded-Email": "alice@example.com",
        "X-Forwarded-Groups": "comfy-users, other-team",
    }
    resp = await client.get("/api/system_stats", headers=headers)
    assert resp.status == 200, await resp.text()
    me = await (await client.get("/comfygate/whoami", headers=headers)).json()
    assert (me["user"], me["roles"], me["credential"]) == ("forward:alice", ["user"], "forward")
    (seen,) = received(fake_comfy, "/api/system_stats")
    # Namespaced: never the users file's "alice" (whose name cannot contain ':').
    assert seen.headers["Comfy-User"] == comfy_user_id("forward:alice")
    assert_no_identity_headers_leaked(fake_comfy)


async def test_trusted_person_without_a_role_is_refused(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client: Client = await make_proxy(fake_comfy.url, token=None, auth=forward_section(TRUSTED))
    with capture_logs() as logs:
        resp = await client.get(
            "/api/system_stats",
            headers={"X-Forwarded-User": "bob", "X-Forwarded-Groups": "other-team"},
        )
    assert resp.status == 403
    assert (await resp.json())["error"]["type"] == "no_role"
    assert [e["reason"] for e in logs if e["event"] == "forward_auth_refused"] == ["no_role"]
    assert fake_comfy.received == []


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Forwarded-User", "alice"), ("X-Forwarded-User", "root")],
        [("X-Forwarded-User", "al\tice")],
        [("X-Forwarded-User", "alice"), ("X-Forwarded-Groups", "x" * 9000)],
    ],
    ids=["repeated", "control_character", "groups_too_long"],
)
async def test_malformed_forwarded_headers_are_refused(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, headers: list[tuple[str, str]]
) -> None:
    client: Client = await make_proxy(fake_comfy.url, token=None, auth=forward_section(TRUSTED))
    resp = await client.get("/api/system_stats", headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"]["type"] == "forward_auth_malformed"
    assert fake_comfy.received == []


async def test_forwarded_identity_is_ambient_cross_site_posts_are_refused(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    # The auth proxy adds the identity to whatever the browser sends, a forged cross-site form
    # post included: the origin check applies as for session cookies.
    client: Client = await make_proxy(fake_comfy.url, token=None, auth=forward_section(TRUSTED))
    headers = {
        "X-Forwarded-User": "alice",
        "X-Forwarded-Groups": "comfy-users",
        "Origin": "https://evil.example",
    }
    resp = await client.post("/api/interrupt", headers=headers, json={})
    assert resp.status == 403
    assert (await resp.json())["error"]["type"] == "origin_not_allowed"
    no_origin = {k: v for k, v in headers.items() if k != "Origin"}
    resp = await client.post("/api/interrupt", headers=no_origin, json={})
    assert resp.status == 403
    assert (await resp.json())["error"]["type"] == "csrf_failed"
    assert fake_comfy.received == []


# ------------------------------------------------------------------------ signed assertion


@pytest.fixture
async def auth_proxy_keys(
    aiohttp_server: AiohttpServer,
) -> tuple[rsa.RSAPrivateKey, str]:
    """The auth proxy's signing key and the URL of its JWKS."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "auth-proxy", "use": "sig", "alg": "RS256"})

    async def jwks(_request: web.Request) -> web.Response:
        return web.json_response({"keys": [jwk]})

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    server: TestServer = await aiohttp_server(app)
    return key, str(server.make_url("/jwks"))


def assertion(key: rsa.RSAPrivateKey, **claims: Any) -> str:
    now = int(time.time())
    body = {"sub": "carol", "groups": ["comfy-users"], "iss": "https://auth.example", **claims}
    body.setdefault("exp", now + 300)
    body.setdefault("aud", "comfygate")
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "auth-proxy"})


def assertion_section(jwks_url: str) -> dict[str, Any]:
    return forward_section(
        TRUSTED,
        assertion_header="X-Auth-Assertion",
        assertion_jwks_url=jwks_url,
        assertion_issuer="https://auth.example",
        assertion_audience=["comfygate"],
    )


async def test_signed_assertion_verified_with_the_auth_proxy_jwks(
    make_proxy: ProxyFactory,
    fake_comfy: FakeComfyUI,
    auth_proxy_keys: tuple[rsa.RSAPrivateKey, str],
) -> None:
    key, jwks_url = auth_proxy_keys
    client: Client = await make_proxy(fake_comfy.url, token=None, auth=assertion_section(jwks_url))
    resp = await client.get("/api/system_stats", headers={"X-Auth-Assertion": assertion(key)})
    assert resp.status == 200, await resp.text()
    (seen,) = received(fake_comfy, "/api/system_stats")
    assert seen.headers["Comfy-User"] == comfy_user_id("forward:carol")
    assert_no_identity_headers_leaked(fake_comfy)


@pytest.mark.parametrize(
    ("forge", "error_type"),
    [
        ("other_key", "forward_auth_invalid"),
        ("expired", "forward_auth_expired"),
        ("audience", "forward_auth_invalid"),
        ("issuer", "forward_auth_invalid"),
        ("hs256", "forward_auth_invalid"),
        ("plain_headers", "unauthenticated"),
    ],
)
async def test_forged_assertion_is_refused(
    make_proxy: ProxyFactory,
    fake_comfy: FakeComfyUI,
    auth_proxy_keys: tuple[rsa.RSAPrivateKey, str],
    forge: str,
    error_type: str,
) -> None:
    key, jwks_url = auth_proxy_keys
    client: Client = await make_proxy(fake_comfy.url, token=None, auth=assertion_section(jwks_url))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    headers = {
        "other_key": {"X-Auth-Assertion": assertion(other, groups=["comfy-admins"])},
        "expired": {"X-Auth-Assertion": assertion(key, exp=int(time.time()) - 3600)},
        "audience": {"X-Auth-Assertion": assertion(key, aud="another-app")},
        "issuer": {"X-Auth-Assertion": assertion(key, iss="https://evil.example")},
        "hs256": {
            "X-Auth-Assertion": jwt.encode(
                {"sub": "root", "groups": ["comfy-admins"], "exp": int(time.time()) + 60},
                "x" * 64,
                algorithm="HS256",
            )
        },
        # With an assertion configured, the plain headers are no credential at all.
        "plain_headers": {"X-Forwarded-User": "root", "X-Forwarded-Groups": "comfy-admins"},
    }[forge]
    with capture_logs() as logs:
        resp = await client.get("/api/system_stats", headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"]["type"] == error_type
    if forge != "plain_headers":
        assert any(e["event"] == "forward_auth_refused" for e in logs)
    assert fake_comfy.received == []
