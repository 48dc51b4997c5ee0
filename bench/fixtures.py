"""The data the runs need, set up through the fake's own API (plus files placed in root/output)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

VIEW_FILE = "bench_view_512k.png"
BIG_FILE = "bench_big_200m.png"
VIEW_SIZE = 512 * 1024
BIG_SIZE = 200 * 1000 * 1000
HISTORY_TARGET = 2048
PROMPT_BODY_TARGET = 20 * 1000


def api_graph(prefix: str) -> dict[str, Any]:
    """EmptyImage -> SaveImage, as in captures/run-empty-save.json."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 16711680},
        },
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": prefix},
        },
    }


def ui_workflow(nodes: int) -> dict[str, Any]:
    """A UI-format workflow of the kind the frontend puts in extra_data.extra_pnginfo."""
    return {
        "id": "3f1c2a4e-bench-0000-0000-000000000000",
        "revision": 0,
        "last_node_id": nodes,
        "last_link_id": nodes,
        "nodes": [
            {
                "id": i,
                "type": "ImageBlur" if i % 2 else "ImageAddNoise",
                "pos": [100 + 37 * i, 200 + 11 * i],
                "size": [315, 82],
                "flags": {},
                "order": i,
                "mode": 0,
                "inputs": [{"name": "image", "type": "IMAGE", "link": i}],
                "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [i + 1], "slot_index": 0}],
                "properties": {"Node name for S&R": "ImageBlur", "cnr_id": "comfy-core"},
                "widgets_values": [1, 1.0],
            }
            for i in range(1, nodes + 1)
        ],
        "links": [[i, i - 1, 0, i, 0, "IMAGE"] for i in range(1, nodes + 1)],
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
        "version": 0.4,
    }


def prompt_body(prefix: str, target_size: int, client_id: str) -> bytes:
    """A valid POST /prompt body padded with a UI workflow to about ``target_size`` bytes."""
    nodes = 1
    while True:
        body = orjson.dumps(
            {
                "prompt": api_graph(prefix),
                "client_id": client_id,
                "extra_data": {"extra_pnginfo": {"workflow": ui_workflow(nodes)}},
            }
        )
        if len(body) >= target_size or nodes > 10_000:
            return body
        nodes += 1


def place_files(output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / VIEW_FILE).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * (2048 - 1))
    with (output_dir / VIEW_FILE).open("r+b") as f:
        f.truncate(VIEW_SIZE)
    with (output_dir / BIG_FILE).open("wb") as f:  # sparse: costs no disk, reads as zeros
        f.truncate(BIG_SIZE)


@dataclass
class Fixtures:
    fake_base: str
    work: Path
    history_id: str = ""
    history_size: int = 0
    prompt_body_file: Path | None = None
    prompt_body: bytes = b""

    @property
    def prompt_body_size(self) -> int:
        return len(self.prompt_body)

    async def setup(self, session: aiohttp.ClientSession) -> None:
        body = prompt_body("bench_post", PROMPT_BODY_TARGET, "bench-post")
        self.prompt_body_file = self.work / "prompt-20k.json"
        self.prompt_body_file.write_bytes(body)
        self.prompt_body = body
        # The prompt must be accepted as it is, before the load runs.
        async with session.post(f"{self.fake_base}/prompt", data=body) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"the fake rejected the 20 KB prompt: {resp.status} {text}")
        await self.reset(session)

    async def reset(self, session: aiohttp.ClientSession) -> None:
        """Clear queue and history (POST /prompt runs fill them), then seed the ~2 KB entry."""
        for path in ("/queue", "/history"):
            async with session.post(f"{self.fake_base}{path}", json={"clear": True}) as resp:
                await resp.read()
        await self.seed_history(session)

    async def seed_history(self, session: aiohttp.ClientSession) -> None:
        size = HISTORY_TARGET
        for _ in range(3):  # pad the entry until its JSON is about 2 KB
            pid, got = await self._submit_and_wait(session, size)
            self.history_id, self.history_size = pid, got
            if abs(got - HISTORY_TARGET) < 64:
                return
            size += HISTORY_TARGET - got

    async def _submit_and_wait(self, session: aiohttp.ClientSession, size: int) -> tuple[str, int]:
        nonce = uuid.uuid4().hex[:8]
        base = orjson.dumps({"prompt": api_graph(f"bench_hist_{nonce}"), "client_id": "bench-seed"})
        pad = max(0, size - len(base) - 600)
        body = {
            "prompt": api_graph(f"bench_hist_{nonce}"),
            "client_id": "bench-seed",
            "extra_data": {"extra_pnginfo": {"bench": "x" * pad}},
        }
        async with session.post(f"{self.fake_base}/prompt", json=body) as resp:
            data = orjson.loads(await resp.read())
            if resp.status != 200:
                raise RuntimeError(f"seeding history: POST /prompt answered {resp.status}: {data}")
            pid = str(data["prompt_id"])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            async with session.get(f"{self.fake_base}/history/{pid}") as resp:
                raw = await resp.read()
                entry = orjson.loads(raw)
                if entry.get(pid, {}).get("status", {}).get("completed"):
                    return pid, len(raw)
            await asyncio.sleep(0.05)
        raise RuntimeError(f"history entry {pid} did not complete within 20 s")
