"""Refusals of ``POST /prompt`` read exactly like ComfyUI's own validation failure (issue 15).

The stock frontend (1.27.10) parses a ``/prompt`` answer with its ``zPromptResponse`` schema,
shows ``error.message: error.details`` and each ``node_errors`` entry in its error dialog, and
outlines those nodes. The proxy's refusals (workflow policy, tenant isolation) must have the
very keys and types of ComfyUI's answer for a node that fails validation (the captured
``value_below_min`` exchange), so the UI handles them as it handles ComfyUI's. B is refused,
and ComfyUI receives nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.principal import comfy_user_id
from proxy.tenancy.namespaces import folder_names
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI

Client = TestClient[Any, Any]
B = bearer("bob")
A_FOLDER = folder_names("").of(comfy_user_id("alice"))
CAPTURE = Path(__file__).parents[1] / "data" / "comfyui_captures" / "validation-errors.json"
POLICY = """
[policies.base]
nodes.deny = ["ImageBlur"]
"""


def comfyui_validation_failure() -> dict[str, Any]:
    capture = json.loads(CAPTURE.read_text())
    body: dict[str, Any] = capture["exchanges"]["value_below_min"]["response"]["body"]["json"]
    return body


def frontend_accepts(body: dict[str, Any]) -> None:
    """The frontend's zPromptResponse for an error answer (zError, zNodeError)."""
    assert set(body) == {"error", "node_errors"}

    def error(e: dict[str, Any]) -> None:
        assert set(e) == {"type", "message", "details", "extra_info"}
        assert all(isinstance(e[k], str) for k in ("type", "message", "details"))
        assert isinstance(e["extra_info"], dict)
        assert isinstance(e["extra_info"].get("input_name", ""), str)

    error(body["error"])
    for node in body["node_errors"].values():
        assert set(node) == {"errors", "class_type", "dependent_outputs"}
        assert isinstance(node["class_type"], str)
        assert isinstance(node["dependent_outputs"], list)
        assert node["errors"]
        for e in node["errors"]:
            error(e)


def graph(second: dict[str, Any]) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "2": second,
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }


BLUR = {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0}}
FOREIGN = {"class_type": "LoadImage", "inputs": {"image": f"{A_FOLDER}/x.png [output]"}}


@pytest.mark.parametrize(
    ("second", "node_error"),
    [(BLUR, "node_not_allowed"), (FOREIGN, "input_file_forbidden")],
    ids=["policy", "isolation"],
)
async def test_refusal_has_comfyuis_validation_failure_shape(
    make_proxy: ProxyFactory,
    fake_comfy: FakeComfyUI,
    tmp_path: Path,
    second: dict[str, Any],
    node_error: str,
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    files = [str(policy)] if second is BLUR else []
    client: Client = await make_proxy(fake_comfy.url, token=None, policy={"files": files})
    comfy = comfyui_validation_failure()
    frontend_accepts(comfy)  # the reference itself passes the same check
    async with client.post("/prompt", json={"prompt": graph(second)}, headers=B) as resp:
        assert resp.status == 400
        assert resp.content_type == "application/json"
        body = await resp.json()
    frontend_accepts(body)
    assert body["error"]["type"] == node_error
    assert body["node_errors"]["2"]["errors"][0]["type"] == node_error
    assert body["node_errors"]["2"]["class_type"] == second["class_type"]
    assert [r for r in fake_comfy.received if r.path.endswith("/prompt")] == []
