"""Outputs of the same name on two instances (issue 8): each ComfyUI numbers its outputs on its
own, so two prompts on two instances both write ``output/ComfyUI_00001_.png``. A ``/view`` of a
file the proxy saw a known prompt produce goes to that prompt's instance, the caller's own
prompt first: each user gets their own bytes, whichever was learnt last.

Admins' prompts are not moved under ``users/<owner>/``, so two admins' outputs share one name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from proxy.principal import comfy_user_id
from proxy.tenancy.namespaces import upstream_client_id
from tests.conftest import bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.multi_support import (
    Client,
    Fakes,
    connect,
    fakes,
    get_json,
    multi_proxy,
    place,
    receive_until,
    saving_graph,
)

__all__ = ["fakes", "multi_proxy"]  # fixtures used by name

USERS = ("root-one", "root-two")
NAME = "ComfyUI_00001_.png"
QUERY = f"/view?filename={NAME}&type=output&subfolder="


async def direct(fake: FakeComfyUI) -> bytes:
    async with aiohttp.ClientSession() as session, session.get(fake.url + QUERY) as resp:
        assert resp.status == 200
        return await resp.read()


@pytest.mark.parametrize("learnt_from", ["socket", "history"])
async def test_each_user_gets_their_own_file_of_a_shared_name(
    learnt_from: str, multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy()
    headers = [bearer(user, ("admin",)) for user in USERS]
    owners = [comfy_user_id(user) for user in USERS]
    sockets = []
    if learnt_from == "socket":
        for i, (owner, h) in enumerate(zip(owners, headers, strict=True)):
            ws, _ = await connect(client, h, f"tab-{i}")
            sockets.append(ws)
            for fake in fakes:  # the fan-in reached every instance under the namespaced id
                await fake.wait_socket(upstream_client_id(owner, f"tab-{i}"))

    # The first user's prompt runs on instance 0, the second's on instance 1; each writes
    # output/ComfyUI_00001_.png (the second one learnt last).
    prompt_ids = []
    for i, owner in enumerate(owners):
        client_id = f"tab-{i}" if sockets else ""
        prompt_ids.append(
            await place(client, fakes[i], owner, client_id, prompt=saving_graph("ComfyUI"))
        )
        await fakes[i].wait_idle()
        if sockets:
            done = await receive_until(sockets[i], lambda m: m.get("type") == "executed")
            assert done[-1]["data"]["output"]["images"][0]["filename"] == NAME
        else:
            entry = await get_json(client, f"/history/{prompt_ids[i]}", headers[i])
            images = entry[prompt_ids[i]]["outputs"]["2"]["images"]
            assert images[0]["filename"] == NAME
    mine = [await direct(fakes[0]), await direct(fakes[1])]
    assert mine[0] != mine[1]  # two different images of one name

    for i, h in enumerate(headers):
        for _ in range(2):
            async with client.get(QUERY, headers=h) as resp:
                assert resp.status == 200
                assert await resp.read() == mine[i], f"{USERS[i]} got another instance's file"
    for ws in sockets:
        await ws.close()
