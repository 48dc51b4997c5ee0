"""While ComfyUI does not answer, a browser navigating to it gets a small retrying page in the
login page's style instead of a raw JSON 502 (issue 15); API calls keep the JSON answer, and a
visitor without a session is still sent to the login page first (it learns nothing)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import ProxyFactory, bearer
from tests.redis_server import free_port

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@pytest.fixture
def down_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


@pytest.mark.parametrize("base_path", ["", "/comfy"])
async def test_navigation_gets_the_retrying_page(
    make_proxy: ProxyFactory, down_url: str, base_path: str
) -> None:
    client: Any = await make_proxy(down_url, token=None, server={"base_path": base_path})
    async with client.get(f"{base_path}/", headers={**HTML, **bearer("alice")}) as resp:
        assert resp.status == 502
        assert resp.content_type == "text/html"
        assert resp.headers["Refresh"] == "5"
        assert resp.headers["Retry-After"] == "5"
        assert resp.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
        body = await resp.text()
    assert '<h1 id="page-title">ComfyUI is not reachable</h1>' in body
    assert "Retrying every 5 seconds" in body
    assert f'href="{base_path}/comfygate/static/login.css"' in body
    assert down_url.rsplit(":", 1)[1] not in body  # nothing about the upstream is shown
    async with client.get(f"{base_path}/comfygate/static/login.css") as css:
        assert css.status == 200  # the page's stylesheet is served while ComfyUI is down


async def test_head_navigation_gets_the_status_alone(
    make_proxy: ProxyFactory, down_url: str
) -> None:
    client: Any = await make_proxy(down_url)
    async with client.head("/", headers=HTML) as resp:
        assert resp.status == 502
        assert resp.headers["Refresh"] == "5"


@pytest.mark.parametrize(
    ("method", "path", "accept"),
    [
        ("GET", "/api/queue", "application/json"),
        ("GET", "/api/queue", "*/*"),
        ("POST", "/api/prompt", "text/html"),  # not a navigation: the API's answer
    ],
)
async def test_api_calls_keep_the_json_answer(
    make_proxy: ProxyFactory, down_url: str, method: str, path: str, accept: str
) -> None:
    client: Any = await make_proxy(down_url)
    # A GET with a body is refused (body_not_allowed): only the POST sends one.
    sent: dict[str, object] | None = {} if method == "POST" else None
    async with client.request(method, path, headers={"Accept": accept}, json=sent) as resp:
        assert resp.status == 502
        assert resp.content_type == "application/json"
        assert "Refresh" not in resp.headers
        body = await resp.json()
    assert body["error"]["type"] == "upstream_unavailable"


async def test_without_a_session_the_login_page_comes_first(
    make_proxy: ProxyFactory, down_url: str
) -> None:
    client: Any = await make_proxy(down_url, token=None)
    async with client.get("/", headers=HTML, allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"].startswith("/login?next=")
