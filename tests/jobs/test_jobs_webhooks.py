"""Webhooks end to end: a real receiver verifies every notification with the reference
``standardwebhooks`` library; retries keep the message id; the outbox in Redis survives a
comfygate restart; two replicas on one Redis deliver each message once; redirects are not
followed. Retries are made fast (and jitter-free) by the settings, never waited out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.jobs.api import JOBS
from proxy.jobs.webhooks.delivery import Dispatcher
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.jobs.support import TEMPLATES, V1, Client, jobs_proxy
from tests.jobs.webhook_receiver import Receiver, webhook_settings

A = bearer("alice")
TEXT = {"template": "text-to-image", "params": {"prompt": "a fox", "steps": 2}}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    await server.stop()


async def _proxy(
    make_proxy: ProxyFactory, fake: FakeComfyUI, redis_url: str | None, **hooks: Any
) -> Client:
    jobs = {"watch_seconds": 0.05, "webhooks": webhook_settings(**hooks)}
    return await jobs_proxy(make_proxy, fake, redis_url, jobs=jobs)


def _dispatcher(client: Client) -> Dispatcher:
    dispatcher: Dispatcher | None = client.app[JOBS].watcher.dispatcher
    assert dispatcher is not None
    return dispatcher


async def _submit(client: Client, url: str, body: dict[str, Any] = TEXT) -> str:
    resp = await client.post(f"{V1}/jobs", json={**body, "webhook": {"url": url}}, headers=A)
    job = await resp.json()
    assert resp.status == 202, job
    return str(job["id"])


async def test_signed_notification_with_no_client_waiting(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str, receiver: Receiver
) -> None:
    client = await _proxy(make_proxy, fake_comfy, redis_url)
    job_id = await _submit(client, receiver.url())  # nobody polls: the watcher finds the end
    await receiver.wait_for(lambda: len(receiver.received) == 1)
    [hit] = receiver.received
    payload = hit.verified()
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["id"] == job_id
    assert payload["data"]["status"] == "succeeded"
    assert payload["data"]["outputs"][0]["url"].startswith("/api/view?")
    assert hit.headers["webhook-id"].startswith("msg_")
    assert hit.headers["Content-Type"] == "application/json"


async def test_retries_after_receiver_failures_keep_the_id(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str, receiver: Receiver
) -> None:
    receiver.answers = [500, 500]
    client = await _proxy(make_proxy, fake_comfy, redis_url)
    await _submit(client, receiver.url())
    await receiver.wait_for(lambda: len(receiver.received) == 3)
    await _dispatcher(client).wait_settled()
    assert len(receiver.received) == 3
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
    for attempt in receiver.received:
        assert attempt.verified()["type"] == "job.succeeded"  # each attempt signed anew
    metrics = client.app[JOBS].metrics
    assert metrics.webhook_attempts.labels("failed")._value.get() == 2
    assert metrics.webhook_attempts.labels("delivered")._value.get() == 1


def _template_with_webhook(tmp_path: Path, url: str) -> Path:
    folder = tmp_path / "templates"
    folder.mkdir()
    text = Path(TEMPLATES, "text-to-image.toml").read_text()
    (folder / "text-to-image.toml").write_text(f'webhook = {{ url = "{url}" }}\n' + text)
    return folder


async def test_cancelled_job_notified_by_its_template(
    make_proxy: ProxyFactory,
    fake_comfy: FakeComfyUI,
    redis_url: str,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    """A template's webhook (the job names none); a job cancelled while it runs."""
    folder = _template_with_webhook(tmp_path, receiver.url())
    jobs = {
        "templates_dir": str(folder),
        "watch_seconds": 0.05,
        "webhooks": webhook_settings(),
    }
    client = await jobs_proxy(make_proxy, fake_comfy, redis_url, jobs=jobs)
    fake_comfy.hold()
    resp = await client.post(f"{V1}/jobs", json=TEXT, headers=A)
    job = await resp.json()
    assert resp.status == 202, job
    await fake_comfy.wait_held()
    resp = await client.delete(f"{V1}/jobs/{job['id']}", headers=A)
    assert resp.status in (200, 202), await resp.text()
    fake_comfy.release()
    await receiver.wait_for(lambda: len(receiver.received) == 1)
    payload = receiver.received[0].verified()
    assert payload["type"] == "job.cancelled"
    assert payload["data"]["status"] == "cancelled"
    assert payload["data"]["id"] == job["id"]


async def test_delivered_after_a_restart(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str, receiver: Receiver
) -> None:
    """The first comfygate stops with the message undelivered; a new one, on the same Redis,
    delivers it (same id)."""
    receiver.default = 503
    first = await _proxy(make_proxy, fake_comfy, redis_url, timeout_seconds=0.25, lease_seconds=0.3)
    await _submit(first, receiver.url())
    await receiver.wait_for(lambda: len(receiver.received) >= 1)
    await first.close()
    tried = len(receiver.received)
    receiver.default = 200
    second = await _proxy(
        make_proxy, fake_comfy, redis_url, timeout_seconds=0.25, lease_seconds=0.3
    )
    await receiver.wait_for(lambda: len(receiver.received) > tried)
    await _dispatcher(second).wait_settled()
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
    assert receiver.received[-1].verified()["type"] == "job.succeeded"


async def test_two_replicas_deliver_each_message_once(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str, receiver: Receiver
) -> None:
    one = await _proxy(make_proxy, fake_comfy, redis_url)
    two = await _proxy(make_proxy, fake_comfy, redis_url)
    jobs = []
    for n in range(3):
        for client in (one, two):
            body = {"template": "text-to-image", "params": {"prompt": f"p{n}", "seed": n}}
            jobs.append(await _submit(client, receiver.url(), body))
    await receiver.wait_for(lambda: len(receiver.received) >= len(jobs))
    await _dispatcher(one).wait_settled()
    await _dispatcher(two).wait_settled()
    ids = [r.verified()["data"]["id"] for r in receiver.received]
    assert sorted(ids) == sorted(jobs)  # every job once, none twice


async def test_redirects_are_not_followed(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str, receiver: Receiver
) -> None:
    client = await _proxy(make_proxy, fake_comfy, redis_url, retry_period_seconds=0.02)
    await _submit(client, receiver.url("/redirect"))
    await receiver.wait_for(lambda: len(receiver.at("/redirect")) >= 1)
    await _dispatcher(client).wait_settled()  # the 302 is a failure; retries end, dropped
    assert receiver.at("/hook") == []
    metrics = client.app[JOBS].metrics
    assert metrics.webhook_attempts.labels("dropped")._value.get() == 1


async def test_in_process_outbox_without_redis(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, receiver: Receiver
) -> None:
    receiver.answers = [500]
    client = await _proxy(make_proxy, fake_comfy, None)
    await _submit(client, receiver.url())
    await receiver.wait_for(lambda: len(receiver.received) == 2)
    assert receiver.received[1].verified()["type"] == "job.succeeded"


async def test_webhook_with_wait_is_sent_once(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str, receiver: Receiver
) -> None:
    """The waiting request and the watcher both see the end: one message."""
    client = await _proxy(make_proxy, fake_comfy, redis_url)
    resp = await client.post(
        f"{V1}/jobs?wait=30", json={**TEXT, "webhook": {"url": receiver.url()}}, headers=A
    )
    assert resp.status == 200
    await receiver.wait_for(lambda: len(receiver.received) == 1)
    for _ in range(3):
        assert (await client.get(f"{V1}/jobs/{(await resp.json())['id']}", headers=A)).status == 200
    await _dispatcher(client).wait_settled()
    assert len(receiver.received) == 1
