"""User-data paths: the proxy's reading equals ComfyUI's, and its serialisation reads back.

ComfyUI's resolution is replayed with the same libraries it uses: an aiohttp router with its
``/userdata/{file}`` and ``/userdata/{file}/move/{dest}`` routes (match values), yarl's query
parsing, and ``urllib.parse.unquote`` where ``app/user_manager.py`` applies it.
"""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import given
from hypothesis import strategies as st
from multidict import MultiDictProxy
from yarl import URL

from proxy.errors import ProxyError
from proxy.routes import normalise_path
from proxy.userdata.handler import UserdataCall, parse_call, upstream_target
from proxy.userdata.paths import UserdataPathError, canonical, strip_prefix

OWN = ("comfygate-users", "bob-0123456789ab")


async def _ok(request: web.Request) -> web.Response:
    return web.Response()


def _comfy_router() -> web.Application:
    app = web.Application()
    app.router.add_get("/api/userdata/{file}", _ok)
    app.router.add_post("/api/userdata/{file}/move/{dest}", _ok)
    return app


COMFY = _comfy_router()


def comfy_file(method: str, raw_path: str, param: str = "file") -> str:
    """The relative path ComfyUI's ``get_user_data_path`` works on for ``raw_path``."""

    async def resolve() -> str:
        info = await COMFY.router.resolve(make_mocked_request(method, raw_path, app=COMFY))
        value = info[param]
        return unquote(value) if "%" in value else value

    return asyncio.run(resolve())


def comfy_query(raw_query: str, name: str) -> str:
    return URL.build(query_string=raw_query, encoded=True).query.get(name, "")


def query(raw: str) -> MultiDictProxy[str]:
    return URL.build(query_string=raw, encoded=True).query


def parsed(method: str, raw: str) -> UserdataCall:
    path, _, raw_query = raw.partition("?")
    return parse_call(method, normalise_path(path)[0], query(raw_query))


# Names a user might give a workflow: any printable text, '%', '+', spaces, unicode.
SEGMENT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\\ufffd"),
    min_size=1,
    max_size=12,
).filter(lambda s: not s.endswith((".", " ")))
SEGMENTS = (
    st.lists(SEGMENT, min_size=1, max_size=4)
    .map(tuple)
    .filter(
        lambda segs: not (segs[0][1:2] == ":" and segs[0][:1].isascii() and segs[0][:1].isalpha())
    )
)


@given(SEGMENTS)
def test_what_the_proxy_sends_is_read_by_comfyui_as_that_path(segments: tuple[str, ...]) -> None:
    joined = "/".join(OWN + segments)
    file_call = UserdataCall("file", "GET", file=segments)
    assert comfy_file("GET", upstream_target(file_call, OWN, "/api")) == joined

    move = UserdataCall("move", "POST", file=segments, dest=segments[::-1])
    target = upstream_target(move, OWN, "/api")
    assert comfy_file("POST", target) == joined
    assert comfy_file("POST", target, "dest") == "/".join(OWN + segments[::-1])

    listing = UserdataCall("list", "GET", file=segments)
    value = comfy_query(upstream_target(listing, OWN, "").partition("?")[2], "dir")
    assert (unquote(value) if "%" in value else value) == joined

    v2 = UserdataCall("list_v2", "GET", file=segments)
    value = unquote(comfy_query(upstream_target(v2, OWN, "").partition("?")[2], "path"))
    assert (unquote(value) if "%" in value else value) == joined


@given(SEGMENTS)
def test_the_proxy_reads_a_request_as_comfyui_does(segments: tuple[str, ...]) -> None:
    """What the proxy decides on for a client's request is the path ComfyUI would use."""
    raw = upstream_target(UserdataCall("file", "GET", file=segments), (), "/api")
    assert comfy_file("GET", raw) == "/".join(segments)
    assert parsed("GET", raw).file == segments
    listing = upstream_target(UserdataCall("list", "GET", file=segments), (), "/api")
    assert parsed("GET", listing).file == segments
    v2 = upstream_target(UserdataCall("list_v2", "GET", file=segments), (), "/api")
    assert parsed("GET", v2).file == segments


@pytest.mark.parametrize(
    "relative",
    [
        *("", "/etc", "..", "a/../b", "a//b", "./a", "a/.", "C:x", "c:/x", "a\\b", "a\x00"),
        *("a\ufffd", ".. /x", "a/.. ", "x./y", "...", "a ", "a/b."),
    ],
)
def test_what_is_not_plainly_a_relative_path_is_refused(relative: str) -> None:
    with pytest.raises(UserdataPathError):
        canonical(relative)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("/api/userdata/%252E%252E%252Fx", 403),
        ("/api/userdata/a%FF", 400),  # not UTF-8: refused when the target is read
        ("/api/userdata?dir=%2F", 403),
        ("/api/v2/userdata?path=%25252E%25252E", 400),
        ("/api/userdata/a/b", 404),
    ],
)
def test_refusals_carry_comfyuis_status(raw: str, status: int) -> None:
    with pytest.raises(ProxyError) as info:
        parsed("GET", raw)
    assert info.value.status == status


def test_a_directory_may_end_with_a_slash_and_v2_may_list_the_root() -> None:
    assert canonical("subgraphs/", directory=True) == ("subgraphs",)
    assert parsed("GET", "/api/v2/userdata?path=").file == ()
    assert parsed("GET", "/api/userdata?dir=subgraphs%2F").file == ("subgraphs",)


def test_answers_are_made_relative_to_the_callers_folder() -> None:
    assert strip_prefix("comfygate-users/bob-0123456789ab/workflows/a.json", OWN) == (
        "workflows/a.json"
    )
    assert strip_prefix("comfygate-users\\bob-0123456789ab\\a.json", OWN) == "a.json"
    assert strip_prefix("comfygate-users/alice/a.json", OWN) is None
    assert strip_prefix("a.json", ()) == "a.json"
