"""Sign in with an OpenID provider (issue 20), against a real provider (``oidc-provider-mock``,
``tests/oidc_provider.py``) and the real proxy app.

The attacker's tools are the ones the flow exposes: callback URLs (their own, a victim's leaked
one, or a victim's with the attacker's code injected), replays, and a provider that returns
tokens it should not (a foreign audience, an expired token, another key). Each refusal must be
the login page with a clear sentence (never a 500), no session cookie, one ``oidc_login_failed``
log line with the reason, and nothing reaching ComfyUI.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs
from yarl import URL

from proxy.auth.oidc import FLOW_COOKIE, NO_SUCH_PROVIDER, NOT_ALLOWED, NOT_VERIFIED, RETRY
from proxy.principal import comfy_user_id
from tests.conftest import ProxyFactory
from tests.fakes.comfyui import FakeComfyUI
from tests.oidc_provider import MockProvider, running_provider

# The provider (a third-party Flask app) uses deprecated authlib APIs: not this suite's concern.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

Client = TestClient[Any, Any]
SESSION = "comfygate_session"
ROLE_MAP = {"comfy-users": "user", "comfy-admins": "admin"}


@pytest.fixture
def provider() -> Iterator[MockProvider]:
    with running_provider() as running:
        yield running


def oidc_section(issuer: str, **extra: Any) -> dict[str, Any]:
    settings = {
        "issuer": issuer,
        "client_id": "comfygate",
        "client_secret": "comfygate-client-secret",
        "role_map": ROLE_MAP,
        **extra,
    }
    return {"oidc": {"providers": {"mock": settings}}}


@pytest.fixture
async def client(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, provider: MockProvider
) -> Client:
    client: Client = await make_proxy(
        fake_comfy.url, token=None, auth=oidc_section(provider.issuer)
    )
    return client


@dataclass
class Flow:
    authorize_url: str
    cookie: str


async def start(client: Client, name: str = "mock", next_path: str = "/") -> Flow:
    """A browser clicking "Sign in with ...": the provider's URL and the flow cookie."""
    client.session.cookie_jar.clear()
    resp = await client.get(
        f"/login/oidc/{name}", params={"next": next_path}, allow_redirects=False
    )
    assert resp.status == 302, await resp.text()
    return Flow(resp.headers["Location"], resp.cookies[FLOW_COOKIE].value)


async def authorize(flow: Flow, sub: str) -> str:
    """The person signing in at the provider as ``sub``: the callback URL it redirects to."""
    async with aiohttp.ClientSession() as http:
        resp = await http.post(flow.authorize_url, data={"sub": sub}, allow_redirects=False)
        assert resp.status == 302, await resp.text()
        return resp.headers["Location"]


async def callback(client: Client, url: str, cookie: str | None) -> aiohttp.ClientResponse:
    """The browser following the provider's redirect, with (or without) a flow cookie."""
    client.session.cookie_jar.clear()
    headers = {"Cookie": f"{FLOW_COOKIE}={cookie}"} if cookie else {}
    return await client.get(URL(url).path_qs, headers=headers, allow_redirects=False)


async def sign_in(client: Client, sub: str) -> aiohttp.ClientResponse:
    flow = await start(client)
    return await callback(client, await authorize(flow, sub), flow.cookie)


def with_state(url: str, state: str) -> str:
    return str(URL(url).update_query(state=state))


async def assert_refused(
    resp: aiohttp.ClientResponse,
    status: int,
    message: str,
    logs: list[MutableMapping[str, Any]],
    reason: str,
) -> None:
    html = await resp.text()
    assert resp.status == status, html
    assert resp.content_type == "text/html"
    assert f'role="alert" id="login-error">{message}</p>' in html
    assert "Sign in with mock" in html or reason == "unknown_provider"  # a way to try again
    assert SESSION not in resp.cookies or not resp.cookies[SESSION].value
    failed = [e for e in logs if e["event"] == "oidc_login_failed"]
    assert [e["reason"] for e in failed] == [reason], logs


# ----------------------------------------------------------------------------- the flow


async def test_sign_in_uses_the_stable_subject_and_role_then_logout_ends_it(
    client: Client, fake_comfy: FakeComfyUI, provider: MockProvider
) -> None:
    flow = await start(client, next_path="/?workflow=1")
    authorize_url = URL(flow.authorize_url)
    assert authorize_url.query["code_challenge_method"] == "S256"
    assert len(authorize_url.query["code_challenge"]) == 43
    assert authorize_url.query["nonce"]
    assert authorize_url.query["state"]
    resp = await callback(client, await authorize(flow, "alice-sub"), flow.cookie)
    assert resp.status == 303, await resp.text()
    assert resp.headers["Location"] == "/?workflow=1"
    session = resp.cookies[SESSION]
    assert session["httponly"]
    assert session["samesite"] == "Lax"
    assert resp.cookies[FLOW_COOKIE].value == ""  # the flow is over

    cookie = {"Cookie": f"{SESSION}={session.value}"}
    ok = await client.get("/api/system_stats", headers=cookie)
    assert ok.status == 200
    subject = f"alice-sub@{provider.issuer}"  # the provider's subject, not the e-mail address
    (seen,) = [r for r in fake_comfy.received if r.raw_path == "/api/system_stats"]
    assert seen.headers["Comfy-User"] == comfy_user_id(subject)
    assert "alice@example.com" not in seen.headers["Comfy-User"]
    whoami = await client.get("/comfygate/whoami", headers=cookie)
    assert whoami.status == 200
    me = await whoami.json()
    assert (me["user"], me["roles"], me["credential"]) == (subject, ["user"], "cookie")

    # Sign-out: the session is revoked, and the browser goes on to the provider's logout.
    with capture_logs() as logs:
        out = await client.post(
            "/logout", headers={**cookie, "Origin": str(client.make_url("")).rstrip("/")},
            allow_redirects=False,
        )  # fmt: skip
    assert out.status == 303
    end = URL(out.headers["Location"])
    assert str(end).startswith(f"{provider.issuer}/oauth2/end_session")
    assert end.query["client_id"] == "comfygate"
    assert end.query["post_logout_redirect_uri"] == str(client.make_url("/login"))
    assert any(e["event"] == "logout" for e in logs)
    reached = len(fake_comfy.received)
    again = await client.get("/api/system_stats", headers=cookie)
    assert again.status == 401
    assert len(fake_comfy.received) == reached


async def test_roles_come_from_the_provider_groups(client: Client, fake_comfy: FakeComfyUI) -> None:
    for sub, roles in (("root-sub", ["admin"]), ("alice-sub", ["user"])):
        resp = await sign_in(client, sub)
        cookie = {"Cookie": f"{SESSION}={resp.cookies[SESSION].value}"}
        me = await (await client.get("/comfygate/whoami", headers=cookie)).json()
        assert me["roles"] == roles
    assert fake_comfy.received == []  # whoami is the proxy's own answer


# ------------------------------------------------------------------------- bad callbacks


async def test_wrong_state_is_refused(client: Client, fake_comfy: FakeComfyUI) -> None:
    flow = await start(client)
    url = await authorize(flow, "alice-sub")
    with capture_logs() as logs:
        resp = await callback(client, with_state(url, "not-the-state"), flow.cookie)
    await assert_refused(resp, 400, RETRY, logs, "state_mismatch")
    assert fake_comfy.received == []


async def test_a_callback_url_sent_to_another_browser_signs_nobody_in(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    # Login CSRF: the attacker completes their own sign-in at the provider and makes the
    # victim's browser open the callback, hoping to sign the victim in as the attacker.
    attacker = await start(client)
    attacker_callback = await authorize(attacker, "bob-sub")
    victim = await start(client)
    with capture_logs() as logs:
        resp = await callback(client, attacker_callback, victim.cookie)
    await assert_refused(resp, 400, RETRY, logs, "state_mismatch")
    with capture_logs() as logs:
        resp = await callback(client, attacker_callback, None)  # a browser with no flow at all
    await assert_refused(resp, 400, RETRY, logs, "flow_missing")
    assert fake_comfy.received == []


async def test_replayed_code_is_refused(client: Client, fake_comfy: FakeComfyUI) -> None:
    flow = await start(client)
    url = await authorize(flow, "alice-sub")
    first = await callback(client, url, flow.cookie)
    assert first.status == 303
    with capture_logs() as logs:
        replay = await callback(client, url, flow.cookie)  # the same URL and cookie, again
    await assert_refused(replay, 400, RETRY, logs, "flow_replayed")
    assert fake_comfy.received == []


async def test_injected_code_from_another_flow_fails_the_nonce(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    # The attacker's code, under the victim's own state and cookie: the provider (which does
    # not enforce PKCE) hands out the attacker's ID token, whose nonce is the attacker's flow's.
    attacker = await start(client)
    attacker_code = URL(await authorize(attacker, "bob-sub")).query["code"]
    victim = await start(client)
    victim_url = URL(await authorize(victim, "alice-sub"))
    injected = str(victim_url.update_query(code=attacker_code))
    with capture_logs() as logs:
        resp = await callback(client, injected, victim.cookie)
    await assert_refused(resp, 401, NOT_VERIFIED, logs, "nonce_mismatch")
    assert fake_comfy.received == []


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}, "id_token_expired"),
        ({"aud": "another-app"}, "id_token_wrong_audience"),
        ({"aud": ["comfygate", "another-app"], "azp": "another-app"}, "id_token_wrong_audience"),
        ({"iss": "https://evil.example"}, "id_token_wrong_issuer"),
        ({"nonce": "a-nonce-from-elsewhere"}, "nonce_mismatch"),
        ({"nonce": None}, "nonce_mismatch"),
    ],
    ids=["expired", "foreign_audience", "azp_other", "issuer", "nonce", "no_nonce"],
)
async def test_id_tokens_that_do_not_verify_are_refused(
    client: Client,
    fake_comfy: FakeComfyUI,
    provider: MockProvider,
    tamper: dict[str, Any],
    reason: str,
) -> None:
    flow = await start(client)
    url = await authorize(flow, "alice-sub")
    provider.tamper = tamper
    with capture_logs() as logs:
        resp = await callback(client, url, flow.cookie)
    await assert_refused(resp, 401, NOT_VERIFIED, logs, reason)
    assert provider.tokens_issued == 1
    assert fake_comfy.received == []


async def test_id_token_signed_with_an_unpublished_key_is_refused(
    client: Client, fake_comfy: FakeComfyUI, provider: MockProvider
) -> None:
    flow = await start(client)
    url = await authorize(flow, "alice-sub")
    provider.foreign_key = True
    with capture_logs() as logs:
        resp = await callback(client, url, flow.cookie)
    await assert_refused(resp, 401, NOT_VERIFIED, logs, "id_token_bad_signature")
    assert fake_comfy.received == []


async def test_unknown_provider(client: Client, fake_comfy: FakeComfyUI) -> None:
    for path in ("/login/oidc/nope", "/login/oidc/nope/callback?code=x&state=y"):
        with capture_logs() as logs:
            resp = await client.get(path, allow_redirects=False)
        await assert_refused(resp, 404, NO_SUCH_PROVIDER, logs, "unknown_provider")
    assert fake_comfy.received == []


async def test_provider_refusing_the_person(client: Client, fake_comfy: FakeComfyUI) -> None:
    flow = await start(client)
    async with aiohttp.ClientSession() as http:
        resp = await http.post(flow.authorize_url, data={"action": "deny"}, allow_redirects=False)
        denied = resp.headers["Location"]
    with capture_logs() as logs:
        resp = await callback(client, denied, flow.cookie)
    await assert_refused(
        resp, 401, "Sign in with mock did not sign you in. Please try again.", logs,
        "provider_error:access_denied",
    )  # fmt: skip
    assert fake_comfy.received == []


# ---------------------------------------------------------------------------- allowlists


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"allowed_groups": ["comfy-users", "comfy-admins"]}, "not_in_allowed_groups"),
        ({"allowed_email_domains": ["example.com"]}, "email_domain_not_allowed"),
        ({"role_map": {}}, "no_role"),
    ],
    ids=["groups", "email_domain", "no_role"],
)
async def test_people_outside_the_allowlists_are_refused(
    make_proxy: ProxyFactory,
    fake_comfy: FakeComfyUI,
    provider: MockProvider,
    extra: dict[str, Any],
    reason: str,
) -> None:
    client: Client = await make_proxy(
        fake_comfy.url, token=None, auth=oidc_section(provider.issuer, **extra)
    )
    with capture_logs() as logs:
        resp = await sign_in(client, "bob-sub")  # groups ["other-team"], @elsewhere.org
    await assert_refused(resp, 403, NOT_ALLOWED, logs, reason)
    if reason != "no_role":  # alice is in the group and the domain
        assert (await sign_in(client, "alice-sub")).status == 303
    assert fake_comfy.received == []


async def test_provider_down_gives_a_page_not_a_500(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client: Client = await make_proxy(
        fake_comfy.url, token=None, auth=oidc_section(f"http://127.0.0.1:{port}")
    )
    with capture_logs() as logs:
        resp = await client.get("/login/oidc/mock", allow_redirects=False)
    await assert_refused(
        resp, 503, "mock cannot be reached right now. Please try again shortly.", logs,
        "provider_unavailable",
    )  # fmt: skip
    assert resp.headers["Retry-After"] == "10"
    assert any(e["event"] == "oidc_provider_unavailable" for e in logs)
    assert fake_comfy.received == []


async def test_login_page_offers_each_provider(client: Client) -> None:
    resp = await client.get("/login", params={"next": "/?a=1"})
    html = await resp.text()
    assert '<a class="button" href="/login/oidc/mock?next=/?a%3D1">Sign in with mock</a>' in html
