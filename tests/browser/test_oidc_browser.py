"""Signing in through a real OpenID provider, in headless Chromium, as a person would (issue 20).

Open the UI without a session -> the login page, with a "Sign in with Mock IdP" button; click it
-> the provider's own page (``oidc-provider-mock``, ``tests/oidc_provider.py``); pick the user
-> back in the stock frontend, its WebSocket open, a prompt queued from the Run button reaching
ComfyUI as the provider's subject with the role from the provider's groups; sign out -> the
provider's end-session page, then the login page, and the UI is closed again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from playwright.async_api import BrowserContext, expect

from proxy.principal import comfy_user_id
from tests.browser.conftest import FakeUpstream, PageRecorder, StartProxy
from tests.browser.frontend import (
    assert_reached_as,
    queue_prompt_from_ui,
    restore_workflow_on_load,
    upstream_sid,
    wait_for_frontend,
)
from tests.browser.test_login_browser import SUBMIT_POST_FORM, assert_redirected_to_login
from tests.oidc_provider import MockProvider, running_provider

pytestmark = [
    pytest.mark.browser,
    # The provider (a third-party Flask app) uses deprecated authlib APIs.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture
def provider() -> Iterator[MockProvider]:
    with running_provider() as running:
        yield running


async def test_sign_in_with_the_provider_then_comfyui_then_logout(
    upstream: FakeUpstream,
    start_proxy: StartProxy,
    context: BrowserContext,
    recorder: PageRecorder,
    provider: MockProvider,
) -> None:
    proxy = await start_proxy(
        auth={
            "oidc": {
                "providers": {
                    "mock": {
                        "issuer": provider.issuer,
                        "client_id": "comfygate",
                        "client_secret": "comfygate-client-secret",
                        "label": "Sign in with Mock IdP",
                        "role_map": {"comfy-users": "user"},
                    }
                }
            }
        }
    )
    page = recorder.page
    await restore_workflow_on_load(page)

    # 1. No session: the login page, offering the provider next to the password form.
    response = await page.goto(proxy.home)
    await assert_redirected_to_login(response, page, proxy)
    button = page.get_by_role("link", name="Sign in with Mock IdP")
    await expect(button).to_be_visible()
    await recorder.screenshot("login-page-oidc.png")

    # 2. The provider's own page, then back to the UI with a session.
    await button.click()
    await page.wait_for_url(f"{provider.issuer}/oauth2/authorize?**")
    async with page.expect_navigation(url=proxy.home) as navigation:
        await page.get_by_role("button", name="alice-sub").click()
    landed = await navigation.value
    assert landed is not None
    loaded = await wait_for_frontend(recorder, landed, "/ws")
    assert loaded.response.status == 200
    subject = f"alice-sub@{provider.issuer}"
    cookies = [c for c in await context.cookies() if c.get("name") == proxy.session_cookie]
    assert len(cookies) == 1
    assert cookies[0].get("httpOnly") is True
    assert not [c for c in await context.cookies() if c.get("name") == "comfygate_oidc"]

    # 3. The session works on /ws and for a prompt queued from the UI, as the provider's subject.
    ran = await queue_prompt_from_ui(recorder, loaded, "")
    await upstream.fake.wait_idle()
    posts = [r for r in upstream.fake.received if (r.method, r.raw_path) == ("POST", "/api/prompt")]
    assert len(posts) == 1, posts
    assert posts[0].headers["Comfy-User"] == comfy_user_id(subject)
    assert json.loads(posts[0].body)["client_id"] == upstream_sid(loaded.sid, subject)
    assert ran.response.status == 200
    assert_reached_as(upstream, proxy, subject)
    assert any(urlsplit(r.raw_path).path == "/ws" for r in upstream.fake.received)

    # 4. Sign out: the provider's end-session page, then the login page; the UI is closed.
    await page.evaluate(SUBMIT_POST_FORM, "/logout")
    await page.wait_for_url(f"{provider.issuer}/oauth2/end_session?**")
    await page.get_by_role("button", name="End session").click()
    await page.wait_for_url(proxy.login_url)
    assert not [c for c in await context.cookies() if c.get("name") == proxy.session_cookie]
    await upstream.fake.wait_idle()
    reached = len(upstream.fake.received)
    response = await page.goto(proxy.home)
    await assert_redirected_to_login(response, page, proxy)
    # A copy of the old cookie is dead too: the session was revoked, not only forgotten.
    await proxy.put_session_cookie(context, str(cookies[0].get("value")))
    response = await page.goto(proxy.home)
    await assert_redirected_to_login(response, page, proxy)
    assert len(upstream.fake.received) == reached
