"""Driving the stock frontend (1.27.10): load it, restore a workflow, queue it with Run.

Shared by the relay tests and the login tests; every wait is on a browser or WebSocket event.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.async_api import Page, Response, expect

from proxy.principal import comfy_user_id
from proxy.web.assets import PUBLIC_ASSET
from tests.browser.conftest import (
    DEFAULT_TIMEOUT_MS,
    Exchange,
    FakeUpstream,
    PageRecorder,
    ProxyServer,
    SocketRecorder,
)
from tests.fakes.comfyui.middleware import Received

# A small graph the fake can run, in the frontend's own (LiteGraph) format: what the UI keeps
# in localStorage as the user's current workflow and restores on the next visit.
EMPTY_IMAGE_TO_SAVE_IMAGE: dict[str, Any] = {
    "last_node_id": 2,
    "last_link_id": 1,
    "nodes": [
        {
            "id": 1,
            "type": "EmptyImage",
            "pos": [60, 120],
            "size": [320, 130],
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": [],
            "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1], "slot_index": 0}],
            "properties": {"Node name for S&R": "EmptyImage"},
            "widgets_values": [64, 48, 1, 0x3366CC],
        },
        {
            "id": 2,
            "type": "SaveImage",
            "pos": [440, 120],
            "size": [320, 280],
            "flags": {},
            "order": 1,
            "mode": 0,
            "inputs": [{"name": "images", "type": "IMAGE", "link": 1}],
            "outputs": [],
            "properties": {"Node name for S&R": "SaveImage"},
            "widgets_values": ["browser"],
        },
    ],
    "links": [[1, 1, 0, 2, 0, "IMAGE"]],
    "groups": [],
    "config": {},
    "extra": {},
    "version": 0.4,
}


@dataclass(frozen=True)
class Loaded:
    """The UI after its first load: the navigation's response, its WebSocket and sid."""

    response: Response
    socket: SocketRecorder
    sid: str


@dataclass(frozen=True)
class Ran:
    """A prompt queued from the Run button and run to completion by the fake."""

    response: Response
    """The answer to the page's ``POST <base>/api/prompt``."""
    prompt_id: str
    view: Exchange
    """The page's fetch of the output image (``<base>/api/view?filename=...``)."""


async def restore_workflow_on_load(page: Page) -> None:
    """The user's current workflow, as the UI itself persisted it on a previous visit."""
    workflow = json.dumps(json.dumps(EMPTY_IMAGE_TO_SAVE_IMAGE))
    await page.add_init_script(f"window.localStorage.setItem('workflow', {workflow});")


async def wait_for_frontend(recorder: PageRecorder, response: Response, ws_path: str) -> Loaded:
    """The UI the page is showing (``response``: its navigation): canvas, WebSocket at
    ``ws_path`` with its ``status`` frame (a sid) and the answer to the page's first frame."""
    page = recorder.page
    try:
        await expect(page.locator("#graph-canvas")).to_be_visible(timeout=DEFAULT_TIMEOUT_MS)
    except AssertionError:
        pytest.fail(f"the UI never showed its canvas; {recorder.trouble()}")
    socket = await recorder.wait_for_socket(ws_path)
    status = await socket.wait_for_type("status")
    sid = status["data"].get("sid")
    assert isinstance(sid, str), f"first status frame without a sid: {status}"
    assert sid
    await socket.wait_for_type("feature_flags")  # the answer to the page's own first frame
    return Loaded(response, socket, sid)


async def load_frontend(recorder: PageRecorder, url: str, ws_path: str) -> Loaded:
    """Open the UI at ``url``; wait for the canvas and the WebSocket at ``ws_path``."""
    response = await recorder.page.goto(url)
    assert response is not None, url
    return await wait_for_frontend(recorder, response, ws_path)


async def queue_prompt_from_ui(recorder: PageRecorder, loaded: Loaded, base_path: str) -> Ran:
    """Click Run on the restored workflow (:func:`restore_workflow_on_load`); wait for the
    prompt's ``executed``/``execution_success`` frames and the page's fetch of the output."""
    page = recorder.page
    await page.wait_for_function(
        "() => (window.app?.graph?.nodes ?? []).map((n) => n.type).sort().join()"
        " === 'EmptyImage,SaveImage'"
    )

    run = page.locator('[data-testid="queue-button"] button').first
    async with page.expect_response(
        lambda r: r.request.method == "POST" and urlsplit(r.url).path == f"{base_path}/api/prompt"
    ) as queued:
        await run.click()
    response = await queued.value
    assert response.status == 200, await response.text()
    prompt_id = (await response.json())["prompt_id"]
    assert isinstance(prompt_id, str), prompt_id
    sent = response.request.post_data_json
    assert isinstance(sent, dict), response.request.post_data
    assert sent["client_id"] == loaded.sid
    assert sent["prompt"]["1"]["class_type"] == "EmptyImage"
    assert sent["prompt"]["2"]["inputs"]["images"] == ["1", 0]

    socket = loaded.socket
    executed = await socket.wait_for_type("executed", prompt_id=prompt_id)
    await socket.wait_for_type("execution_success", prompt_id=prompt_id)
    image = executed["data"]["output"]["images"][0]

    def is_output_view(exchange: Exchange) -> bool:
        parts = urlsplit(exchange.url)
        filename = parse_qs(parts.query).get("filename")
        return parts.path == f"{base_path}/api/view" and filename == [image["filename"]]

    view = await recorder.wait_for_response(is_output_view)
    assert view.status == 200, view
    assert urlsplit(view.url).netloc == urlsplit(page.url).netloc  # fetched through the proxy
    assert parse_qs(urlsplit(view.url).query).get("type") == [image["type"]]
    return Ran(response, prompt_id, view)


CATALOG_PATHS = ("/object_info", "/api/object_info")
"""ComfyUI's node catalog: the proxy caches it (``proxy.policy.catalog.cache``) and serves every
principal a copy filtered from ONE upstream answer, so what reached ComfyUI for it is not
necessarily this user's request (see :func:`assert_reached_as`)."""


def is_catalog_fetch(method: str, path: str) -> bool:
    """A ``GET`` of the catalog, with or without the ``/api`` prefix (and ``/{class}``)."""
    return method == "GET" and any(path == p or path.startswith(p + "/") for p in CATALOG_PATHS)


def is_user_mode_check(rec: Received) -> bool:
    """The proxy's ``GET /users`` asking ComfyUI whether it runs with ``--multi-user``."""
    return (
        rec.method == "GET"
        and rec.raw_path == "/users"
        and not any(
            h in rec.headers for h in ("Comfy-User", "Authorization", "Cookie", "X-Request-ID")
        )
    )


def is_background_queue_read(rec: Received) -> bool:
    """The proxy's own ``GET /queue`` (the queue quota's reconciler, the lost-prompt and
    generation watchers): no one's identity, credentials or request id; under load one can land
    while the browser works."""
    return (
        rec.method == "GET"
        and rec.raw_path == "/queue"
        and not any(
            h in rec.headers for h in ("Comfy-User", "Authorization", "Cookie", "X-Request-ID")
        )
    )


def is_public_fetch(rec: Received) -> bool:
    """A fetch of one of the frontend's public files (``proxy.web.assets``) without identity."""
    return (
        rec.method in ("GET", "HEAD")
        and PUBLIC_ASSET.fullmatch(rec.raw_path) is not None
        and "Comfy-User" not in rec.headers
    )


def assert_reached_as(upstream: FakeUpstream, proxy: ProxyServer, subject: str) -> None:
    """Everything the fake received came as ``subject``: ``Comfy-User`` derived from it by the
    proxy, and none of the proxy's own cookies (session, login CSRF).

    The invariant, made explicit: every *relayed* request carries exactly the signed-in user's
    ``Comfy-User``. The cached catalog is the one designed exception: its upstream fetch is
    either the request of the client that found the cache empty (then it carries that client's
    ``Comfy-User``: here, ``subject``'s) or the proxy's own background refresh, which carries
    no identity at all (the unfiltered copy an admin would get; ComfyUI's catalog does not
    depend on the user, and each principal's copy is filtered from it by the proxy). Never
    another user's identity, never credentials or cookies.
    """
    assert upstream.fake.received, "nothing reached the fake"
    expected = comfy_user_id(subject)
    # The proxy's own check of whether ComfyUI runs with --multi-user (proxy.userdata.mode) is
    # the other request of no one's: GET /users without identity, credentials or request id.
    received = [r for r in upstream.fake.received if not is_user_mode_check(r)]
    # So are its background reads of the queue (is_background_queue_read).
    received = [r for r in received if not is_background_queue_read(r)]
    # The frontend's bundled files fetched without cookies (the web app manifest) are public
    # (proxy.web.assets) and reach ComfyUI with no identity at all - never another user's.
    received = [r for r in received if not is_public_fetch(r)]
    relayed = [r for r in received if not is_catalog_fetch(r.method, r.path)]
    catalog = [r for r in received if is_catalog_fetch(r.method, r.path)]
    strangers = [
        (r.method, r.raw_path, r.headers.get("Comfy-User"))
        for r in relayed
        if r.headers.getall("Comfy-User", []) != [expected]
    ]
    assert not strangers, f"requests not as Comfy-User {expected}: {strangers}"
    # SECURITY: a catalog fetch is this user's own (the miss) or the proxy's (no identity).
    wrong_catalog = [
        (r.method, r.raw_path, r.headers.getall("Comfy-User", []))
        for r in catalog
        if r.headers.getall("Comfy-User", []) not in ([expected], [])
        or "Authorization" in r.headers
    ]
    assert not wrong_catalog, f"catalog fetched as someone else: {wrong_catalog}"
    leaked = [
        (r.method, r.raw_path)
        for r in upstream.fake.received
        if proxy.session_cookie in r.headers.get("Cookie", "")
        or "comfygate_csrf" in r.headers.get("Cookie", "")
    ]
    assert not leaked, f"the proxy's cookies reached ComfyUI: {leaked}"


def upstream_sid(sid: str, username: str = "alice") -> str:
    """The client id ComfyUI sees for the page's ``sid`` (isolation namespaces it per user)."""
    from proxy.principal import comfy_user_id  # noqa: PLC0415
    from proxy.tenancy.namespaces import upstream_client_id  # noqa: PLC0415

    return upstream_client_id(comfy_user_id(username), sid)
