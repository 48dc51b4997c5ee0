"""The stock ComfyUI frontend (1.27.10) in headless Chromium, through the proxy to the fake.

The page is signed in with a session cookie the proxy minted (``ProxyServer.sign_in``): these
tests are about the relay; the login itself is driven in ``test_login_browser.py``. So every
request below reaches the fake as the signed-in user, and what "transparent" means here is
checked from both ends:

* the browser: no request without an HTTP answer, no 5xx, no 403 (ComfyUI's origin check), the
  WebSocket opened through the proxy and got its ``status`` frame with a ``sid``;
* the fake: every request the browser got an answer for reached the fake and was answered with
  the same status, and the WebSocket handshake reached it with a consistent ``Host``/``Origin``.
"""

from __future__ import annotations

import json
from functools import partial
from urllib.parse import unquote, urlsplit

import pytest
from playwright.async_api import BrowserContext
from yarl import URL

from proxy.principal import comfy_user_id
from proxy.routes import classify, normalise_path
from proxy.target import canonical_target
from proxy.userdata.handler import parse_call, upstream_target
from proxy.userdata.paths import PREFIX_ROOT
from tests.browser.conftest import (
    USERNAME,
    Answered,
    Exchange,
    FakeUpstream,
    PageRecorder,
    StartProxy,
)
from tests.browser.frontend import (
    assert_reached_as,
    load_frontend,
    queue_prompt_from_ui,
    restore_workflow_on_load,
    upstream_sid,
)

pytestmark = pytest.mark.browser

# 404s that real ComfyUI 0.3.64 gives the same frontend on a first visit
# (captures/frontend-requests.json): the optional user stylesheets, the listing of a user's
# workflows/subgraphs folders that do not exist yet, and the templates-usage file.
KNOWN_404_PATHS = frozenset(
    {
        "/user.css",
        "/api/userdata/user.css",
        "/api/userdata",  # ?dir=workflows&... and ?dir=subgraphs%2F&... on a fresh user directory
        "/api/userdata/comfy.templates.json",
    }
)

# Absolute paths frontend 1.27.10 hardcodes, so that under a base path they miss it (and the
# proxy answers its own 404, as any sub-path reverse proxy would): the tab's progress favicon
# (GraphView-*.js: "/assets/images/favicon_progress_16x16/frame_9.png", frame_N while running).
ROOT_ABSOLUTE_PATHS = ("/assets/images/favicon_progress_16x16/",)

# What the proxy answers itself on ComfyUI's surface, by design (docs/identity.md, "Identity toward
# ComfyUI"): ``GET /users`` gets the single-user shape, so the stock UI never shows its user
# picker and ComfyUI's list of users never reaches a browser. (method, path under the base path).
ANSWERED_BY_PROXY = frozenset(
    {
        ("GET", "/api/users"),
        ("GET", "/users"),
        # The proxy's account extension (proxy.frontend): its script and who is signed in.
        ("GET", "/extensions/comfygate/account.js"),
        ("GET", "/comfygate/whoami"),
    }
)

# The fake runs without --multi-user, so the signed-in (non-admin) user's saved workflows,
# settings and user.css live in their own folder (proxy.userdata): a user data request reaches
# the fake with its path moved there, and /settings is answered from that folder's
# comfy.settings.json (read and written through /userdata).
OWN_FOLDER = (PREFIX_ROOT, comfy_user_id(USERNAME))


def as_forwarded(method: str, target: str) -> str | None:
    """The target the proxy sends the fake for the browser's ``method target`` (under the base
    path), in the proxy's own encoding (proxy.target); None for what the proxy builds from
    requests of its own: ``/settings`` (from user data requests) and the signed-in user's
    ``GET /history`` (from ``/history/{id}`` of their own prompts, proxy.isolation.own_views)."""
    path, _, query = target.partition("?")
    normalised, prefixed = normalise_path(path)
    rule = classify(method, normalised, prefixed=prefixed).name
    if rule == "settings" or (rule == "history" and method == "GET" and normalised == "/history"):
        return None
    if rule != "userdata":
        return canonical_target(method, target, host=None).upstream
    call = parse_call(method, normalised, URL.build(query_string=query, encoded=True).query)
    return upstream_target(call, OWN_FOLDER, "/api" if prefixed else "")


def is_relayed(answer: Answered) -> bool:
    """A client's request the proxy relayed (its own checks, such as whether ComfyUI runs
    with --multi-user, carry no request id), other than the settings reads and writes."""
    own_settings = "/".join(OWN_FOLDER) + "/comfy.settings.json"
    path = urlsplit(answer.raw_path).path
    # The proxy's own reads of the user's prompts, one by one, for their GET /history
    # (the stock frontend itself never asks /history/{id}).
    own_view = answer.method == "GET" and "/history/" in path
    return (
        "X-Request-ID" in answer.headers
        and own_settings not in unquote(answer.raw_path)
        and not own_view
    )


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


async def assert_relayed_faithfully(
    recorder: PageRecorder, upstream: FakeUpstream, prefix: str = ""
) -> None:
    """The checks shared by the tests (``prefix`` is the proxy's base path).

    Both directions: what the browser got came from the fake with the same status, and every
    answer of the fake reached the browser with its status (WS handshakes are checked apart).
    """
    failed = recorder.network_failures()
    assert not failed, f"requests without an HTTP answer: {failed}"

    local = [r for r in recorder.responses if not r.url.startswith(("data:", "blob:"))]
    bad = [r for r in local if r.status is not None and (r.status >= 500 or r.status == 403)]
    assert not bad, f"5xx/403 answers through the proxy: {bad}"

    # Answered by the proxy on purpose (ANSWERED_BY_PROXY): 200, and never forwarded.
    identity = [r for r in local if is_answered_by_proxy(r, prefix)]
    assert all(r.status == 200 for r in identity), identity
    forwarded = [
        a
        for a in upstream.log.answered
        if (a.method, urlsplit(a.raw_path).path) in ANSWERED_BY_PROXY and is_relayed(a)
    ]
    assert not forwarded, f"answered by ComfyUI, not by the proxy: {forwarded}"
    local = [r for r in local if r not in identity]

    if prefix:
        # Answered by the proxy itself, never forwarded: the redirect of the bare base path,
        # and what the frontend asks for by an absolute path (ROOT_ABSOLUTE_PATHS) -> 404.
        own = [r for r in local if is_proxy_own(r.url, prefix)]
        assert all(r.status in (301, 308, 404) for r in own), own
        local = [r for r in local if r not in own]
    outside = [r for r in local if not urlsplit(r.url).path.startswith(prefix + "/")]
    assert not outside, f"requests outside the base path {prefix}/: {outside}"

    answered = upstream.log.statuses()
    missing: list[Exchange] = []
    changed: list[tuple[Exchange, set[int]]] = []
    for exchange in local:
        target = as_forwarded(exchange.method, exchange.target[len(prefix) :])
        if target is None:  # built by the proxy from requests of its own (as_forwarded)
            assert exchange.status == 200, exchange
            continue
        seen = answered.get((exchange.method, target)) or answered.get(
            (exchange.method, without_paging(target))
        )
        if seen is None:
            missing.append(exchange)
        elif exchange.status not in seen:
            changed.append((exchange, seen))
    assert not missing, f"answered to the browser but never reached the fake: {missing}"
    assert not changed, f"status differs between fake and browser (browser, fake): {changed}"
    for answer in upstream.log.answered:
        if answer.status != 101 and is_relayed(answer):
            await recorder.wait_for_response(
                partial(_same_exchange, answer, prefix),
                within=5.0,
                what=f"answer {answer.status} to {answer.method} {prefix}{answer.raw_path}",
            )

    unexpected_404 = [
        r
        for r in local
        if r.status == 404 and urlsplit(r.target[len(prefix) :]).path not in KNOWN_404_PATHS
    ]
    assert not unexpected_404, (
        f"404s real ComfyUI does not give at page load (a route the fake lacks?): {unexpected_404}"
    )


# Isolation pages a user's history and jobs itself: ComfyUI is asked for the whole list.
PAGING_PARAMS = frozenset({"max_items", "offset", "limit"})


def without_paging(target: str) -> str:
    """``target`` as the isolation layer forwards it (paging parameters removed)."""
    path, _, query = target.partition("?")
    kept = [p for p in query.split("&") if p and p.split("=", 1)[0] not in PAGING_PARAMS]
    return f"{path}?{'&'.join(kept)}" if kept else path


def _same_exchange(answer: Answered, prefix: str, exchange: Exchange) -> bool:
    if exchange.method != answer.method or exchange.status != answer.status:
        return False
    if not exchange.target.startswith(prefix + "/"):
        return False
    target = as_forwarded(exchange.method, exchange.target[len(prefix) :])
    return target is not None and without_paging(target) == without_paging(answer.raw_path)


def assert_ws_handshake_consistent(upstream: FakeUpstream, ws_path: str = "/ws") -> None:
    """ComfyUI's origin check passes: the handshake came with Origin's host:port == Host."""
    handshakes = [a for a in upstream.log.answered if urlsplit(a.raw_path).path == ws_path]
    assert handshakes, f"the fake never saw a {ws_path} handshake"
    for handshake in handshakes:
        host = handshake.headers.get("Host", "")
        origin = handshake.headers.get("Origin", "")
        assert origin, f"browser handshakes always carry Origin: {handshake}"
        assert urlsplit(origin).netloc.lower() == host.lower(), (host, origin)
        assert handshake.status == 101, handshake


def is_answered_by_proxy(exchange: Exchange, prefix: str) -> bool:
    """One of the ComfyUI routes the proxy answers itself (:data:`ANSWERED_BY_PROXY`)."""
    path = urlsplit(exchange.url).path
    return path.startswith(prefix + "/") and (
        (exchange.method, path[len(prefix) :]) in ANSWERED_BY_PROXY
    )


def is_proxy_own(url: str, prefix: str) -> bool:
    """Under a base path: the proxy's redirect, or a known absolute path outside the base."""
    path = urlsplit(url).path
    return path == prefix or path.startswith(ROOT_ABSOLUTE_PATHS)


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


async def test_frontend_loads_through_proxy(
    upstream: FakeUpstream,
    start_proxy: StartProxy,
    context: BrowserContext,
    recorder: PageRecorder,
) -> None:
    proxy = await start_proxy()
    await proxy.sign_in(context)
    base = proxy.url
    loaded = await load_frontend(recorder, f"{base}/", "/ws")
    assert loaded.response.status == 200
    await recorder.page.wait_for_load_state("networkidle")
    await upstream.fake.wait_idle()

    await assert_relayed_faithfully(recorder, upstream)
    assert_ws_handshake_consistent(upstream)
    assert_reached_as(upstream, proxy, USERNAME)
    socket = loaded.socket
    assert urlsplit(socket.url).netloc == urlsplit(base).netloc  # through the proxy, not around
    assert not socket.closed
    assert socket.error is None
    # The client id the UI adopted is the sid it was given through the proxy...
    assert await recorder.page.evaluate("() => window.app.api.clientId") == loaded.sid
    # ...and the page's own first frame went through the relay to the fake, under that sid.
    assert any(
        who == upstream_sid(loaded.sid)
        and kind == "text"
        and json.loads(text).get("type") == "feature_flags"
        for who, kind, text in upstream.fake.ws_received
    )
    await recorder.screenshot("frontend-through-proxy.png")


@pytest.mark.parametrize("base_path", ["", "/comfy"], ids=["root", "base_path"])
async def test_queue_prompt_from_ui(
    upstream: FakeUpstream,
    start_proxy: StartProxy,
    context: BrowserContext,
    recorder: PageRecorder,
    base_path: str,
) -> None:
    proxy = await start_proxy(server={"base_path": base_path})
    await proxy.sign_in(context)
    base = proxy.url
    await restore_workflow_on_load(recorder.page)
    loaded = await load_frontend(recorder, f"{base}{base_path}/", f"{base_path}/ws")

    ran = await queue_prompt_from_ui(recorder, loaded, base_path)
    assert urlsplit(ran.view.url).netloc == urlsplit(base).netloc  # fetched through the proxy

    await upstream.fake.wait_idle()
    posts = [
        r for r in upstream.fake.received if r.method == "POST" and r.raw_path == "/api/prompt"
    ]
    assert len(posts) == 1, posts
    assert json.loads(posts[0].body)["client_id"] == upstream_sid(loaded.sid)
    assert upstream.log.statuses()[("POST", "/api/prompt")] == {200}
    await assert_relayed_faithfully(recorder, upstream, prefix=base_path)
    assert_reached_as(upstream, proxy, USERNAME)
    await recorder.screenshot(f"queue-prompt-through-proxy{base_path.replace('/', '-')}.png")


async def test_frontend_under_base_path(
    upstream: FakeUpstream,
    start_proxy: StartProxy,
    context: BrowserContext,
    recorder: PageRecorder,
) -> None:
    proxy = await start_proxy(server={"base_path": "/comfy"})
    await proxy.sign_in(context)
    base = proxy.url
    loaded = await load_frontend(recorder, f"{base}/comfy", "/comfy/ws")

    # "/comfy" was redirected to "/comfy/" by the proxy itself (the UI needs the trailing slash).
    assert recorder.page.url == f"{base}/comfy/"
    assert loaded.response.status == 200
    redirect = loaded.response.request.redirected_from
    assert redirect is not None
    assert redirect.url == f"{base}/comfy"
    first = await redirect.response()
    assert first is not None
    assert first.status in (301, 308), first
    assert urlsplit(first.headers["location"]).path == "/comfy/"

    assert urlsplit(loaded.socket.url).netloc == urlsplit(base).netloc
    await recorder.page.wait_for_load_state("networkidle")
    await upstream.fake.wait_idle()

    await assert_relayed_faithfully(recorder, upstream, prefix="/comfy")
    assert_ws_handshake_consistent(upstream, "/ws")
    assert_reached_as(upstream, proxy, USERNAME)
    await recorder.screenshot("frontend-under-base-path.png")
