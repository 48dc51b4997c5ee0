"""A ComfyUI that is down, seen in headless Chromium (issue 15): a signed-in user opening the UI
gets the "ComfyUI is not reachable, retrying" page in the login page's style, which reloads
itself and becomes the stock UI once ComfyUI answers. Screenshots of the login page and of that
page are left in ``tests/artifacts/`` for a person to look at."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from playwright.async_api import Browser, BrowserContext, expect
from prometheus_client import CollectorRegistry

from proxy.app import create_app
from proxy.web.unreachable import RETRY_SECONDS
from tests.browser.conftest import EVENT_TIMEOUT_S, LOCAL_HOST, PageRecorder, ProxyServer
from tests.browser.frontend import wait_for_frontend
from tests.conftest import make_settings
from tests.fakes.comfyui import FakeComfyUI
from tests.redis_server import free_port

pytestmark = pytest.mark.browser

RELOAD_TIMEOUT_MS = (RETRY_SECONDS + EVENT_TIMEOUT_S) * 1000


@pytest.fixture
def fake(tmp_path: Path) -> FakeComfyUI:
    """A fake ComfyUI serving the stock frontend, not started yet (ComfyUI is down)."""
    return FakeComfyUI(root=tmp_path / "comfyui", frontend=True)


@pytest.fixture
async def comfy_port(fake: FakeComfyUI) -> AsyncIterator[int]:
    """The port ComfyUI will listen on once started; stopped at the end if it was."""
    yield free_port()
    await fake.stop()


@pytest.fixture
async def proxy(comfy_port: int, users_file: Path) -> AsyncIterator[ProxyServer]:
    settings = make_settings(
        f"http://{LOCAL_HOST}:{comfy_port}", auth={"login": {"users_file": str(users_file)}}
    )
    app = create_app(settings, registry=CollectorRegistry())
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, LOCAL_HOST, 0)
    await site.start()
    yield ProxyServer(f"http://{LOCAL_HOST}:{runner.addresses[0][1]}", app)
    await runner.cleanup()


@pytest.fixture
async def page_context(browser: Browser, proxy: ProxyServer) -> AsyncIterator[BrowserContext]:
    ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
    yield ctx
    await ctx.close()


async def test_login_page_and_comfyui_down_page(
    page_context: BrowserContext, proxy: ProxyServer, fake: FakeComfyUI, comfy_port: int
) -> None:
    page = await page_context.new_page()
    recorder = PageRecorder(page)
    await recorder.install()

    # The login page, as a person first sees it.
    response = await page.goto(proxy.login_url)
    assert response is not None
    assert response.status == 200
    await expect(page.get_by_role("heading", name="Sign in to ComfyUI")).to_be_visible()
    await recorder.screenshot("login-page.png")

    # Signed in, while ComfyUI is down: the retrying page, not JSON.
    await proxy.sign_in(page_context)
    response = await page.goto(proxy.home)
    assert response is not None
    assert response.status == 502
    assert response.headers["content-type"].startswith("text/html")
    await expect(page.get_by_role("heading", name="ComfyUI is not reachable")).to_be_visible()
    await expect(page.get_by_role("status")).to_contain_text(
        f"Retrying every {RETRY_SECONDS} seconds"
    )
    await expect(page.get_by_role("link", name="Retry now")).to_be_visible()
    # Styled like the login page: its stylesheet loaded (the card on the dark background).
    card = page.locator("main.card")
    await expect(card).to_have_css("background-color", "rgb(53, 53, 53)")
    await recorder.screenshot("comfyui-down.png")

    # ComfyUI comes up: the page reloads itself into the stock UI.
    async with page.expect_response(
        lambda r: r.url == proxy.home and r.status == 200, timeout=RELOAD_TIMEOUT_MS
    ) as reloaded:
        await fake.start(port=comfy_port)
    loaded = await wait_for_frontend(recorder, await reloaded.value, "/ws")
    assert loaded.sid
