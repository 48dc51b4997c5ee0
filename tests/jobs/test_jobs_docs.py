"""``docs/jobs-api.md``: its curl and Python examples run against a test comfygate (a real
listening server in front of the fake ComfyUI) and do what they say."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import ProxyFactory, make_token
from tests.fakes.comfyui import FakeComfyUI
from tests.jobs.support import Client, jobs_proxy
from tests.jobs.webhook_receiver import SECRET, webhook_settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "jobs-api.md"
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


@pytest.fixture
async def client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str) -> Client:
    # The webhook example runs its receiver on loopback: allowed here, as the page says.
    jobs = {"watch_seconds": 0.05, "webhooks": webhook_settings()}
    return await jobs_proxy(make_proxy, fake_comfy, redis_url, jobs=jobs)


def test_the_page_has_examples() -> None:
    kinds = [kind for kind, _ in BLOCKS]
    assert kinds.count("bash") >= 1
    assert kinds.count("python") >= 3


@pytest.mark.parametrize(
    ("kind", "code"), BLOCKS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BLOCKS)]
)
async def test_example_runs(client: Client, tmp_path: Path, kind: str, code: str) -> None:
    if kind == "bash" and shutil.which("curl") is None:
        pytest.fail("curl is needed to run the documented curl example")
    server = client.server
    env = {
        **os.environ,
        "COMFYGATE_URL": f"http://{server.host}:{server.port}",
        "COMFYGATE_TOKEN": make_token("doc-reader", ("user",)),
        "COMFYGATE_WEBHOOK_SECRET": SECRET,
    }
    argv = (
        ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
    )
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, (out.decode(), err.decode())
    if "fox.png" in code:
        assert (tmp_path / "fox.png").read_bytes().startswith(b"\x89PNG")
    else:
        assert out.decode().startswith("done [")
