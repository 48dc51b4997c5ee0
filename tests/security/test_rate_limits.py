"""Every request forwarded to ComfyUI spends a rate-limit class (issue 13, item 10).

Paths no rule names (rule ``other``: ``/api/i18n``, custom nodes' routes) were never limited,
though the README said every family is; the frontend's files were not either. Now ``other``
spends ``read`` and the frontend's files spend ``static``, a generous class of their own (the
stock UI loads about 500 files at start). Each case: a user with a burst of 1 in every class
gets one request through, and the next is refused with 429 before ComfyUI sees it.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy.chain import ROUTE_TABLE
from proxy.limits.classes import route_class
from proxy.limits.guard import RateLimitGuard
from proxy.routes import OTHER, RULES
from proxy.settings.limits import ROUTE_CLASSES, RateLimitSettings
from tests.conftest import ProxyFactory, bearer, make_settings
from tests.fakes.comfyui import FakeComfyUI
from tests.security.raw_http import exchange

Client = TestClient[Any, Any]
ONE = {"rate": "1/hour", "burst": 1}
OPS_ROUTES = ["internal", "free", "manager", "assets_admin"]


@pytest.fixture
async def client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str) -> Client:
    """Every class one request an hour; role ``ops`` may use the admin-only families."""
    settings = RateLimitSettings()
    roles = {name: role.model_dump() for name, role in make_settings("http://x").roles.items()}
    roles["ops"] = {"allow_routes": OPS_ROUTES}
    return await make_proxy(
        fake_comfy.url,
        token=None,
        redis={"url": redis_url},
        rate_limits={"default": dict.fromkeys(settings.default, ONE)},
        roles=roles,
    )


# (rule, method, target, role, extra headers)
CASES: list[tuple[str, str, str, str, list[tuple[str, str]]]] = [
    ("other", "GET", "/api/i18n", "user", []),
    ("other", "GET", "/api/custom_node/thing?x=1", "user", []),
    ("other", "POST", "/my_extension/run", "user", []),
    ("other", "GET", "/favicon.ico", "user", []),
    ("static", "GET", "/", "user", []),
    ("static", "GET", "/extensions/core/x.js", "user", []),
    ("static", "GET", "/templates/default.json", "user", []),
    ("static", "GET", "/assets/index-abc.js", "user", []),
    ("ws", "GET", "/ws?clientId=a", "user", []),  # not an upgrade: an ordinary read
    ("prompt", "GET", "/api/prompt", "user", []),
    ("queue", "GET", "/api/queue", "user", []),
    ("interrupt", "POST", "/api/interrupt", "user", []),
    ("history", "GET", "/api/history", "user", []),
    ("jobs", "GET", "/api/jobs", "user", []),
    ("view", "GET", "/api/view?filename=none.png&subfolder=shared&type=input", "user", []),
    ("object_info", "GET", "/api/object_info", "user", []),
    ("models", "GET", "/api/models", "user", []),
    ("system_stats", "GET", "/api/system_stats", "user", []),
    ("settings", "GET", "/api/settings", "user", []),
    ("users", "GET", "/api/users", "user", []),
    ("internal", "GET", "/internal/logs", "ops", []),
    ("free", "POST", "/api/free", "ops", []),
    ("manager", "GET", "/api/manager/queue/status", "ops", []),
    ("assets_admin", "POST", "/api/assets/seed", "ops", []),
    ("assets", "GET", "/api/assets", "user", []),
]


@pytest.mark.parametrize(("rule", "method", "target", "role", "headers"), CASES)
async def test_every_forwarded_route_is_limited(
    rule: str,
    method: str,
    target: str,
    role: str,
    headers: list[tuple[str, str]],
    client: Client,
    fake_comfy: FakeComfyUI,
) -> None:
    who = list(bearer(f"{role}-{rule}-{len(headers)}", (role,)).items())
    body = b"{}" if method == "POST" else b""
    json_type = [("Content-Type", "application/json")] if body else []
    first = await exchange(client, method, target, who + headers + json_type, body)
    assert first.status != 429, first.body
    seen = len(fake_comfy.received)
    second = await exchange(client, method, target, who + headers + json_type, body)
    assert second.status == 429, (rule, second.status, second.body[:200])
    assert second.error_type == "rate_limited"
    assert "Retry-After" in second.headers
    assert len(fake_comfy.received) == seen  # ComfyUI never saw the refused one


async def test_socket_handshakes_are_limited(client: Client, fake_comfy: FakeComfyUI) -> None:
    who = bearer("socket-user")
    async with client.ws_connect("/ws?clientId=a", headers=who) as ws:
        assert (await ws.receive_json(timeout=10))["type"] == "status"
    seen = len(fake_comfy.received)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws?clientId=a", headers=who)
    assert info.value.status == 429
    assert len(fake_comfy.received) == seen


async def test_query_and_encodings_share_one_allowance(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """``/api/i18n``, ``/i18n`` and ``http://<this server>/%69%31%38n`` are one resource."""
    who = list(bearer("encoder").items())
    first = await exchange(client, "GET", "/api/i18n?lang=fr", who)
    assert first.status != 429
    host = f"{client.server.host}:{client.server.port}"
    for target in ("/i18n", "/api/%69%31%38n", f"http://{host}//api/i18n"):
        answer = await exchange(client, "GET", target, who)
        assert answer.status == 429, target
    assert len(fake_comfy.received) == 1


async def test_the_limit_guard_is_wired_on_every_comfyui_rule(client: Client) -> None:
    """A rule added later is limited unless someone decides otherwise here."""
    app = client.app
    assert app is not None
    table = app[ROUTE_TABLE]
    for rule in (*RULES, OTHER):
        assert any(isinstance(g, RateLimitGuard) for g in table[rule.name].guards), rule.name
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            for websocket in (False, True):
                assert route_class(rule.name, method, websocket=websocket) in ROUTE_CLASSES


STOCK_UI_REQUESTS_AT_LOAD = 485
"""Requests the stock frontend made to load (real ComfyUI capture ``frontend-requests.json``,
``requests_at_load``; API calls included)."""


def test_the_static_class_fits_the_stock_frontend() -> None:
    static = RateLimitSettings().default["static"]
    assert static.burst >= STOCK_UI_REQUESTS_AT_LOAD
    assert static.count / static.period_seconds >= 50
