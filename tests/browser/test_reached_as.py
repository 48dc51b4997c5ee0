"""The browser helpers' invariant (``frontend.assert_reached_as``) on hand-made request logs: no
browser needed. Every relayed request is the signed-in user's; the cached catalog may also be
the proxy's own identity-less refresh, never another user's fetch."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
from multidict import CIMultiDict, MultiDict

from proxy.principal import comfy_user_id
from tests.browser.conftest import FakeUpstream, ProxyServer
from tests.browser.frontend import assert_reached_as, is_catalog_fetch
from tests.fakes.comfyui.middleware import Received


def received(method: str, path: str, user: str | None, *, relayed: bool = True) -> Received:
    headers: CIMultiDict[str] = CIMultiDict()
    if relayed:  # what the proxy relays carries the request's id (proxy.upstream.headers)
        headers["X-Request-ID"] = "r1"
    if user is not None:
        headers["Comfy-User"] = comfy_user_id(user)
    return Received(method, path, path, MultiDict(), headers)


def check(*requests: Received) -> None:
    upstream = cast(FakeUpstream, SimpleNamespace(fake=SimpleNamespace(received=list(requests))))
    proxy = cast(ProxyServer, SimpleNamespace(session_cookie="comfygate_session"))
    assert_reached_as(upstream, proxy, "alice")


def test_catalog_paths() -> None:
    assert is_catalog_fetch("GET", "/object_info")
    assert is_catalog_fetch("GET", "/api/object_info/KSampler")
    assert not is_catalog_fetch("POST", "/object_info")
    assert not is_catalog_fetch("GET", "/object_infox")


@pytest.mark.parametrize("catalog_user", ["alice", None])
def test_the_catalog_is_the_users_miss_or_the_proxys_refresh(catalog_user: str | None) -> None:
    check(received("GET", "/queue", "alice"), received("GET", "/api/object_info", catalog_user))


def test_the_proxys_own_queue_read_is_no_ones() -> None:
    check(received("GET", "/prompt", "alice"), received("GET", "/queue", None, relayed=False))


@pytest.mark.parametrize(
    "bad",
    [
        received("GET", "/queue", None),  # a relayed request without the user
        received("GET", "/history", "bob"),
        received("GET", "/object_info", "bob"),  # the catalog as another user
    ],
)
def test_anything_else_fails(bad: Any) -> None:
    with pytest.raises(AssertionError):
        check(received("GET", "/prompt", "alice"), bad)
