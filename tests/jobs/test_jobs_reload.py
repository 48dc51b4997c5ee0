"""Templates reloaded with the policy by ``POST /admin/reload``: a new file is served at once, a
bad one is answered 422 with every problem and the set in force stays; admins only."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.jobs.support import TEMPLATES, V1, Client, jobs_proxy

ALICE, ADMIN = bearer("alice"), bearer("root", ("admin",))


@pytest.fixture
def templates_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "templates"
    folder.mkdir()
    shutil.copy(Path(TEMPLATES, "upscale.toml"), folder / "upscale.toml")
    return folder


@pytest.fixture
async def client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, templates_dir: Path) -> Client:
    return await jobs_proxy(
        make_proxy, fake_comfy, None, jobs={"templates_dir": str(templates_dir)}
    )


async def _names(client: Client) -> list[str]:
    resp = await client.get(f"{V1}/templates", headers=ALICE)
    return [t["name"] for t in (await resp.json())["templates"]]


async def test_admin_reload_reads_the_templates_again(client: Client, templates_dir: Path) -> None:
    assert await _names(client) == ["upscale"]
    shutil.copy(Path(TEMPLATES, "text-to-image.toml"), templates_dir / "text-to-image.toml")
    resp = await client.post("/admin/reload", headers=ADMIN)
    body = await resp.json()
    assert resp.status == 200, body
    assert body["templates"] == {"version": 2}
    assert await _names(client) == ["text-to-image", "upscale"]


async def test_bad_template_is_422_and_the_set_in_force_stays(
    client: Client, templates_dir: Path
) -> None:
    (templates_dir / "upscale.toml").write_text("broken = [")
    resp = await client.post("/admin/reload", headers=ADMIN)
    body = await resp.json()
    assert resp.status == 422, body
    assert body["error"]["type"] == "templates_invalid"
    assert any("upscale.toml" in p for p in body["error"]["extra_info"]["problems"])
    assert await _names(client) == ["upscale"]


async def test_a_user_cannot_reload(client: Client, templates_dir: Path) -> None:
    shutil.copy(Path(TEMPLATES, "text-to-image.toml"), templates_dir / "text-to-image.toml")
    resp = await client.post("/admin/reload", headers=ALICE)
    assert resp.status == 403
    assert (await resp.json())["error"]["type"] == "forbidden_role"
    assert await _names(client) == ["upscale"]
