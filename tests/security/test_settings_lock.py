"""The per-user settings lock (``proxy/userdata/settings_lock.py``) is per user: user B cannot
hold user A's settings hostage. B's write, held at ComfyUI with B's lock taken on one replica,
does not delay A's write through the other replica, in either ComfyUI mode."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.conftest import ProxyFactory, bearer
from tests.integration.test_settings_replicas import (
    A,
    post,
    reading_settings,
    start_replicas,
)

B = bearer("bob")


@pytest.mark.parametrize("multi", [False, True], ids=["single-user", "multi-user"])
async def test_b_holding_its_settings_lock_does_not_block_a(
    multi: bool, make_proxy: ProxyFactory, redis_url: str, tmp_path: Path
) -> None:
    pair = await start_replicas(make_proxy, redis_url, tmp_path, multi=multi)
    try:
        pair.gate.matches = reading_settings
        held = asyncio.create_task(post(pair.one, "/api/settings/Comfy.B", B, b'"bob"'))
        await pair.gate.held.wait()  # B's write holds B's lock, stopped at ComfyUI
        before = len(pair.writes())
        assert await post(pair.two, "/api/settings/Comfy.A", A, b'"alice"') == (200, b"")
        assert len(pair.writes()) > before  # A's write reached ComfyUI while B's was held
        assert pair.settings() == {"Comfy.First": "first", "Comfy.A": "alice"}
        pair.gate.open()
        assert await held == (200, b"")
        assert pair.settings() == {"Comfy.First": "first", "Comfy.A": "alice"}  # B's is B's
    finally:
        pair.gate.open()
        await pair.fake.stop()
