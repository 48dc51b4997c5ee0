"""The fake's ``--enable-compress-response-body`` (``compress_responses``) against what ComfyUI's
``compress_body`` middleware does (``server.py``, Comfy-Org/ComfyUI ``a125cd8``): whole JSON and
text answers with a body, any status, HEAD too; chosen by the substring ``gzip`` in
``Accept-Encoding``, coding by aiohttp (deflate before gzip); files never."""

from __future__ import annotations

from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpClient

from tests.fakes.comfyui import FakeComfyUI


@pytest.mark.parametrize(
    ("accept", "coding"),
    [
        ("gzip", "gzip"),
        ("gzip, deflate", "deflate"),  # aiohttp tries deflate first
        ("gzip, deflate, br, zstd", "deflate"),
        ("gzip;q=0", "gzip"),  # a substring test: q-values are not read
        ("deflate", None),  # no "gzip" in it: not compressed at all
        ("GZIP", None),  # case-sensitive substring
        ("br", None),
        ("identity", None),
    ],
)
async def test_coding_follows_comfyui(
    tmp_path: Path, aiohttp_client: AiohttpClient, accept: str, coding: str | None
) -> None:
    client = await aiohttp_client(FakeComfyUI(tmp_path, compress_responses=True).app)
    headers = {"Accept-Encoding": accept}
    for method, path in (("GET", "/api/history"), ("GET", "/api/system_stats"), ("HEAD", "/queue")):
        async with client.request(method, path, headers=headers, auto_decompress=False) as resp:
            assert resp.status == 200
            assert resp.headers.get("Content-Encoding") == coding, (method, path)


async def test_errors_compressed_files_and_empty_bodies_not(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    client = await aiohttp_client(FakeComfyUI(tmp_path, compress_responses=True).app)
    gzip = {"Accept-Encoding": "gzip"}
    async with client.get("/api/jobs/nope", headers=gzip, auto_decompress=False) as resp:
        assert resp.status == 404  # a JSON error: compressed too
        assert resp.headers.get("Content-Encoding") == "gzip"
    view = "/api/view?filename=example.png&type=input"
    async with client.get(view, headers=gzip, auto_decompress=False) as resp:
        assert resp.status == 200
        assert resp.headers.get("Content-Encoding") is None  # a file response
    async with client.post("/api/interrupt", headers=gzip, json={}) as resp:
        assert resp.status == 200
        assert resp.headers.get("Content-Encoding") is None  # no body


async def test_off_by_default(tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(FakeComfyUI(tmp_path).app)
    headers = {"Accept-Encoding": "gzip"}
    async with client.get("/api/history", headers=headers, auto_decompress=False) as resp:
        assert resp.headers.get("Content-Encoding") is None
