"""The ``comfygate-user`` target: what a regular user runs, every feature on.

A non-admin role (isolation filters applied to every answer and frame), every route class rate
limited in a local Redis (limits never reached: one GCRA check per request), the workflow
policy, the access log and metrics on. Its ``prepare`` submits a prompt through comfygate as the
user (so the user owns it) and waits for it to finish: the small GETs read that prompt's ~2 KB
history entry, and the WebSocket runs stream previews of that prompt (binary type 4, whose
metadata names the prompt: the filter looks its owner up and lets the user's own through).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from bench.fixtures import HISTORY_TARGET, VIEW_FILE, api_graph
from bench.targets import BENCH_JWT_SECRET, RunningTarget, TargetSpec, bench_token
from proxy.principal import comfy_user_id
from proxy.settings.limits import ROUTE_CLASSES
from proxy.tenancy.namespaces import upstream_client_id

USER_ROLE = "bench_user"
PREVIEW_WITH_METADATA = 4  # BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA


def user_roles() -> str:
    """``COMFYGATE_ROLES``: a plain (non-admin) role, every class limited far above the load."""
    high = {"rate": "1000000/second", "burst": 1_000_000}
    role = {"admin": False, "queue_quota": 0, "rate_limits": dict.fromkeys(ROUTE_CLASSES, high)}
    return json.dumps({USER_ROLE: role})


async def _submit_own(running: RunningTarget) -> tuple[str, dict[str, Any]]:
    """A ~2 KB history entry of the user's: submitted through comfygate, run to its end."""
    body = {
        "prompt": api_graph(f"bench_user_{uuid.uuid4().hex[:8]}"),
        "client_id": "bench-user-seed",
        "extra_data": {"extra_pnginfo": {"bench": "x" * (HISTORY_TARGET - 1000)}},
    }
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, headers=running.headers) as s:
        async with s.post(f"{running.base}/prompt", json=body) as resp:
            data = orjson.loads(await resp.read())
            if resp.status != 200:
                raise RuntimeError(f"the user's prompt was refused: {resp.status} {data}")
            pid = str(data["prompt_id"])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            async with s.get(f"{running.base}/history/{pid}") as resp:
                raw = await resp.read()
                entry = orjson.loads(raw).get(pid, {})
                if entry.get("status", {}).get("completed"):
                    return pid, entry
            await asyncio.sleep(0.05)  # the fake runs the prompt: poll until it is history
    raise RuntimeError(f"the user's prompt {pid} did not finish within 20 s")


def _own_output(entry: dict[str, Any]) -> tuple[str, str]:
    """The file the user's SaveImage wrote (isolation lets the user /view it): subfolder, name."""
    for output in entry.get("outputs", {}).values():
        for image in output.get("images", []):
            if image.get("type") == "output":
                return str(image.get("subfolder") or ""), str(image["filename"])
    raise RuntimeError(f"the user's prompt wrote no output file: {entry.get('outputs')}")


async def prepare_user(running: RunningTarget) -> None:
    pid, entry = await _submit_own(running)
    running.history_id = pid
    if running.upstream_root is not None:
        # The user may /view only its own outputs: its SaveImage file, made 512 KiB like the
        # fixtures' (same bytes), so /view moves the same amount for every target.
        subfolder, name = _own_output(entry)
        source = running.upstream_root / "output" / VIEW_FILE
        (running.upstream_root / "output" / subfolder / name).write_bytes(source.read_bytes())
        running.view_file = f"{quote(name)}&subfolder={quote(subfolder)}"
    running.preview_prompt_id = pid
    running.preview_type = PREVIEW_WITH_METADATA


def user_target() -> TargetSpec:
    return TargetSpec(
        "comfygate-user",
        "comfygate",
        env={
            "COMFYGATE_AUTH__JWT__SECRET": BENCH_JWT_SECRET,
            "COMFYGATE_ROLES": user_roles(),
        },
        headers={"Authorization": f"Bearer {bench_token((USER_ROLE,))}"},
        prepare=prepare_user,
        sid_map=lambda sid: upstream_client_id(comfy_user_id("bench"), sid),
        redis=True,
        description="comfygate, a regular user: isolation on (own history, own previews), "
        "rate limits in a local Redis, policy, access log and metrics on",
    )


__all__ = ["USER_ROLE", "prepare_user", "user_roles", "user_target"]
