"""No SSRF through comfygate's webhooks: destinations outside the allowlist, or resolving to
loopback, private, link-local (cloud metadata) or other non-global addresses, are refused at
submit (422 ``webhook_refused``, nothing queued on ComfyUI); the address checked is the one
connected to (a DNS answer that changes later cannot redirect the attempt)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from yarl import URL

from proxy.jobs.leases import MemoryDueSet
from proxy.jobs.metrics import JobMetrics
from proxy.jobs.webhooks.delivery import Dispatcher
from proxy.jobs.webhooks.destinations import Destinations, WebhookRefused
from proxy.jobs.webhooks.outbox import Message, Outbox
from proxy.settings.jobs import WebhookSettings
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.jobs.support import V1, Client, jobs_proxy, prompts_received
from tests.jobs.webhook_receiver import SECRET, Receiver, webhook_settings

B = bearer("bob")
TEXT = {"template": "text-to-image", "params": {"prompt": "x"}}
OPEN_HOSTS = ["127.0.0.1", "localhost", "10.0.0.1", "169.254.169.254", "::1", "[::1]"]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    await server.stop()


async def _proxy(make_proxy: ProxyFactory, fake: FakeComfyUI, **hooks: Any) -> Client:
    settings = webhook_settings(**{"allowed_urls": OPEN_HOSTS, "allow_networks": [], **hooks})
    return await jobs_proxy(make_proxy, fake, None, jobs={"webhooks": settings})


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",  # loopback
        "http://localhost:9/hook",  # a name that resolves to loopback
        "http://10.0.0.1/hook",  # private
        "http://169.254.169.254/latest/meta-data/",  # the cloud metadata service
        "http://[::1]/hook",  # IPv6 loopback
        "http://[::ffff:127.0.0.1]/hook",  # IPv4-mapped loopback
        "http://example.org/hook",  # not in the allowlist
        "ftp://127.0.0.1/hook",  # not http(s)
        "http://user:pw@127.0.0.1/hook",  # credentials
    ],
)
async def test_b_cannot_aim_webhooks_at_internal_addresses(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, url: str
) -> None:
    client = await _proxy(make_proxy, fake_comfy)
    resp = await client.post(f"{V1}/jobs", json={**TEXT, "webhook": {"url": url}}, headers=B)
    body = await resp.json()
    assert resp.status == 422, body
    assert body["error"]["type"] == "webhook_refused"
    assert prompts_received(fake_comfy) == []  # refused before anything was queued


async def test_http_refused_unless_allowed(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, receiver: Receiver
) -> None:
    client = await _proxy(make_proxy, fake_comfy, allow_http=False, allow_networks=["127.0.0.0/8"])
    resp = await client.post(
        f"{V1}/jobs", json={**TEXT, "webhook": {"url": receiver.url()}}, headers=B
    )
    assert resp.status == 422
    assert (await resp.json())["error"]["type"] == "webhook_refused"
    assert prompts_received(fake_comfy) == []


async def test_webhooks_refused_without_a_secret(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, receiver: Receiver
) -> None:
    client = await _proxy(make_proxy, fake_comfy, secret="", allow_networks=["127.0.0.0/8"])
    resp = await client.post(
        f"{V1}/jobs", json={**TEXT, "webhook": {"url": receiver.url()}}, headers=B
    )
    assert resp.status == 422
    assert prompts_received(fake_comfy) == []


async def test_malformed_webhook_member_is_400(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await _proxy(make_proxy, fake_comfy)
    for bad in ("http://x", {"url": "http://x", "secret": "mine"}, {"href": "x"}):
        resp = await client.post(f"{V1}/jobs", json={**TEXT, "webhook": bad}, headers=B)
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_job"
    assert prompts_received(fake_comfy) == []


def _settings(**overrides: Any) -> WebhookSettings:
    return WebhookSettings.model_validate(
        {"secret": SECRET, "allowed_urls": ["hooks.test", "*.example.com"], **overrides}
    )


async def test_every_resolved_address_is_checked() -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "127.0.0.1"]  # one public, one loopback

    with pytest.raises(WebhookRefused):
        await Destinations(_settings(), resolve).resolve(URL("https://hooks.test/x"))


@pytest.mark.parametrize(
    "url",
    ["https://evilexample.com/", "https://example.com.evil.org/", "https://hooks.test.evil/"],
)
def test_allowlist_patterns_do_not_match_lookalikes(url: str) -> None:
    with pytest.raises(WebhookRefused):
        Destinations(_settings()).check_url(url)


async def test_the_checked_address_is_the_one_connected_to(receiver: Receiver) -> None:
    """``hooks.test`` exists in no DNS: the attempt reaches the receiver only because the
    connector is pinned to the address the check resolved (and no second lookup happens)."""
    answers = iter([["127.0.0.1"]])

    async def resolve(host: str, port: int) -> list[str]:
        return next(answers)  # a second resolution would raise StopIteration

    settings = _settings(allow_http=True, allow_networks=["127.0.0.0/8"])
    outbox = Outbox(MemoryDueSet(), marker_ttl=60)
    dispatcher = Dispatcher(
        settings, outbox, Destinations(settings, resolve), JobMetrics(CollectorRegistry())
    )
    message = Message("msg_1", "job", f"http://hooks.test:{receiver.port}/hook", "{}", 0.0)
    assert await outbox.enqueue_once(message, 0.0)
    [(claimed, token)] = await outbox.claim(1.0, 10, 1)
    await dispatcher.attempt(claimed, token)
    [hit] = receiver.received
    assert hit.headers["Host"] == f"hooks.test:{receiver.port}"
    hit.verified()
