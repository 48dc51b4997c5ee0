"""While the home instance is down, user data is never read from or written to another one
(issue 14, finding 5).

Reads that any instance answers alike (``/system_stats``, model lists, the frontend's files)
move to another instance while the home instance is down; settings and user data do not: they
live on the home instance's disk, and another instance's copy (a stale one, or nobody's) must
not be served as the user's, nor a write land where nobody reads it later. B tries both
while A's data sits on the stopped home instance: 503 ``home_unavailable``, and the other
instances received nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.multi.registry import REGISTRY
from proxy.upstream.pool import POOL
from tests.integration.multi_support import A, B, Client, Fakes, fakes, multi_proxy, relayed

__all__ = ["fakes", "multi_proxy"]  # fixtures used by name


async def status_and_type(
    client: Client, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, str]:
    async with client.request(method, path, headers=headers, data=body or None) as resp:
        if resp.content_type != "application/json":
            return resp.status, ""
        data = await resp.json()
        error = data.get("error") if isinstance(data, dict) else None
        return resp.status, error.get("type", "") if isinstance(error, dict) else ""


async def test_user_data_is_not_served_nor_written_elsewhere_while_home_is_down(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy()
    secret = b'{"note": "alice only"}'
    status, _ = await status_and_type(
        client, "POST", "/api/userdata/workflows%2Fsecret.json", A, secret
    )
    assert status == 200
    assert (await status_and_type(client, "POST", "/api/settings/Comfy.X", A, b'"a"'))[0] == 200
    # The other instances hold a copy of the same path (e.g. an old replica's disk).
    for fake in (fakes[1], fakes[2]):
        async with client.app[POOL].session.post(
            f"{fake.url}/userdata/workflows%2Fsecret.json", data=b'{"stale": true}'
        ) as resp:
            assert resp.status == 200
        fake.received.clear()

    await fakes[0].stop()
    await client.app[REGISTRY].health.check_all()
    assert not client.app[POOL].is_healthy(fakes.name(0))

    attempts = (
        ("GET", "/api/userdata/workflows%2Fsecret.json", B, b""),
        ("GET", "/api/userdata/workflows%2Fsecret.json", A, b""),
        ("GET", "/api/v2/userdata?path=workflows", B, b""),
        ("GET", "/api/settings", B, b""),
        ("GET", "/api/settings/Comfy.X", A, b""),
        ("POST", "/api/userdata/workflows%2Fsecret.json?overwrite=true", B, b"{}"),
        ("POST", "/api/settings", B, b'{"Comfy.X": "b"}'),
        ("DELETE", "/api/userdata/workflows%2Fsecret.json", B, b""),
    )
    for method, path, who, body in attempts:
        assert await status_and_type(client, method, path, who, body) == (503, "home_unavailable")
    for fake in (fakes[1], fakes[2]):
        assert not relayed(fake)  # received nothing at all
