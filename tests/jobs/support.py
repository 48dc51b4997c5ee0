"""Fixtures of the jobs API tests: the README deployment (JWT, isolation, policy, Redis) with
the example templates of ``config/templates`` in front of the fake ComfyUI."""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from tests.conftest import ProxyFactory
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.comfyui.images import solid

Client = TestClient[Any, Any]
TEMPLATES = str(Path(__file__).resolve().parents[2] / "config" / "templates")
V1 = "/comfygate/v1"
_colors = itertools.count(0x203040, 7919)


async def jobs_proxy(
    make_proxy: ProxyFactory, fake: FakeComfyUI, redis_url: str | None, **sections: Any
) -> Client:
    fake.add_model("checkpoints", "sd15.safetensors")
    jobs = {"templates_dir": TEMPLATES, "poll_seconds": 0.05, **sections.pop("jobs", {})}
    extra: dict[str, Any] = {"jobs": jobs, **sections}
    if redis_url is not None:
        extra["redis"] = {"url": redis_url}
    return await make_proxy(fake.url, token=None, **extra)


def png(width: int = 8, height: int = 8) -> bytes:
    buf = io.BytesIO()
    solid(width, height, next(_colors) % 0xFFFFFF).save(buf, format="PNG")
    return buf.getvalue()


async def upload(client: Client, who: dict[str, str], name: str = "in.png") -> str:
    form = aiohttp.FormData()
    form.add_field("image", png(), filename=name, content_type="image/png")
    resp = await client.post("/upload/image", data=form, headers=who)
    assert resp.status == 200, await resp.text()
    data = await resp.json()
    return f"{data['subfolder']}/{data['name']}" if data["subfolder"] else str(data["name"])


def prompts_received(fake: FakeComfyUI) -> list[Any]:
    return [r for r in fake.received if r.method == "POST" and r.path.endswith("/prompt")]
