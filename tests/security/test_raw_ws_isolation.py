"""Isolation on the raw relay (``proxy.relay.raw_ws``), family "WebSocket/identity": B attacks
A by receiving A's prompts' events and previews, with ComfyUI's frames whole and fragmented.

The fake ComfyUI is made to send every frame fragmented (first frame and continuations, a
ping between them): the relay must reassemble a message before its filter decides, so no part
of A's frame reaches B, and A still gets hers whole. Asserted on what each socket received;
the fake is the one that sent the frames (to B's registered id, or broadcast).
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from proxy.relay.raw_ws import RawRelay
from proxy.state import LIFECYCLE
from proxy.tenancy.namespaces import upstream_client_id
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.comfyui.server import stream_frame
from tests.security.test_websocket_identity import (  # noqa: F401 - fixture
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
from tests.support.raw_ws_peers import fragments, frame
from tests.support.ws import kinds, prompt_ids

PREVIEW_WITH_METADATA = 4


@pytest.fixture(params=["whole", "fragmented"])
def fragmenting(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``fragmented``: every frame the fake ComfyUI sends goes as three fragments with a ping
    between the first two (the proxy's own sockets are raw: only the fake's are patched).
    Yields the count of frames sent fragmented."""
    sent = [0]
    if request.param == "fragmented":

        def send(opcode: int) -> Any:
            async def fragmented(
                self: web.WebSocketResponse, data: Any, compress: Any = None
            ) -> None:
                payload = data.encode() if isinstance(data, str) else bytes(data)
                writer: Any = self._writer
                first, *rest = fragments(opcode, payload, 3)
                sent[0] += 1
                writer.transport.write(first + frame(0x9, b"between") + b"".join(rest))

            return fragmented

        monkeypatch.setattr(web.WebSocketResponse, "send_str", send(0x1))
        monkeypatch.setattr(web.WebSocketResponse, "send_bytes", send(0x2))
    return sent


def raw_relays(proxy: Client) -> list[Any]:
    return [ws for ws in proxy.app[LIFECYCLE].websockets if isinstance(ws, RawRelay)]


async def test_b_gets_nothing_of_as_prompt_on_the_raw_relay(
    fragmenting: list[int],
    client: Client,  # noqa: F811
    fake_comfy: FakeComfyUI,
) -> None:
    a_ws, _ = await connect(client, A, "clientId=tab-a")
    b_ws, b_sid = await connect(client, B, "clientId=tab-b")
    assert len(raw_relays(client)) == 2  # both on the raw relay
    a_prompt = await a_runs_one_prompt(client, fake_comfy, a_ws)  # A gets hers, whole
    b_seen = await frames_until_marker(b_ws)
    assert prompt_ids(b_seen) == set()
    assert [k for k in kinds(b_seen) if isinstance(k, tuple)] == []

    # A's previews sent to B's own upstream id and broadcast, again and again (the filter's
    # cache and quick path), then one of B's: B gets only his.
    b_prompt = await submit(client, B, b_sid)
    await fake_comfy.wait_idle()
    await fake_comfy.broadcast(MARKER)
    await frames_until_marker(a_ws)
    assert a_prompt not in prompt_ids(await frames_until_marker(b_ws))
    a_frame = stream_frame(PREVIEW_WITH_METADATA, 70_000, a_prompt)
    b_frame = stream_frame(PREVIEW_WITH_METADATA, 70_000, b_prompt)
    b_upstream = upstream_client_id(BOB, b_sid)
    for _ in range(5):
        await fake_comfy.send_binary(b_upstream, a_frame)
        await fake_comfy.send_binary(None, a_frame)
    await fake_comfy.send_binary(b_upstream, b_frame)
    await fake_comfy.broadcast(MARKER)
    assert await frames_until_marker(b_ws) == [("binary", PREVIEW_WITH_METADATA)]
    assert await frames_until_marker(a_ws) == [("binary", PREVIEW_WITH_METADATA)] * 5
    if fragmenting[0]:
        assert fragmenting[0] > 20  # the fragmented run did send its frames fragmented
    await a_ws.close()
    await b_ws.close()
