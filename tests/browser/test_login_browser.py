"""Signing in to ComfyUI through the proxy's login page, in headless Chromium, as a user would.

Open the UI without a session -> the login page (``next`` = where the user was going); a wrong
password -> the one generic message, still on the login page; the right one -> back at ``next``
with the stock frontend loaded, its WebSocket open, and a prompt queued from the Run button that
reaches ComfyUI as the signed-in user; sign out -> the login page, and the UI is closed again.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.async_api import BrowserContext, Cookie, Page, Response, expect

from proxy.auth.login import GENERIC_FAILURE
from proxy.principal import comfy_user_id
from tests.browser.conftest import (
    PASSWORD,
    USERNAME,
    FakeUpstream,
    PageRecorder,
    ProxyServer,
    StartProxy,
)
from tests.browser.frontend import (
    assert_reached_as,
    queue_prompt_from_ui,
    restore_workflow_on_load,
    upstream_sid,
    wait_for_frontend,
)

pytestmark = pytest.mark.browser

# Submits a POST form to the given URL from the current page: what a "Sign out" item in the
# UI would do. A form POST carries the page's Origin, which the proxy's logout accepts.
SUBMIT_POST_FORM = """(action) => {
    const form = document.createElement('form');
    form.method = 'post';
    form.action = action;
    document.body.append(form);
    form.submit();
}"""


def assert_sent_to_login(page: Page, proxy: ProxyServer, next_path: str) -> None:
    """The page is the login page, asked to come back to ``next_path`` afterwards."""
    parts = urlsplit(page.url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == proxy.login_url, page.url
    assert parse_qs(parts.query).get("next") == [next_path], page.url


async def assert_redirected_to_login(
    response: Response | None, page: Page, proxy: ProxyServer
) -> None:
    """``response`` (a navigation to the UI) ended on the login page after the proxy's 302."""
    assert response is not None
    assert response.status == 200, response
    redirect = response.request.redirected_from
    assert redirect is not None, "the UI was served without a session"
    assert redirect.url == proxy.home
    first = await redirect.response()
    assert first is not None
    assert first.status == 302, first
    assert_sent_to_login(page, proxy, f"{proxy.base_path}/")
    await expect(page.get_by_role("heading", name="Sign in to ComfyUI")).to_be_visible()
    await expect(page.get_by_label("Username")).to_be_visible()


async def submit_credentials(page: Page, username: str, password: str) -> Response:
    """Fill the login form and press "Sign in"; the answer to the form's POST."""
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password").fill(password)
    async with page.expect_response(
        lambda r: r.request.method == "POST" and urlsplit(r.url).path.endswith("/login")
    ) as posted:
        await page.get_by_role("button", name="Sign in", exact=True).click()
    return await posted.value


async def session_cookies(context: BrowserContext, proxy: ProxyServer) -> list[Cookie]:
    return [c for c in await context.cookies() if c.get("name") == proxy.session_cookie]


@pytest.mark.parametrize("base_path", ["", "/comfy"], ids=["root", "base_path"])
async def test_login_then_comfyui_then_logout(
    upstream: FakeUpstream,
    start_proxy: StartProxy,
    context: BrowserContext,
    recorder: PageRecorder,
    base_path: str,
) -> None:
    proxy = await start_proxy(server={"base_path": base_path})
    page = recorder.page
    await restore_workflow_on_load(page)

    # 1. No session: the UI is not served, the browser is sent to the login page.
    response = await page.goto(proxy.home)
    await assert_redirected_to_login(response, page, proxy)
    assert upstream.fake.received == [], "ComfyUI was reached without a session"
    await expect(page.get_by_label("Username")).to_be_focused()  # autofocus
    if not base_path:
        await recorder.screenshot("login-page.png")

    # 2. A wrong password: the generic message, still on the login page, nothing signed in.
    refused = await submit_credentials(page, USERNAME, "not the password")
    assert refused.status == 401, refused
    await expect(page.get_by_role("alert")).to_have_text(GENERIC_FAILURE)
    assert urlsplit(page.url).path == f"{base_path}/login"
    await expect(page.get_by_role("heading", name="Sign in to ComfyUI")).to_be_visible()
    await expect(page.get_by_label("Username")).to_have_value(USERNAME)  # kept for a retry
    await expect(page.get_by_label("Password")).to_have_value("")
    await expect(page.get_by_label("Password")).to_have_attribute("aria-invalid", "true")
    assert await session_cookies(context, proxy) == []
    assert upstream.fake.received == []
    if not base_path:
        await recorder.screenshot("login-page-error.png")

    # 3. The right password: 303 to `next`, where the stock frontend loads with its socket.
    async with page.expect_navigation(url=proxy.home) as navigation:
        accepted = await submit_credentials(page, USERNAME, PASSWORD)
    assert accepted.status == 303, accepted
    assert accepted.headers["location"] == f"{base_path}/"
    landed = await navigation.value
    assert landed is not None
    loaded = await wait_for_frontend(recorder, landed, f"{base_path}/ws")
    assert loaded.response.status == 200
    assert page.url == proxy.home
    assert urlsplit(loaded.socket.url).netloc == urlsplit(proxy.url).netloc

    (cookie,) = await session_cookies(context, proxy)
    assert cookie.get("httpOnly") is True
    assert cookie.get("sameSite") == "Lax"
    assert cookie.get("path") == (base_path or "/")
    assert proxy.session_cookie not in await page.evaluate("() => document.cookie")

    # 4. A prompt queued from the UI reaches ComfyUI as the signed-in user.
    ran = await queue_prompt_from_ui(recorder, loaded, base_path)
    await upstream.fake.wait_idle()
    posts = [r for r in upstream.fake.received if (r.method, r.raw_path) == ("POST", "/api/prompt")]
    assert len(posts) == 1, posts
    assert json.loads(posts[0].body)["client_id"] == upstream_sid(loaded.sid)
    assert posts[0].headers["Comfy-User"] == comfy_user_id(USERNAME)
    assert ran.response.status == 200
    assert_reached_as(upstream, proxy, USERNAME)
    handshakes = [r for r in upstream.fake.received if urlsplit(r.raw_path).path == "/ws"]
    assert handshakes, "the WebSocket never reached ComfyUI"

    # 5. Sign out from the UI's page: back on the login page, the session is gone...
    await page.evaluate(SUBMIT_POST_FORM, f"{base_path}/logout")
    await page.wait_for_url(proxy.login_url)
    await expect(page.get_by_role("heading", name="Sign in to ComfyUI")).to_be_visible()
    assert await session_cookies(context, proxy) == []
    await upstream.fake.wait_idle()
    reached = len(upstream.fake.received)

    # ...opening the UI again sends the browser to the login page again...
    response = await page.goto(proxy.home)
    await assert_redirected_to_login(response, page, proxy)

    # ...and so does a copy of the old cookie: the session was revoked, not only forgotten.
    await proxy.put_session_cookie(context, cookie["value"])
    response = await page.goto(proxy.home)
    await assert_redirected_to_login(response, page, proxy)
    assert len(upstream.fake.received) == reached, upstream.fake.received[reached:]
