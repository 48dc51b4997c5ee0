"""The stock frontend's queue panel with prompts held in the gateway queue (``docs/scheduler.md``):
the queue tab's badge (ComfyUI's ``status`` ``queue_remaining``, which counts the user's held
prompts) and the panel's task list (from ``/queue``: held prompts are pending there) show every
prompt the user waits for, not only the ones ComfyUI has been given."""

from __future__ import annotations

import json
from typing import Any

import pytest
from playwright.async_api import BrowserContext, expect

from proxy.scheduler.gate import Gate
from proxy.scheduler.keys import GATE
from tests.browser.conftest import DEFAULT_TIMEOUT_MS, FakeUpstream, PageRecorder, StartProxy
from tests.browser.frontend import load_frontend

pytestmark = pytest.mark.browser


def graph(color: int) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "q"}},
    }


async def test_queue_panel_shows_held_prompts(
    upstream: FakeUpstream,
    start_proxy: StartProxy,
    context: BrowserContext,
    recorder: PageRecorder,
) -> None:
    upstream.fake.hold()  # the first prompt stays running: the rest wait
    proxy = await start_proxy(scheduler={"enabled": True, "pull_back": False})
    await proxy.sign_in(context)
    page = recorder.page
    loaded = await load_frontend(recorder, f"{proxy.url}/", "/ws")
    ids = []
    for color in range(4):
        body = json.dumps({"prompt": graph(color), "client_id": loaded.sid})
        answer = await page.evaluate(
            """async (body) => {
                const r = await fetch('/api/prompt', {method: 'POST', body,
                    headers: {'Content-Type': 'application/json'}});
                return [r.status, await r.json()];
            }""",
            body,
        )
        assert answer[0] == 200, answer
        ids.append(answer[1]["prompt_id"])
    gate: Gate = proxy.app[GATE]
    for _ in range(300):
        running, pending = upstream.fake.queue.current_queue()
        if len(running) == 1 and len(pending) == 1:
            break
        gate.wake()
        await gate.wait_ticks(1)
    assert len(await gate.store.held(None)) == 2  # two held by comfygate, ComfyUI has two

    # The queue tab's badge: all four, though ComfyUI's own queue has two.
    queue_tab = page.locator(".queue-tab-button").first
    await expect(queue_tab.locator(".p-badge")).to_have_text("4", timeout=DEFAULT_TIMEOUT_MS)
    # The panel lists the running prompt and the three waiting, in the order they will run.
    await page.keyboard.press("Escape")  # a dialog the UI may show at first start
    await expect(page.locator(".p-dialog-mask")).to_have_count(0, timeout=DEFAULT_TIMEOUT_MS)
    await queue_tab.click()
    await expect(page.locator(".task-item")).to_have_count(4, timeout=DEFAULT_TIMEOUT_MS)
    listed = await page.evaluate(
        "async () => { const q = await window.app.api.getQueue();"
        " return [q.Running.map((t) => t.prompt_id ?? t.prompt?.[1]),"
        " q.Pending.map((t) => t.prompt_id ?? t.prompt?.[1])]; }"
    )
    assert listed == [ids[:1], ids[1:]], listed
    await recorder.screenshot("scheduler-queue-panel-held.png")

    # Cancelling a held prompt from the API: the badge follows (a status frame of the gate's
    # own: ComfyUI's queue did not change).
    await page.evaluate(
        """async (id) => { await fetch('/api/queue', {method: 'POST',
            body: JSON.stringify({delete: [id]}),
            headers: {'Content-Type': 'application/json'}}); }""",
        ids[3],
    )
    await expect(queue_tab.locator(".p-badge")).to_have_text("3", timeout=DEFAULT_TIMEOUT_MS)
    upstream.fake.release()
