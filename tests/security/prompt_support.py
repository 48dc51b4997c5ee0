"""Shared by the prompt-model security tests (policy, isolation files, the differential test):
the policy they run under, graph builders, and what the fake ComfyUI received and ran."""

from __future__ import annotations

import json
import os
from typing import Any

from aiohttp.test_utils import TestClient

from proxy.principal import comfy_user_id
from proxy.tenancy.namespaces import user_folder
from tests.conftest import bearer
from tests.fakes.comfyui import FakeComfyUI

Client = TestClient[Any, Any]
ALICE, BOB = comfy_user_id("alice"), comfy_user_id("bob")
FOLDER_SECRET = "prompt-support-folder-secret-0123456789abcdef"
A, B, ADMIN = bearer("alice"), bearer("bob"), bearer("root", ("admin",))

POLICY_TEXT = """
[policies.base]
nodes.allow = [
    "EmptyImage", "SaveImage", "PreviewImage", "PreviewAny", "KSampler", "EmptyLatentImage",
    "CheckpointLoaderSimple", "CLIPTextEncode", "VAEDecode", "LoadImage", "LoadAudio",
    "LoadVideo", "PrimitiveInt", "PrimitiveFloat", "PrimitiveString",
    "PrimitiveStringMultiline", "PrimitiveBoolean",
]
models.allow = ["sd15/*"]
limits = { max_string_length = 200 }

[policies.base.bounds]
"*" = ["batch_size <= 2", "width * height <= 64 * 64", "steps <= 60", "denoise in [0, 1]"]
"CLIPTextEncode" = ["len(text) <= 100"]
"""
MAX_BATCH = 2


def policy_sections(tmp_path: Any) -> dict[str, Any]:
    """``make_proxy`` sections: the policy above, isolation (with a known folder secret, so
    tests can name users' folders) and rate limits as defaults."""
    path = tmp_path / "policy.toml"
    path.write_text(POLICY_TEXT)
    return {"policy": {"files": [str(path)]}, "isolation": {"folder_secret": FOLDER_SECRET}}


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def image(batch: object = 1, width: object = 8, height: object = 8) -> dict[str, Any]:
    return node("EmptyImage", width=width, height=height, batch_size=batch, color=0x335577)


def saved(source: dict[str, Any], **more: dict[str, Any]) -> dict[str, Any]:
    """``source`` as node "1", saved by node "9" (an output: ComfyUI runs the graph)."""
    return {"1": source, **more, "9": node("SaveImage", images=["1", 0], filename_prefix="p")}


def shown(value_link: object, **more: dict[str, Any]) -> dict[str, Any]:
    """A graph whose output node "9" (PreviewAny) shows the value ``value_link`` carries (a
    link, or a literal)."""
    return {**more, "9": node("PreviewAny", source=value_link)}


def chain(kind: str, depth: int, literal: object, *, first: int = 100) -> dict[str, Any]:
    """``depth`` Primitive ``kind`` nodes, each reading the next; the last holds ``literal``.
    Node ``str(first)`` is the head (link to it with ``[str(first), 0]``)."""
    nodes: dict[str, Any] = {}
    for i in range(depth):
        node_id = str(first + i)
        last = i == depth - 1
        value = literal if last else [str(first + i + 1), 0]
        nodes[node_id] = node(f"Primitive{kind}", value=value)
    return nodes


def prompt_posts(fake: FakeComfyUI) -> list[dict[str, Any]]:
    """The ``POST /prompt`` bodies the fake received, parsed (by json, as ComfyUI does)."""
    return [
        json.loads(r.body)
        for r in fake.received
        if r.method == "POST" and r.path.endswith("/prompt")
    ]


async def submit(client: Client, who: dict[str, str], body: object) -> tuple[int, Any]:
    async with client.post("/prompt", json=body, headers=who) as resp:
        return resp.status, await resp.json()


async def submit_raw(client: Client, who: dict[str, str], raw: bytes) -> tuple[int, Any]:
    headers = {**who, "Content-Type": "application/json"}
    async with client.post("/prompt", data=raw, headers=headers) as resp:
        return resp.status, await resp.json()


def refusal(answer: Any) -> tuple[str, set[str]]:
    """``(error.type, node ids in node_errors)`` of a refusal in ComfyUI's shape."""
    assert set(answer) == {"error", "node_errors"}, answer
    return answer["error"]["type"], set(answer["node_errors"])


def ran(fake: FakeComfyUI, prompt_id: str) -> dict[str, dict[str, Any]]:
    """Node id -> the inputs the fake ran each node with (after validation and links)."""
    return fake.executor.ran.get(prompt_id, {})


def user_file(fake: FakeComfyUI, owner: str, name: str, data: bytes = b"\x00data") -> str:
    """Put a file in the owner's input folder (``input/users/<owner>-<tag>/``, as an upload
    would); its ``users/...`` name."""
    folder = user_folder(owner, FOLDER_SECRET.encode())
    os.makedirs(os.path.join(fake.paths.input, folder), exist_ok=True)
    with open(os.path.join(fake.paths.input, folder, name), "wb") as fh:
        fh.write(data)
    return f"{folder}/{name}"
