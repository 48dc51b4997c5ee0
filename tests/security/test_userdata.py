"""Saved workflows, settings and ``user.css``: user B never reaches user A's (issue 13, item 9).

Run against the fake ComfyUI in both of its modes: single-user (ComfyUI's default, the README's
quick start: ComfyUI ignores ``Comfy-User`` and everyone is ``default``, so the proxy confines
each non-admin to ``comfygate-users/<comfy_user>/`` and serves ``/settings`` from there) and
``--multi-user`` (ComfyUI keeps users apart on the ``Comfy-User`` the proxy sets). Every attack
asserts on B's answer and on what the fake received; A's own flow is the stock frontend's calls.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from structlog.testing import capture_logs
from yarl import URL

from proxy.principal import comfy_user_id
from proxy.userdata import mode as mode_module
from proxy.userdata.handler import USERDATA
from proxy.userdata.paths import PREFIX_ROOT
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.comfyui.middleware import Received
from tests.integration.multi_support import Fakes, fakes, multi_proxy, relayed
from tests.integration.support import Client

__all__ = ["fakes", "multi_proxy"]  # fixtures used by name

A, B, ROOT = bearer("alice"), bearer("bob"), bearer("root", ("admin",))
ALICE, BOB = comfy_user_id("alice"), comfy_user_id("bob")
SECRET = b'{"nodes": [], "note": "alice only"}'
CSS = b"body { background: #a11ce0; }"


@dataclass
class World:
    """The proxy in front of one fake ComfyUI, A's workflow, settings and user.css saved."""

    client: Client
    fake: FakeComfyUI
    multi_user: bool

    def folder(self, comfy_user: str) -> Path:
        """Where ComfyUI keeps ``comfy_user``'s files."""
        users = Path(self.fake.paths.user)
        if not self.multi_user:
            return users / "default" / PREFIX_ROOT / comfy_user
        ids = [i for i, name in self.fake.userdata.users.items() if name == comfy_user]
        assert len(ids) == 1, self.fake.userdata.users
        return users / ids[0]

    def comfy_id(self, comfy_user: str) -> str:
        return self.folder(comfy_user).name

    def reached_as(self, rec: Received, comfy_user: str) -> None:
        """``rec`` reached ComfyUI as ``comfy_user``'s own request."""
        if self.multi_user:
            assert rec.headers["Comfy-User"] == self.comfy_id(comfy_user)
        else:
            assert f"{PREFIX_ROOT}/{comfy_user}/" in unquote(unquote(unquote(rec.raw_path))) + "/"


def url(client: Client, raw: str) -> URL:
    """A URL sent exactly as written (no requoting)."""
    return URL(f"http://{client.server.host}:{client.server.port}{raw}", encoded=True)


async def call(
    client: Client, method: str, raw: str, headers: dict[str, str], body: bytes | None = None
) -> tuple[int, bytes, Any]:
    async with client.session.request(method, url(client, raw), headers=headers, data=body) as r:
        return r.status, await r.read(), r.headers


def error_type(body: bytes) -> str:
    return str(json.loads(body)["error"]["type"])


@pytest.fixture(params=["single-user", "multi-user"])
async def world(
    request: pytest.FixtureRequest, make_proxy: ProxyFactory, tmp_path: Path
) -> AsyncIterator[World]:
    multi = request.param == "multi-user"
    fake = FakeComfyUI(root=tmp_path / "comfyui", multi_user=multi)
    await fake.start()
    auth = {"comfy_multi_user": True} if multi else {}
    client = await make_proxy(fake.url, token=None, auth=auth)
    w = World(client, fake, multi)
    status, body, _ = await call(
        client, "POST", "/api/userdata/workflows%2Fsecret.json?overwrite=false", A, SECRET
    )
    assert (status, json.loads(body)) == (200, "workflows/secret.json")
    assert (await call(client, "POST", "/api/settings/Comfy.Secret", A, b'"alice"'))[0] == 200
    assert (await call(client, "POST", "/api/userdata/user.css", A, CSS))[0] == 200
    assert (await call(client, "GET", "/api/settings", B))[0] == 200  # B exists upstream too
    assert (w.folder(ALICE) / "workflows" / "secret.json").read_bytes() == SECRET
    fake.received.clear()
    yield w
    await fake.stop()


def a_is_intact(w: World) -> None:
    folder = w.folder(ALICE)
    assert (folder / "workflows" / "secret.json").read_bytes() == SECRET
    assert (folder / "user.css").read_bytes() == CSS
    assert json.loads((folder / "comfy.settings.json").read_bytes()) == {"Comfy.Secret": "alice"}


# -- B's paths that name something outside B's own space: refused before ComfyUI --------------

OUTSIDE = [
    # GET /userdata?dir=  (decoded by yarl, then once more by ComfyUI when a % remains)
    ("GET", f"/api/userdata?dir=..%2F{ALICE}%2Fworkflows&recurse=true&full_info=true", 403),
    ("GET", "/userdata?dir=..", 403),
    ("GET", "/api/userdata?dir=%2E%2E%2F%2E%2E", 403),
    ("GET", "/api/userdata?dir=%252E%252E%252Fworkflows", 403),
    ("GET", "/api/userdata?dir=workflows%2F..%2F..", 403),
    ("GET", "/api/userdata?dir=%2Fetc", 403),
    ("GET", "/api/userdata?dir=C%3A%5Cusers", 403),
    ("GET", "/api/userdata?dir=.", 403),
    ("GET", "/api/userdata?dir=%2F", 403),
    # GET /v2/userdata?path=  (one more unconditional decoding)
    ("GET", "/api/v2/userdata?path=..", 400),
    ("GET", f"/v2/userdata?path=..%2F{ALICE}", 400),
    ("GET", "/api/v2/userdata?path=%252E%252E", 400),
    ("GET", "/api/v2/userdata?path=%25252E%25252E%25252F", 400),
    ("GET", "/api/v2/userdata?path=%2F", 400),
    ("GET", "/api/v2/userdata?path=%255C..", 400),
    # /userdata/{file}: one segment, %2F decoded by aiohttp, decoded again by ComfyUI
    ("GET", f"/api/userdata/..%2F{ALICE}%2Fworkflows%2Fsecret.json", 403),
    ("GET", "/userdata/%2E%2E%2Fdefault%2Fcomfy.settings.json", 403),
    ("GET", "/api/userdata/%252E%252E%252Fsecret.json", 403),
    ("GET", "/api/userdata/%2Fetc%2Fpasswd", 403),
    ("GET", "/api/userdata/a%5C..%5C..%5Cx.json", 403),
    ("GET", "/api/userdata/workflows%2F%2Fx.json", 403),
    # a control character: refused by request-target reading first (tests/security/test_targets.py)
    ("GET", "/api/userdata/x%00.json", 400),
    ("GET", "/api/userdata/%FF.json", 400),  # not UTF-8: as %00
    ("GET", f"/api/userdata/..%20%2F{ALICE}%2Fworkflows%2Fsecret.json", 403),  # ".." on Windows
    ("GET", f"/api/userdata/...%2F{ALICE}%2Fuser.css", 403),
    ("HEAD", f"/api/userdata/..%2F{ALICE}%2Fuser.css", 403),
    ("POST", f"/api/userdata/..%2F{ALICE}%2Fworkflows%2Fsecret.json?overwrite=true", 403),
    ("DELETE", f"/api/userdata/..%2F{ALICE}%2Fworkflows%2Fsecret.json", 403),
    ("DELETE", "/userdata/%252E%252E%252F%252E%252E%252Fx", 403),
    # move: both the source and the destination
    ("POST", f"/api/userdata/workflows%2Fx.json/move/..%2F{ALICE}%2Fworkflows%2Fsecret.json", 403),
    ("POST", f"/api/userdata/..%2F{ALICE}%2Fworkflows%2Fsecret.json/move/workflows%2Fs.json", 403),
    ("POST", "/userdata/workflows%2Fx.json/move/%252E%252E%252Fx.json?overwrite=true", 403),
    # shapes ComfyUI has no route for, and missing parameters
    ("GET", "/api/userdata/workflows/secret.json", 404),
    ("GET", "/api/v2/userdata/workflows", 404),
    ("GET", "/api/settings/a/b", 404),
    ("PUT", "/api/userdata/workflows%2Fsecret.json", 405),
    ("GET", "/api/userdata", 400),
    ("GET", "/api/userdata?dir=", 400),
]


@pytest.mark.parametrize(("method", "raw", "expected"), OUTSIDE)
async def test_b_cannot_name_anything_outside_own_space(
    world: World, method: str, raw: str, expected: int
) -> None:
    status, body, _ = await call(
        world.client, method, raw, B, b"evil" if method == "POST" else None
    )
    assert status == expected, body
    if method != "HEAD":
        want = {403: "bad_userdata_path", 400: "bad_userdata_path", 404: "not_found"}
        if "%00" in raw or "%FF" in raw:
            want[400] = "bad_path"
        assert error_type(body) == want.get(status, "method_not_allowed")
    assert world.fake.received == []  # nothing reached ComfyUI, not even the mode check
    a_is_intact(world)


# -- B's own paths: they land in B's own space ----------------------------------------------

LISTINGS = [
    "/api/userdata?dir=workflows&recurse=true&split=false&full_info=true",
    "/userdata?dir=workflows",
    "/api/userdata?dir=workflows%2F&recurse=true&split=true",
    "/api/v2/userdata?path=",
    "/api/v2/userdata",
    "/v2/userdata?path=workflows",
    "/api/v2/userdata?path=workflows%252F",
    f"/api/userdata?dir={PREFIX_ROOT}%2F{ALICE}%2Fworkflows",
]


@pytest.mark.parametrize("raw", LISTINGS)
async def test_b_lists_only_own(world: World, raw: str) -> None:
    status, body, _ = await call(world.client, "GET", raw, B)
    assert status in (200, 404), body
    assert b"secret" not in body
    assert ALICE.encode() not in body
    assert PREFIX_ROOT.encode() not in body
    (rec,) = relayed(world.fake)
    world.reached_as(rec, BOB)


async def test_only_the_parameters_comfyui_reads_are_sent(world: World) -> None:
    raw = "/api/userdata?dir=workflows&dir=..&recurse=TRUE&split=no&x=%2E%2E&dir=%2F&recurse=0"
    status, _, _ = await call(world.client, "GET", raw, B)
    assert status == 404  # B has no workflows yet
    own = "workflows" if world.multi_user else f"{PREFIX_ROOT}/{BOB}/workflows"
    rec = relayed(world.fake)[-1]
    assert (rec.path, list(rec.query.items())) == (
        "/api/userdata",
        [("dir", own), ("recurse", "true"), ("split", "false")],
    )


async def test_b_reads_writes_moves_and_deletes_only_own(world: World) -> None:
    client, fake = world.client, world.fake
    reads = [
        "/api/userdata/workflows%2Fsecret.json",
        "/userdata/workflows%252Fsecret.json",
        f"/api/userdata/{PREFIX_ROOT}%2F{ALICE}%2Fworkflows%2Fsecret.json",
        "/api/userdata/user.css",
        "/api/userdata/comfy.settings.json",
    ]
    for raw in reads:
        fake.received.clear()
        for method in ("GET", "HEAD"):
            status, body, _ = await call(client, method, raw, B)
            assert status == 404, (raw, body)
        for rec in relayed(fake):
            world.reached_as(rec, BOB)

    # A spoofed Comfy-User is not what ComfyUI sees.
    fake.received.clear()
    spoof = {**B, "Comfy-User": "default" if not world.multi_user else world.comfy_id(ALICE)}
    status, _, _ = await call(client, "GET", "/api/userdata/workflows%2Fsecret.json", spoof)
    assert status == 404
    world.reached_as(relayed(fake)[-1], BOB)

    # Writing over "the same name" writes B's own file.
    fake.received.clear()
    raw = "/api/userdata/workflows%2Fsecret.json?overwrite=true&full_info=true"
    status, body, _ = await call(client, "POST", raw, B, b"bob's")
    assert status == 200
    assert json.loads(body)["path"] == "workflows/secret.json"
    world.reached_as(relayed(fake)[-1], BOB)
    assert (world.folder(BOB) / "workflows" / "secret.json").read_bytes() == b"bob's"

    # Moving onto "the same name", then deleting it: B's own files only.
    raw = "/api/userdata/workflows%2Fsecret.json/move/workflows%2Fmoved.json?overwrite=true"
    status, body, _ = await call(client, "POST", raw, B)
    assert (status, json.loads(body)) == (200, "workflows/moved.json")
    raw = "/api/userdata/workflows%2Fmoved.json/move/workflows%2Fsecret.json?overwrite=true"
    assert (await call(client, "POST", raw, B))[0] == 200
    assert (await call(client, "DELETE", "/api/userdata/workflows%2Fsecret.json", B))[0] == 204
    assert (await call(client, "DELETE", "/api/userdata/workflows%2Fsecret.json", B))[0] == 404
    for rec in relayed(fake):
        world.reached_as(rec, BOB)
    a_is_intact(world)
    status, body, _ = await call(client, "GET", "/api/userdata/workflows%2Fsecret.json", A)
    assert (status, body) == (200, SECRET)


async def test_b_reads_and_writes_only_own_settings(world: World) -> None:
    client, fake = world.client, world.fake
    status, body, _ = await call(client, "GET", "/api/settings", B)
    assert (status, json.loads(body)) == (200, {})
    status, body, _ = await call(client, "GET", "/settings/Comfy.Secret", B)
    assert (status, json.loads(body)) == (200, None)
    assert (await call(client, "POST", "/api/settings", B, b'{"Comfy.Secret": "bob"}'))[0] == 200
    assert (await call(client, "POST", "/api/settings/Comfy.Secret", B, b'"bob2"'))[0] == 200
    status, body, _ = await call(client, "GET", "/api/settings", B)
    assert json.loads(body) == {"Comfy.Secret": "bob2"}
    for rec in relayed(fake):
        world.reached_as(rec, BOB)
    status, body, _ = await call(client, "GET", "/api/settings/Comfy.Secret", A)
    assert json.loads(body) == "alice"
    a_is_intact(world)


# -- A's own flow: the stock frontend's calls -----------------------------------------------


async def test_stock_frontend_flow_of_one_user(world: World) -> None:
    client, fake = world.client, world.fake
    C = bearer("carol")
    status, body, _ = await call(client, "GET", "/api/users", C)
    assert json.loads(body) == {"storage": "server", "migrated": True}
    assert json.loads((await call(client, "GET", "/api/settings", C))[1]) == {}
    status, body, _ = await call(client, "POST", "/api/settings/Comfy.InstalledVersion", C, b'"1"')
    assert (status, body) == (200, b"")
    body = b'{"Comfy.TutorialCompleted": true, "Comfy.Theme": "dark"}'
    assert (await call(client, "POST", "/api/settings", C, body))[0] == 200
    assert json.loads((await call(client, "GET", "/api/settings", C))[1]) == {
        "Comfy.InstalledVersion": "1",
        "Comfy.TutorialCompleted": True,
        "Comfy.Theme": "dark",
    }
    assert json.loads((await call(client, "GET", "/api/settings/Comfy.Theme", C))[1]) == "dark"

    listing = "/api/userdata?dir=workflows&recurse=true&split=false&full_info=true"
    status, body, _ = await call(client, "GET", listing, C)
    assert (status, body) == (404, b"Directory not found")  # as on a fresh ComfyUI
    save = "/api/userdata/workflows%2FMy%20flow.json?overwrite=false&full_info=true"
    status, body, _ = await call(client, "POST", save, C, SECRET)
    assert status == 200
    assert json.loads(body)["path"] == "workflows/My flow.json"
    assert json.loads(body)["size"] == len(SECRET)
    status, body, _ = await call(client, "POST", save, C, SECRET)
    assert (status, body) == (409, b"File already exists")
    status, body, _ = await call(client, "GET", listing, C)
    assert [e["path"] for e in json.loads(body)] == ["My flow.json"]
    status, body, _ = await call(client, "GET", "/api/userdata/workflows%2FMy%20flow.json", C)
    assert (status, body) == (200, SECRET)

    rename = (
        "/api/userdata/workflows%2FMy%20flow.json/move/workflows%2Fdone%2050%25.json"
        "?overwrite=false&full_info=true"
    )
    status, body, _ = await call(client, "POST", rename, C)
    assert (status, json.loads(body)["path"]) == (200, "workflows/done 50%.json")
    status, body, _ = await call(client, "GET", "/api/userdata/workflows%2Fdone%2050%25.json", C)
    assert (status, body) == (200, SECRET)
    status, body, _ = await call(client, "GET", "/api/v2/userdata?path=", C)
    assert [(e["path"], e["type"]) for e in json.loads(body)] == [
        ("workflows", "directory"),
        ("comfy.settings.json", "file"),
        ("workflows/done 50%.json", "file"),
    ]
    status, body, _ = await call(client, "GET", "/api/v2/userdata?path=workflows", C)
    assert [e["path"] for e in json.loads(body)] == ["workflows/done 50%.json"]

    assert (await call(client, "POST", "/api/userdata/user.css", C, CSS))[0] == 200
    status, body, headers = await call(client, "GET", "/api/userdata/user.css", C)
    assert (status, body) == (200, CSS)
    assert headers["Content-Type"].startswith("text/css")

    subgraphs = "/api/userdata?dir=subgraphs%2F&recurse=true&split=false&full_info=true"
    assert (await call(client, "GET", subgraphs, C))[0] == 404
    delete = "/api/userdata/workflows%2Fdone%2050%25.json"
    assert (await call(client, "DELETE", delete, C))[0] == 204
    status, body, _ = await call(client, "GET", listing, C)
    assert (status, json.loads(body)) == (200, [])

    folder = world.folder(comfy_user_id("carol"))
    assert sorted(p.name for p in folder.iterdir()) == [
        "comfy.settings.json",
        "user.css",
        "workflows",
    ]
    for rec in relayed(fake):
        world.reached_as(rec, comfy_user_id("carol"))
    a_is_intact(world)


async def test_concurrent_settings_changes_of_one_user_all_land(world: World) -> None:
    client = world.client
    await asyncio.gather(
        *(call(client, "POST", f"/api/settings/K{i}", B, str(i).encode()) for i in range(12))
    )
    _, body, _ = await call(client, "GET", "/api/settings", B)
    assert json.loads(body) == {f"K{i}": i for i in range(12)}


@pytest.mark.parametrize(
    ("raw", "body"),
    [("/api/settings", b"[1, 2]"), ("/api/settings", b"{nope"), ("/settings/X", b"NaN")],
)
async def test_unreadable_settings_bodies_are_refused(world: World, raw: str, body: bytes) -> None:
    status, answer, _ = await call(world.client, "POST", raw, B, body)
    if world.multi_user:  # ComfyUI's own AppSettings reads them
        return
    assert (status, error_type(answer)) == (400, "bad_settings")
    assert relayed(world.fake) == []


async def test_a_settings_file_that_is_not_an_object_is_reported(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(fake_comfy.url, token=None)
    assert (await call(client, "POST", "/api/userdata/comfy.settings.json", A, b"[]"))[0] == 200
    status, body, _ = await call(client, "GET", "/api/settings", A)
    assert (status, error_type(body)) == (502, "settings_unreadable")


# -- admins keep the real view -------------------------------------------------------------


async def test_admins_see_comfyuis_real_user_directory(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(fake_comfy.url, token=None)
    raw = "/api/userdata/workflows%2Fsecret.json?overwrite=false"
    for who in (A, B):
        assert (await call(client, "POST", raw, who, SECRET))[0] == 200
    _, body, _ = await call(client, "GET", f"/api/v2/userdata?path={PREFIX_ROOT}", ROOT)
    assert {e["name"] for e in json.loads(body) if e["type"] == "directory"} >= {ALICE, BOB}
    raw = f"/api/userdata/{PREFIX_ROOT}%2F{ALICE}%2Fworkflows%2Fsecret.json"
    assert (await call(client, "GET", raw, ROOT))[:2] == (200, SECRET)
    assert fake_comfy.received[-1].raw_path == raw


# -- knowing which mode ComfyUI runs in --------------------------------------------------------


@pytest.mark.parametrize("multi", [False, True])
async def test_startup_says_whether_comfyui_keeps_users_apart(
    make_proxy: ProxyFactory, tmp_path: Path, multi: bool
) -> None:
    fake = FakeComfyUI(root=tmp_path / "c", multi_user=multi)
    await fake.start()
    try:
        with capture_logs() as logs:
            client = await make_proxy(
                fake.url, token=None, upstream={"check_multi_user_at_startup": True}
            )
            startup = client.app[USERDATA].modes.startup
            assert startup is not None
            await startup
        events = {e["event"]: e for e in logs}
        if multi:
            assert "comfyui_multi_user" in events
            assert "comfyui_single_user" not in events
        else:
            warning = events["comfyui_single_user"]
            assert warning["log_level"] == "warning"
            assert "--multi-user" in warning["detail"]
        assert [r.path for r in fake.received] == ["/users"]
    finally:
        await fake.stop()


async def test_comfyui_restarted_without_multi_user_is_noticed(
    make_proxy: ProxyFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeComfyUI(root=tmp_path / "c", multi_user=True)
    await fake.start()
    try:
        client = await make_proxy(fake.url, token=None, auth={"comfy_multi_user": True})
        assert (await call(client, "GET", "/api/userdata?dir=workflows", B))[0] == 404
        assert "comfygate-users" not in fake.received[-1].raw_path
        monkeypatch.setattr(mode_module, "RECHECK_SECONDS", 0.0)
        fake.multi_user = False  # ComfyUI now ignores Comfy-User: everyone is "default"
        fake.userdata.users = {"default": "default"}
        with capture_logs() as logs:
            assert (await call(client, "GET", "/api/userdata?dir=workflows", B))[0] == 404
        assert fake.received[-1].query["dir"] == f"{PREFIX_ROOT}/{BOB}/workflows"
        assert any(e["event"] == "comfyui_single_user" and e["changed"] for e in logs)
    finally:
        await fake.stop()


async def test_an_unreadable_users_answer_counts_as_single_user(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(fake_comfy.url, token=None)
    fake_comfy.fail_status = 500
    status, _, _ = await call(client, "GET", "/api/userdata?dir=workflows", B)
    assert status == 500  # ComfyUI's (fake) failure, relayed
    assert fake_comfy.received[0].path == "/users"
    assert fake_comfy.received[-1].query["dir"] == f"{PREFIX_ROOT}/{BOB}/workflows"


# -- several instances: user data lives on the home instance --------------------------------


async def test_user_data_of_several_instances_stays_per_user_on_home(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy(upstream={"home": fakes.name(1)})
    raw = "/api/userdata/workflows%2Fsecret.json?overwrite=false"
    assert (await call(client, "POST", raw, A, SECRET))[0] == 200
    assert (await call(client, "POST", "/api/settings/Comfy.Secret", A, b'"alice"'))[0] == 200
    for fake in fakes:
        fake.received.clear()
    assert (await call(client, "GET", "/api/userdata/workflows%2Fsecret.json", B))[0] == 404
    status, body, _ = await call(client, "GET", "/api/v2/userdata", B)
    assert status == 200
    assert [e["type"] for e in json.loads(body)] == ["directory"]  # B's own empty workflows/
    assert json.loads((await call(client, "GET", "/api/settings", B))[1]) == {}
    status, _, _ = await call(client, "GET", f"/api/userdata/..%2F{ALICE}%2Fuser.css", B)
    assert status == 403
    assert not relayed(fakes[0])
    assert not relayed(fakes[2])
    for rec in relayed(fakes[1]):
        assert f"{PREFIX_ROOT}/{BOB}" in unquote(unquote(unquote(rec.raw_path)))
    home = Path(fakes[1].paths.user) / "default" / PREFIX_ROOT / ALICE
    assert (home / "workflows" / "secret.json").read_bytes() == SECRET
