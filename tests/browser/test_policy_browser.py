"""The workflow policy in the stock frontend (1.27.10): a workflow with a node the user may not
run is refused by the proxy, and the UI marks that node with the reason, exactly as it does for
ComfyUI's own validation errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.async_api import BrowserContext, expect

from tests.browser.conftest import DEFAULT_TIMEOUT_MS, FakeUpstream, PageRecorder, StartProxy
from tests.browser.frontend import EMPTY_IMAGE_TO_SAVE_IMAGE, load_frontend

pytestmark = pytest.mark.browser

POLICY = """
[policies.base]
nodes.allow = ["EmptyImage", "SaveImage", "PreviewImage"]
nodes.deny = ["ImageBlur"]
"""


def with_blur() -> dict[str, Any]:
    """EmptyImage -> ImageBlur (node 3, forbidden) -> SaveImage, in the UI's own format."""
    workflow = copy.deepcopy(EMPTY_IMAGE_TO_SAVE_IMAGE)
    empty, save = workflow["nodes"]
    empty["outputs"][0]["links"] = [1]
    save["inputs"][0]["link"] = 2
    save["pos"] = [780, 120]
    workflow["nodes"].insert(
        1,
        {
            "id": 3,
            "type": "ImageBlur",
            "pos": [440, 120],
            "size": [300, 110],
            "flags": {},
            "order": 1,
            "mode": 0,
            "inputs": [{"name": "image", "type": "IMAGE", "link": 1}],
            "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [2], "slot_index": 0}],
            "properties": {"Node name for S&R": "ImageBlur"},
            "widgets_values": [3, 1.5],
        },
    )
    save["order"] = 2
    workflow["links"] = [[1, 1, 0, 3, 0, "IMAGE"], [2, 3, 0, 2, 0, "IMAGE"]]
    workflow["last_node_id"] = 3
    workflow["last_link_id"] = 2
    return workflow


async def test_forbidden_node_is_marked_in_the_ui(
    upstream: FakeUpstream,
    start_proxy: StartProxy,
    context: BrowserContext,
    recorder: PageRecorder,
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    proxy = await start_proxy(policy={"files": [str(policy)]})
    await proxy.sign_in(context)
    page = recorder.page
    workflow = json.dumps(json.dumps(with_blur()))
    await page.add_init_script(f"window.localStorage.setItem('workflow', {workflow});")
    await load_frontend(recorder, f"{proxy.url}/", "/ws")
    await page.wait_for_function(
        "() => (window.app?.graph?.nodes ?? []).map((n) => n.type).sort().join()"
        " === 'EmptyImage,ImageBlur,SaveImage'"
    )
    await page.keyboard.press("Escape")  # a "missing node types" dialog, if the UI shows one

    run = page.locator('[data-testid="queue-button"] button').first
    async with page.expect_response(
        lambda r: r.request.method == "POST" and urlsplit(r.url).path == "/api/prompt"
    ) as queued:
        await run.click()
    response = await queued.value
    assert response.status == 400
    answer = await response.json()
    assert answer["error"]["type"] == "node_not_allowed"
    assert answer["node_errors"] == {
        "3": {
            "errors": [
                {
                    "type": "node_not_allowed",
                    "message": "your role may not use ImageBlur nodes",
                    "details": "denied by the policy",
                    "extra_info": {},
                }
            ],
            "dependent_outputs": [],
            "class_type": "ImageBlur",
        }
    }
    # The UI's error dialog shows the reason, and the node is marked as the one in error.
    dialog = page.get_by_role("dialog").filter(has_text="Prompt execution failed")
    await expect(dialog).to_be_visible(timeout=DEFAULT_TIMEOUT_MS)
    await expect(dialog).to_contain_text(
        "Prompt refused by the workflow policy: node 3 (ImageBlur): your role may not use "
        "ImageBlur nodes"
    )
    await expect(dialog).to_contain_text("denied by the policy")
    # The dialog builds its error report (system stats, server logs) as for ComfyUI's own
    # validation errors; a failure there is the red "Failed to fetch logs" toast. The report's
    # text is set only when that worked.
    await dialog.get_by_role("button", name="Show Report").click()
    await expect(dialog).to_contain_text("# ComfyUI Error Report", timeout=DEFAULT_TIMEOUT_MS)
    assert await page.locator(".p-toast-message").count() == 0
    marked = await page.evaluate(
        "() => window.app.graph.nodes.filter((n) => n.has_errors).map((n) => [n.id, n.type])"
    )
    assert marked == [[3, "ImageBlur"]]
    assert list(await page.evaluate("() => window.app.lastNodeErrors")) == ["3"]
    await recorder.screenshot("policy-forbidden-node.png")
    await dialog.get_by_role("button", name="Close").click()
    await expect(dialog).to_be_hidden(timeout=DEFAULT_TIMEOUT_MS)
    await recorder.screenshot("policy-forbidden-node-marked.png")  # outlined in red

    await upstream.fake.wait_idle()
    posts = [r for r in upstream.fake.received if r.method == "POST" and "prompt" in r.path]
    assert posts == []  # refused by the proxy: ComfyUI never saw it
