"""Who is signed in, and signing out, from the stock UI (the proxy's account extension), in
headless Chromium; and the frontend's manifest, fetched without cookies, loading.

Sign in on the login page -> the UI shows the user's name and a "Sign out" button in its top bar
(screenshot ``tests/artifacts/signed-in-account.png``) -> clicking it lands on the login page
with the session gone. ``GET /logout`` is a confirmation page whose button signs out.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from playwright.async_api import BrowserContext, Page, expect

from tests.browser.conftest import (
    PASSWORD,
    USERNAME,
    FakeUpstream,
    PageRecorder,
    ProxyServer,
    StartProxy,
)
from tests.browser.frontend import restore_workflow_on_load, wait_for_frontend

pytestmark = pytest.mark.browser


async def sign_in(page: Page, proxy: ProxyServer) -> None:
    """Open the UI, get sent to the login page, sign in with the password."""
    await page.goto(proxy.home)
    await page.get_by_label("Username").fill(USERNAME)
    await page.get_by_label("Password").fill(PASSWORD)
    async with page.expect_navigation(url=proxy.home):
        await page.get_by_role("button", name="Sign in", exact=True).click()


async def has_session(context: BrowserContext, proxy: ProxyServer) -> bool:
    return any(c.get("name") == proxy.session_cookie for c in await context.cookies())


@pytest.mark.parametrize("base_path", ["", "/comfy"], ids=["root", "base_path"])
async def test_ui_shows_the_user_and_signs_out(
    upstream: FakeUpstream,
    start_proxy: StartProxy,
    context: BrowserContext,
    recorder: PageRecorder,
    base_path: str,
) -> None:
    proxy = await start_proxy(server={"base_path": base_path})
    page = recorder.page
    await restore_workflow_on_load(page)  # no "Get started" dialog over the top bar
    await sign_in(page, proxy)
    response = await page.reload()
    assert response is not None
    await wait_for_frontend(recorder, response, f"{base_path}/ws")

    # The extension was listed by the proxy and served by it (ComfyUI never saw its URL).
    script = await recorder.wait_for_response(
        lambda r: urlsplit(r.url).path == f"{base_path}/extensions/comfygate/account.js",
        what="the account extension's script",
    )
    assert script.status == 200
    assert not [r.raw_path for r in upstream.fake.received if "account.js" in r.raw_path]

    # The name and the control, in the top bar.
    account = page.locator("#comfygate-account")
    await expect(account).to_be_visible()
    await expect(account.locator('[data-comfygate="user"]')).to_have_text(USERNAME)
    sign_out = account.locator('[data-comfygate="sign-out"]')
    await expect(sign_out).to_be_visible()
    await expect(sign_out).to_have_text("Sign out")
    if not base_path:
        await recorder.screenshot("signed-in-account.png")

    # The manifest loaded: Chromium fetches it only when asked (install prompt, DevTools),
    # then without cookies; CDP asks as the browser itself would.
    cdp = await context.new_cdp_session(page)
    fetched = await cdp.send("Page.getAppManifest")
    assert not fetched.get("errors"), fetched
    manifest = await recorder.wait_for_response(
        lambda r: (
            re.fullmatch(rf"{base_path}/assets/manifest-[\w-]+\.json", urlsplit(r.url).path)
            is not None
        ),
        what="the web app manifest",
    )
    assert manifest.status == 200, manifest
    assert not [r for r in recorder.responses if r.status == 401], recorder.trouble()

    # Sign out: the login page, the session gone, the UI closed again.
    async with page.expect_navigation(url=re.compile(re.escape(proxy.login_url))):
        await sign_out.click()
    await expect(page.get_by_role("heading", name="Sign in to ComfyUI")).to_be_visible()
    assert not await has_session(context, proxy)
    await page.goto(proxy.home)
    await expect(page.get_by_role("heading", name="Sign in to ComfyUI")).to_be_visible()
    if not base_path:
        await recorder.screenshot("signed-out-login-page.png")


async def test_get_logout_asks_before_signing_out(
    upstream: FakeUpstream,
    start_proxy: StartProxy,
    context: BrowserContext,
    recorder: PageRecorder,
) -> None:
    proxy = await start_proxy()
    page = recorder.page
    await sign_in(page, proxy)

    response = await page.goto(f"{proxy.url}/logout")
    assert response is not None
    assert response.status == 200
    await expect(page.get_by_role("heading", name="Sign out of ComfyUI?")).to_be_visible()
    await expect(page.get_by_text(f"You are signed in as {USERNAME}.")).to_be_visible()
    assert await has_session(context, proxy), "GET /logout must not sign out by itself"
    await recorder.screenshot("logout-confirm.png")

    async with page.expect_navigation(url=proxy.login_url):
        await page.get_by_role("button", name="Sign out").click()
    assert not await has_session(context, proxy)
    response = await page.goto(f"{proxy.url}/logout")
    assert response is not None
    await expect(page.get_by_role("heading", name="You are signed out")).to_be_visible()
    assert not [r for r in upstream.fake.received if "logout" in r.raw_path]
