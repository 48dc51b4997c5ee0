"""HTTP forwarding against the fake ComfyUI: paths, headers, origin rules, files, ids, base path."""

from __future__ import annotations

import io
from typing import Any

import aiohttp
import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient
from PIL import Image
from prometheus_client import generate_latest
from structlog.testing import capture_logs
from yarl import URL

from proxy.auth.authenticator import AUTH
from proxy.observability.metrics import METRICS
from tests.conftest import ProxyFactory, make_token
from tests.fakes.comfyui import FakeComfyUI

EMPTY_SAVE = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
    },
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}},
}


def png_bytes(size: int = 32) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (size, size), (10, 20, 30, 255)).save(out, format="PNG")
    return out.getvalue()


def proxy_origin(client: TestClient[Any, Any]) -> str:
    return f"http://{client.server.host}:{client.server.port}"


def raw_url(client: TestClient[Any, Any], raw: str) -> URL:
    """A URL the client library sends exactly as written (no requoting, no dot removal)."""
    return URL(proxy_origin(client) + raw, encoded=True)


@pytest.mark.parametrize(
    ("raw", "forwarded"),
    [
        ("/api/%68istory?max_items=1", "/api/history?max_items=1"),
        ("/api/userdata/workflows%2Fmy%20flow.json", "/api/userdata/workflows%2Fmy%20flow.json"),
        # User data paths go in the proxy's canonical encoding (tests/security/test_userdata.py),
        # which this one already is.
        ("/userdata/workflows%2Fa%2Bb.json", "/userdata/workflows%2Fa%2Bb.json"),
        (
            "/api/view?filename=a%2Fb.png&subfolder=x%2F..&type=output",
            "/api/view?filename=a/b.png&subfolder=x/..&type=output",
        ),
        ("/api/history?max_items=1&offset=-1&x=%ZZ", "/api/history?max_items=1&offset=-1&x=%25ZZ"),
        ("//api//api/history?a+b=c%2Bd", "/api/history?a%20b=c%2Bd"),
    ],
)
async def test_paths_and_queries_are_forwarded_in_the_proxys_encoding(
    raw: str, forwarded: str, proxy: TestClient[Any, Any], fake_comfy: FakeComfyUI
) -> None:
    """ComfyUI gets the proxy's serialisation of what it decided on, which reads the same."""
    await proxy.session.get(raw_url(proxy, raw))
    got = fake_comfy.received[-1]
    assert got.raw_path == forwarded
    assert list(got.query.items()) == list(URL(raw, encoded=True).query.items())


async def test_browser_post_passes_comfyui_origin_check(
    proxy: TestClient[Any, Any], fake_comfy: FakeComfyUI
) -> None:
    headers = {"Origin": proxy_origin(proxy), "Sec-Fetch-Site": "cross-site"}
    resp = await proxy.post("/api/prompt", json={"prompt": EMPTY_SAVE}, headers=headers)
    assert resp.status == 200, await resp.text()
    got = fake_comfy.received[-1]
    assert got.headers["Host"] == fake_comfy.url.removeprefix("http://")
    assert got.headers["Origin"] == fake_comfy.url
    assert not any(h.lower().startswith("sec-fetch-") for h in got.headers)
    # The same request straight to ComfyUI is refused: the check is live in the fake.
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{fake_comfy.url}/api/prompt", json={"prompt": EMPTY_SAVE}, headers=headers
        ) as direct,
    ):
        assert direct.status == 403


@pytest.mark.parametrize(
    "origin", ["http://evil.example", "http://localhost:1", "https://127.0.0.1", "garbage"]
)
async def test_foreign_origin_refused_before_upstream(
    origin: str, make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    """With the credential a browser attaches by itself (the session cookie); bearer tokens are
    not refused for their Origin (tests/security/test_clients.py)."""
    proxy = await make_proxy(fake_comfy.url, token=None)
    value, _ = proxy.app[AUTH].sessions.issue("admin", ["admin"], source="token")
    headers = {"Origin": origin, "Cookie": f"comfygate_session={value}"}
    resp = await proxy.post("/api/prompt", json={"prompt": EMPTY_SAVE}, headers=headers)
    assert resp.status == 403
    body = await resp.json()
    assert body["error"]["type"] == "origin_not_allowed"
    assert body["node_errors"] == {}
    assert fake_comfy.received == []
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await proxy.ws_connect("/ws?clientId=x", headers=headers)
    assert info.value.status == 403
    assert fake_comfy.received == []


async def test_allowed_origins_and_public_url(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    proxy = await make_proxy(
        fake_comfy.url,
        server={"allowed_origins": ("https://studio.example",), "public_url": "https://c.example"},
    )
    for origin in ("https://studio.example", "https://c.example", "https://c.example:443", "null"):
        resp = await proxy.get("/api/queue", headers={"Origin": origin})
        assert resp.status == 200, origin


async def test_upload_then_view_with_range_and_etag(
    proxy: TestClient[Any, Any], fake_comfy: FakeComfyUI
) -> None:
    image = png_bytes()
    form = FormData()
    form.add_field("image", image, filename="up.png", content_type="image/png")
    form.add_field("overwrite", "true")
    resp = await proxy.post("/api/upload/image", data=form)
    assert resp.status == 200
    assert await resp.json() == {"name": "up.png", "subfolder": "", "type": "input"}

    resp = await proxy.get("/api/view?filename=up.png&type=input")
    assert resp.status == 200
    assert await resp.read() == image
    assert resp.headers["Content-Type"] == "image/png"
    assert "up.png" in resp.headers["Content-Disposition"]

    ranged = await proxy.get("/view?filename=up.png&type=input", headers={"Range": "bytes=0-15"})
    assert ranged.status == 206
    assert await ranged.read() == image[:16]
    assert ranged.headers["Content-Range"] == f"bytes 0-15/{len(image)}"

    etag = resp.headers.get("ETag")
    if etag:
        cached = await proxy.get(
            "/view?filename=up.png&type=input", headers={"If-None-Match": etag}
        )
        assert cached.status == 304


async def test_upstream_errors_pass_through(proxy: TestClient[Any, Any]) -> None:
    resp = await proxy.get("/api/view?filename=../etc/passwd")
    assert resp.status == 400
    resp = await proxy.get("/api/view?filename=x.png&subfolder=../..&type=output")
    assert resp.status == 403
    # A well-formed prompt ComfyUI refuses (an admin's unknown node type): its answer.
    unknown = {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}
    resp = await proxy.post("/api/prompt", json=unknown)
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["type"] == "invalid_prompt"
    assert "NoSuchNode does not exist" in body["error"]["message"]


async def test_request_id_minted_accepted_and_forwarded(
    proxy: TestClient[Any, Any], fake_comfy: FakeComfyUI
) -> None:
    resp = await proxy.get("/api/queue")
    minted = resp.headers["X-Request-ID"]
    assert len(minted) == 32
    assert fake_comfy.received[-1].headers["X-Request-ID"] == minted
    resp = await proxy.get("/api/queue", headers={"X-Request-ID": "trace-abc.123"})
    assert resp.headers["X-Request-ID"] == "trace-abc.123"
    assert fake_comfy.received[-1].headers["X-Request-ID"] == "trace-abc.123"
    resp = await proxy.get("/api/queue", headers={"X-Request-ID": "bad id\twith junk"})
    assert resp.headers["X-Request-ID"] != "bad id\twith junk"


async def test_forwarded_headers(proxy: TestClient[Any, Any], fake_comfy: FakeComfyUI) -> None:
    await proxy.get("/api/queue", headers={"X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.6"})
    got = fake_comfy.received[-1].headers
    assert got["X-Forwarded-For"] == "127.0.0.1"  # the test client is not a trusted proxy
    assert got["X-Forwarded-Proto"] == "http"
    assert got["X-Forwarded-Host"] == f"{proxy.server.host}:{proxy.server.port}"
    assert "X-Real-IP" not in got


async def test_dot_segments_refused(proxy: TestClient[Any, Any], fake_comfy: FakeComfyUI) -> None:
    resp = await proxy.session.get(raw_url(proxy, "/api/%2e%2e/internal/logs"))
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "bad_path"
    assert fake_comfy.received == []


async def test_base_path(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> None:
    proxy = await make_proxy(fake_comfy.url, server={"base_path": "/comfy"})
    resp = await proxy.get("/comfy?x=1", allow_redirects=False)
    assert resp.status == 308
    assert resp.headers["Location"] == "/comfy/?x=1"
    resp = await proxy.get("/comfy/api/system_stats")
    assert resp.status == 200
    assert fake_comfy.received[-1].raw_path == "/api/system_stats"
    resp = await proxy.get("/api/system_stats")
    assert resp.status == 404
    assert (await resp.json())["error"]["type"] == "not_found"
    resp = await proxy.get("/comfyother/api/system_stats")
    assert resp.status == 404
    assert (await proxy.get("/healthz")).status == 200


async def test_health_and_readiness(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> None:
    proxy = await make_proxy(fake_comfy.url)
    resp = await proxy.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["upstreams"] == {fake_comfy.url.removeprefix("http://"): "up"}
    assert (await proxy.get("/healthz")).status == 200
    dead = await make_proxy("http://127.0.0.1:9")
    assert (await dead.get("/readyz")).status == 503
    assert (await dead.get("/healthz")).status == 200  # liveness never depends on ComfyUI


async def test_one_canonical_log_line_without_secrets(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    token = make_token("alice", ("user",))
    proxy = await make_proxy(fake_comfy.url, token=token)
    with capture_logs() as logs:
        await proxy.get(
            "/api/view?filename=secret.png&token=abc",
            headers={"Cookie": "session=s3cr3t"},
        )
    lines = [e for e in logs if e["event"] == "request_finished"]
    assert len(lines) == 1
    line = lines[0]
    assert line["rule"] == "view"
    assert line["status"] == 404
    assert line["path"] == "/api/view"
    for key in ("request_id", "method", "upstream", "duration_ms", "upstream_ms", "proxy_ms"):
        assert key in line
    text = repr(logs)
    for secret in ("abc", token, token.split(".")[2], "s3cr3t", "secret.png"):
        assert secret not in text


async def test_metrics_count_requests(proxy: TestClient[Any, Any]) -> None:
    await proxy.get("/api/queue")
    await proxy.get("/queue")
    exposition = generate_latest(proxy.app[METRICS].registry).decode()
    assert 'comfygate_http_requests_total{method="GET",rule="queue",status="200"} 2.0' in exposition


async def test_readiness_follows_a_configured_redis(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str
) -> None:
    proxy = await make_proxy(fake_comfy.url, redis={"url": redis_url})
    resp = await proxy.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["redis"] == "up"
    down = await make_proxy(fake_comfy.url, redis={"url": "redis://127.0.0.1:9/0"})
    resp = await down.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["redis"] == "down"
