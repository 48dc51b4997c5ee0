"""The relay's fast path (``proxy.relay.ws_fast``) decides from per-socket caches: B attacks
A by receiving A's previews once the cache has seen them (family "WebSocket/identity").

B's socket looks A's prompt up once and caches "not B's"; every later preview of it (sent to
B's socket id by ComfyUI, or broadcast) must still be dropped on the fast path, while B's own
and A's own socket get theirs. Asserted on what each socket received; the fake ComfyUI is the
one that sent the frames, to B's registered (namespaced) id.
"""

from __future__ import annotations

from proxy.tenancy.namespaces import upstream_client_id
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.comfyui.server import stream_frame
from tests.security.test_websocket_identity import (  # noqa: F401 - fixture
    ALICE,
    BOB,
    MARKER,
    A,
    B,
    Client,
    a_runs_one_prompt,
    client,
    connect,
    frames_until_marker,
    submit,
)

PREVIEW_WITH_METADATA = 4


async def test_b_never_gets_as_previews_however_often_they_repeat(
    client: Client,  # noqa: F811
    fake_comfy: FakeComfyUI,
) -> None:
    a_ws, a_sid = await connect(client, A, "clientId=tab-a")
    b_ws, b_sid = await connect(client, B, "clientId=tab-b")
    a_prompt = await a_runs_one_prompt(client, fake_comfy, a_ws)
    assert [f for f in await frames_until_marker(b_ws) if isinstance(f, tuple)] == []
    b_prompt = await submit(client, B, b_sid)
    await fake_comfy.wait_idle()
    await fake_comfy.broadcast(MARKER)
    await frames_until_marker(a_ws)
    await frames_until_marker(b_ws)

    a_frame = stream_frame(PREVIEW_WITH_METADATA, 4096, a_prompt)
    b_frame = stream_frame(PREVIEW_WITH_METADATA, 4096, b_prompt)
    b_upstream = upstream_client_id(BOB, b_sid)
    for _ in range(20):  # the first one fills B's cache; the rest take the fast path
        await fake_comfy.send_binary(b_upstream, a_frame)
        await fake_comfy.send_binary(None, a_frame)
    await fake_comfy.send_binary(b_upstream, b_frame)
    await fake_comfy.broadcast(MARKER)
    assert await frames_until_marker(b_ws) == [("binary", PREVIEW_WITH_METADATA)]  # B's own only
    # A's socket: her 20 broadcast previews, none of B's.
    a_seen = await frames_until_marker(a_ws)
    assert a_seen == [("binary", PREVIEW_WITH_METADATA)] * 20
    assert upstream_client_id(ALICE, a_sid) in fake_comfy.socket_table.metadata
    await a_ws.close()
    await b_ws.close()
