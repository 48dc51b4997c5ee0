"""Request targets: what the proxy decides on is what ComfyUI routes (issue 13, item 1).

ComfyUI's aiohttp routes an absolute-form target (``GET http://x/internal/logs``) on the URL's
path; the proxy used to classify the whole target as rule ``other`` and forward it verbatim, so
every route decision was skipped. Now the proxy reads the target once (``proxy.target``):
absolute-form naming this server (its ``Host``, or ``server.public_url``) with an http(s) scheme
is reduced to origin-form and decided like it; any other authority or scheme, ``*`` and
CONNECT's authority-form are refused with 400 ``bad_request_target``. ComfyUI is sent the
proxy's own serialisation of what it decided on.

The deployment is the README's: JWT, isolation, workflow policy, rate limits in Redis. User B
(``bob``) attacks admin-only routes and user A's (``alice``) work; every case asserts on B's
answer and on what the fake ComfyUI received. The property-based test at the end checks, for
generated targets, that the proxy's rule is the one ComfyUI's router resolves for the target
the fake actually received.
"""

from __future__ import annotations

import asyncio
import json
import os
import string
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from yarl import URL

from proxy.routes import _UNREADABLE
from proxy.target import Target, canonical_target
from tests.conftest import ProxyFactory, bearer
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.comfyui.middleware import Received
from tests.integration.multi_support import Fakes, fakes, multi_proxy, place, relayed
from tests.security.raw_http import exchange, host_of
from tests.support.gateway_queue import settled

Client = TestClient[Any, Any]
__all__ = ["fakes", "multi_proxy"]  # fixtures of the multi-instance tests, used here
A, B = bearer("alice"), bearer("bob")
VIEWER = bearer("vic", ("viewer",))
ADMIN = bearer("admin", ("admin",))
FOREIGN = ["http://x", "https://comfyui.internal:8188", "http://127.0.0.1:8188", "HTTP://x"]
OTHER_SCHEMES = ["ftp", "ws", "wss", "file", "gopher", "comfy"]


@pytest.fixture
async def client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str) -> Client:
    """The README's deployment: JWT, isolation, policy (on by default), Redis rate limits."""
    return await make_proxy(fake_comfy.url, token=None, redis={"url": redis_url})


def auth(headers: dict[str, str]) -> list[tuple[str, str]]:
    return list(headers.items())


def prompt_body(prefix: str = "mine", *, node: str = "SaveImage") -> bytes:
    graph = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0x123456},
        },
        "9": {"class_type": node, "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }
    return json.dumps({"prompt": graph, "client_id": "tab"}).encode()


JSON = [("Content-Type", "application/json")]


async def alice_output(client: Client, fake: FakeComfyUI) -> tuple[str, str]:
    """A saves one image through the proxy; its (subfolder, file name) in output/."""
    answer = await exchange(client, "POST", "/prompt", auth(A) + JSON, prompt_body())
    assert answer.status == 200, answer.body
    await settled(client, fake)
    [folder] = os.listdir(os.path.join(fake.paths.output, "users"))
    [name] = os.listdir(os.path.join(fake.paths.output, "users", folder))
    fake.reset()
    return f"users/{folder}", name


# -- the fake routes absolute-form the way ComfyUI's aiohttp does --------------------------------


async def test_the_fake_routes_absolute_form_on_the_urls_path(fake_comfy: FakeComfyUI) -> None:
    """Why the attack worked: straight to ComfyUI, ``GET http://x/internal/logs`` is the logs."""
    reader, writer = await asyncio.open_connection(fake_comfy.host, fake_comfy.port)
    request = "GET http://x/internal/logs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    writer.write(request.encode())
    raw = await reader.read()
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"ComfyUI version" in raw
    assert fake_comfy.received[-1].route == "/internal/logs"


# -- absolute-form naming another server, or another scheme: refused ------------------------------

ATTACKS = [
    ("GET", "/internal/logs"),
    ("GET", "/api/internal/logs"),
    ("GET", "/history"),
    ("GET", "/api/view?filename=x.png&subfolder=users/a&type=output"),
    ("GET", "/internal/files/output"),
    ("POST", "/free"),
    ("POST", "/api/prompt"),
]


@pytest.mark.parametrize(("method", "path"), ATTACKS)
@pytest.mark.parametrize("authority", FOREIGN)
async def test_absolute_form_naming_another_server_is_refused(
    method: str, path: str, authority: str, client: Client, fake_comfy: FakeComfyUI
) -> None:
    body = prompt_body() if path.endswith("prompt") else b""
    answer = await exchange(client, method, authority + path, auth(B) + JSON, body)
    assert answer.status == 400, answer.body
    assert answer.error_type == "bad_request_target"
    assert fake_comfy.received == []


@pytest.mark.parametrize(("method", "path"), ATTACKS)
@pytest.mark.parametrize("scheme", OTHER_SCHEMES)
async def test_other_schemes_are_refused_even_for_this_server(
    method: str, path: str, scheme: str, client: Client, fake_comfy: FakeComfyUI
) -> None:
    body = prompt_body() if path.endswith("prompt") else b""
    target = f"{scheme}://{host_of(client)}{path}"
    answer = await exchange(client, method, target, auth(B) + JSON, body)
    assert answer.status == 400, answer.body
    assert answer.error_type == "bad_request_target"
    assert fake_comfy.received == []


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("OPTIONS", "*"),
        ("CONNECT", "{host}"),
        ("GET", "http:/{host}/internal/logs"),  # no authority
        ("GET", "http:///internal/logs"),
        ("GET", "http://user@{host}/internal/logs"),  # userinfo: not this server's authority
        ("GET", "internal/logs"),
        ("GET", "{host}/internal/logs"),
    ],
)
async def test_other_target_forms_are_refused(
    method: str, target: str, client: Client, fake_comfy: FakeComfyUI
) -> None:
    answer = await exchange(client, method, target.format(host=host_of(client)), auth(ADMIN))
    assert answer.status == 400, answer.body
    assert answer.error_type in ("bad_request_target", None)  # None: aiohttp's own 400
    assert fake_comfy.received == []


# -- absolute-form naming this server: decided exactly as origin-form -----------------------------


def own(client: Client, path: str, *, scheme: str = "http") -> str:
    return f"{scheme}://{host_of(client)}{path}"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        # (not /internal/logs, /logs/raw, /folder_paths: the frontend calls them itself and a
        # regular user gets an empty answer, never forwarded - tests/security/test_clients.py)
        ("GET", "/internal/files/output"),
        ("GET", "/api/internal/files/input"),
        ("POST", "/internal/logs"),
        ("POST", "/free"),
        ("POST", "/api/free"),
        ("GET", "/api/manager/queue/status"),
        # ComfyUI-Manager v4's routes (install custom nodes) under /v2
        ("POST", "/api/v2/manager/queue/install"),
        ("GET", "/api/v2/customnode/getlist"),
        ("POST", "/v2/snapshot/restore"),
        ("POST", "/api/v2/externalmodel/getlist"),
        ("GET", "/api/v2/comfyui_manager/comfyui_versions"),
    ],
)
@pytest.mark.parametrize("scheme", ["http", "https", "HTTP"])
async def test_own_absolute_form_of_admin_routes_is_refused_like_origin_form(
    method: str, path: str, scheme: str, client: Client, fake_comfy: FakeComfyUI
) -> None:
    origin = await exchange(client, method, path, auth(B))
    absolute = await exchange(client, method, own(client, path, scheme=scheme), auth(B))
    assert origin.status == absolute.status == 403
    assert origin.error_type == absolute.error_type == "forbidden_role"
    assert fake_comfy.received == []


async def test_public_url_authority_is_this_server(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI
) -> None:
    client = await make_proxy(
        fake_comfy.url, token=None, server={"public_url": "https://comfy.example.com"}
    )
    answer = await exchange(
        client, "GET", "https://comfy.example.com/internal/files/output", auth(B)
    )
    assert (answer.status, answer.error_type) == (403, "forbidden_role")
    answer = await exchange(
        client, "GET", "https://comfy.example.com:443/api/system_stats", auth(B)
    )
    assert answer.status == 200
    assert fake_comfy.received[-1].raw_path == "/api/system_stats"
    assert fake_comfy.received[-1].headers["Host"] == fake_comfy.url.removeprefix("http://")


async def test_everyones_history_stays_filtered(client: Client, fake_comfy: FakeComfyUI) -> None:
    answer = await exchange(client, "POST", "/prompt", auth(A) + JSON, prompt_body())
    a_prompt = answer.json()["prompt_id"]
    await settled(client, fake_comfy)
    fake_comfy.reset()
    for target in (own(client, "/history"), own(client, "/api/history?max_items=50")):
        answer = await exchange(client, "GET", target, auth(B))
        assert answer.status == 200
        assert a_prompt not in answer.body.decode()
        assert answer.json() == {}
    # B owns no prompt: the view is built from B's own prompts (none), ComfyUI is not asked.
    assert fake_comfy.received == []
    answer = await exchange(client, "GET", own(client, f"/history/{a_prompt}"), auth(B))
    assert answer.status in (200, 404)
    assert a_prompt not in answer.body.decode()


async def test_another_users_file_stays_hidden(client: Client, fake_comfy: FakeComfyUI) -> None:
    subfolder, name = await alice_output(client, fake_comfy)
    query = f"?filename={name}&subfolder={subfolder}&type=output"
    for target in (own(client, "/view" + query), own(client, "/api/view" + query)):
        answer = await exchange(client, "GET", target, auth(B))
        assert answer.status == 404, target
    assert fake_comfy.received == []
    # Its owner still gets it the same way.
    answer = await exchange(client, "GET", own(client, "/api/view" + query), auth(A))
    assert answer.status == 200
    assert answer.body.startswith(b"\x89PNG")
    assert fake_comfy.received[-1].raw_path.startswith("/api/view?filename=")


async def test_absolute_form_prompt_is_policed_isolated_and_limited(
    make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, redis_url: str
) -> None:
    client = await make_proxy(
        fake_comfy.url,
        token=None,
        redis={"url": redis_url},
        # Four submissions (refused ones spend too: the limit runs before policy and isolation).
        rate_limits={"default": {"submit": {"rate": "1/hour", "burst": 4}}},
    )
    target = own(client, "/api/prompt")
    # A viewer may not queue at all.
    answer = await exchange(client, "POST", target, auth(VIEWER) + JSON, prompt_body())
    assert (answer.status, answer.error_type) == (403, "forbidden_role")
    # The policy applies: a node the user's policy does not allow.
    refused = prompt_body(node="NotAllowedByPolicy")
    origin = await exchange(client, "POST", "/prompt", auth(B) + JSON, refused)
    absolute = await exchange(client, "POST", target, auth(B) + JSON, refused)
    assert origin.status == absolute.status == 400
    assert origin.error_type == absolute.error_type
    assert prompts(fake_comfy) == []  # (the proxy itself fetched /object_info to judge them)
    # Isolation rewrites it into B's folder; the rate limit counts it.
    answer = await exchange(client, "POST", target, auth(B) + JSON, prompt_body("../escape"))
    assert answer.status == 400  # isolation refuses an escaping prefix, as for origin-form
    answer = await exchange(client, "POST", target, auth(B) + JSON, prompt_body("mine"))
    assert answer.status == 200, answer.body
    [got] = prompts(fake_comfy)
    assert got.raw_path == "/api/prompt"
    prefix = json.loads(got.body)["prompt"]["9"]["inputs"]["filename_prefix"]
    assert prefix.startswith("users/")
    assert prefix.endswith("/mine")
    answer = await exchange(client, "POST", target, auth(B) + JSON, prompt_body("again"))
    assert (answer.status, answer.error_type) == (429, "rate_limited")
    assert len(prompts(fake_comfy)) == 1


def prompts(fake: FakeComfyUI) -> list[Received]:
    """What the fake received on its /prompt route (not the proxy's own catalog reads)."""
    return [r for r in fake.received if r.path.endswith("/prompt")]


# -- origin-form evasions: decided on what ComfyUI routes -----------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/api/%69nternal/files/output",
        "//internal//files//output",
        "/api//api/internal/files/output",
        "/%61pi/internal/files/output",
        "/internal/files/output;x=1",
        "/internal/files/output#frag",
        "/internal/files/output?x=%2F..%2F",
        "http://{host}//api/%69nternal/files/output",
    ],
)
async def test_encoded_admin_routes_are_refused(
    target: str, client: Client, fake_comfy: FakeComfyUI
) -> None:
    answer = await exchange(client, "GET", target.format(host=host_of(client)), auth(B))
    assert (answer.status, answer.error_type) == (403, "forbidden_role")
    assert fake_comfy.received == []


@pytest.mark.parametrize(
    ("target", "error_type"),
    [
        ("/api/%2e%2e/internal/logs", "bad_path"),
        ("/view/../internal/logs", "bad_path"),
        ("/internal/%FF", "bad_path"),  # not UTF-8: aiohttp would keep the escape undecoded
        ("/internal/%zz", "bad_path"),
        ("/internal/logs%00", "bad_path"),
        ("/view?filename=%FF%FE", None),  # the query: decoded as yarl does (U+FFFD), re-encoded
    ],
)
async def test_unreadable_paths_are_refused(
    target: str, error_type: str | None, client: Client, fake_comfy: FakeComfyUI
) -> None:
    answer = await exchange(client, "GET", target, auth(ADMIN))
    if error_type is None:
        assert fake_comfy.received[-1].raw_path == "/view?filename=%EF%BF%BD%EF%BF%BD"
        return
    assert (answer.status, answer.error_type) == (400, error_type)
    assert fake_comfy.received == []


async def test_encoded_slash_and_separators_are_forwarded_as_decided(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """``%2F`` stays one segment, ``%3F``/``%23`` stay in the path: the proxy re-encodes them,
    so ComfyUI routes exactly what the proxy classified (here: nothing of the logs)."""
    for target, forwarded in [
        ("/internal%2Flogs", "/internal%2Flogs"),
        ("/internal%3Flogs", "/internal%3Flogs"),
        ("/internal%23logs", "/internal%23logs"),
        ("/extensions/a%5Cb%20c%C3%A9.js", "/extensions/a%5Cb%20c%C3%A9.js"),
    ]:
        answer = await exchange(client, "GET", target, auth(ADMIN))
        got = fake_comfy.received[-1]
        assert got.raw_path == forwarded
        assert got.route != "/internal/logs"
        assert b"ComfyUI version" not in answer.body


# -- the property: the proxy's rule is the rule ComfyUI's router resolves ------------------------

# The fake's routes (``Received.route``, its resource's canonical path without one "/api") and
# the proxy rule each belongs to. Written out by hand: this table is the oracle, not a copy of
# proxy.routes; a route added to the fake without an entry here fails the test.
ORACLE: dict[str, str] = {
    "/ws": "ws",
    "/": "static",
    "/embeddings": "models",
    "/models": "models",
    "/models/{folder}": "models",
    "/extensions": "static",
    "/system_stats": "system_stats",
    "/features": "system_stats",
    "/object_info": "object_info",
    "/object_info/{node_class}": "object_info",
    "/i18n": "other",
    "/workflow_templates": "other",
    "/experiment/models": "models",
    "/experiment/models/{folder}": "models",
    "/experiment/models/preview/{folder}/{path_index}/{filename}": "models",
    "/prompt": "prompt",
    "/queue": "queue",
    "/interrupt": "interrupt",
    "/free": "free",
    "/history": "history",
    "/history/{prompt_id}": "history",
    "/api/jobs": "jobs",
    "/api/jobs/{job_id}": "jobs",
    "/api/jobs/{job_id}/cancel": "jobs",
    "/api/jobs/cancel": "jobs",
    "/view": "view",
    "/view_metadata/{folder_name}": "view",
    "/upload/image": "upload",
    "/upload/mask": "upload",
    "/users": "users",
    "/settings": "settings",
    "/settings/{id}": "settings",
    "/userdata": "userdata",
    "/v2/userdata": "userdata",
    "/userdata/{file}": "userdata",
    "/userdata/{file}/move/{dest}": "userdata",
    "/internal/logs": "internal",
    "/internal/logs/raw": "internal",
    "/internal/logs/subscribe": "internal",
    "/internal/folder_paths": "internal",
    "/internal/files/{directory_type}": "internal",
    "/templates": "static",
}
TARGET_ERRORS = frozenset({"bad_request_target", "bad_path"})


def oracle_rule(route: str) -> str | None:
    """The rule of the route ComfyUI resolved; None for its web root's static files (a file or
    404: nothing runs, so any decision of the proxy is safe - ``/jobs`` without ``/api``, the
    assets API and Manager the fake does not have, files)."""
    if route == "":
        return None
    if route in ORACLE:  # routes registered with their own /api (jobs), or none
        return ORACLE[route]
    unprefixed = route.removeprefix("/api") or "/"
    return ORACLE[unprefixed if unprefixed in ORACLE else route]


STEMS = [
    "/ws",
    "/",
    "/prompt",
    "/queue",
    "/interrupt",
    "/free",
    "/history",
    "/history/{x}",
    "/jobs",
    "/jobs/{x}",
    "/jobs/{x}/cancel",
    "/view",
    "/view_metadata/{x}",
    "/upload/image",
    "/upload/mask",
    "/object_info",
    "/object_info/{x}",
    "/models",
    "/models/{x}",
    "/embeddings",
    "/experiment/models/{x}",
    "/experiment/models/preview/{x}/{x}/{x}",
    "/system_stats",
    "/features",
    "/settings",
    "/settings/{x}",
    "/userdata",
    "/userdata/{x}",
    "/userdata/{x}/move/{x}",
    "/v2/userdata",
    "/internal/logs",
    "/internal/logs/raw",
    "/internal/folder_paths",
    "/internal/files/{x}",
    "/i18n",
    "/extensions",
    "/extensions/{x}",
    "/templates/{x}",
    "/assets",
    "/assets/{x}",
    "/manager/{x}",
    "/{x}",
    "/{x}/{x}",
]
SEGMENT_CHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@ é\\?#%/"


def encode_char(c: str, how: int) -> str:
    """``how``: 0 raw where the request line allows it, 1 upper-case escape, 2 lower-case."""
    # Raw: '/' separates segments (so it is escaped only when asked to be); aiohttp's parser
    # refuses a raw space or non-ASCII character, and '?', '#', '%' would change the target.
    must = c in " ?#%" or not c.isascii() or (c == "/" and how)
    if how == 0 and not must:
        return c
    return "".join(f"%{b:02X}" if how != 2 else f"%{b:02x}" for b in c.encode())


@st.composite
def segments(draw: st.DrawFn) -> str:
    text = draw(st.text(SEGMENT_CHARS, min_size=1, max_size=8))
    return "".join(encode_char(c, draw(st.integers(0, 2))) for c in text)


@st.composite
def request_targets(draw: st.DrawFn) -> tuple[str, str]:
    """(form, target): an origin-form path with prefixes, encodings and repeated slashes, and
    how it is sent (origin-form, or absolute-form with this server's authority)."""
    stem = draw(st.sampled_from(STEMS))
    if draw(st.booleans()):  # escape some letters of the route's own name
        stem = "".join(
            encode_char(c, 1) if c.isalpha() and c != "x" and draw(st.integers(0, 5)) == 0 else c
            for c in stem
        )
    while "{x}" in stem:
        stem = stem.replace("{x}", draw(segments()), 1)
    prefix = draw(st.sampled_from(["", "", "/api", "/api/api", "/%61pi", "/API"]))
    path = prefix + stem
    if draw(st.booleans()):
        path = path.replace("/", "//", draw(st.integers(1, 3)))
    if draw(st.booleans()):
        path += "?" + draw(
            st.sampled_from(["a=1", "filename=x.png&type=output", "x=%2F&y=a+b", "token=t"])
        )
    form = draw(st.sampled_from(["origin", "origin", "http", "https"]))
    return form, path


def refusal_expected(path: str) -> bool:
    """Dot segments (plain or encoded) are refused; the generator makes no other bad path."""
    decoded = URL.build(path=path.partition("?")[0], encoded=True).path_safe
    return "." in decoded.split("/") or ".." in decoded.split("/")


@pytest.fixture
async def open_client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI) -> Client:
    """Only routing: no isolation, policy or rate limit may refuse what routing let through."""
    return await make_proxy(
        fake_comfy.url,
        token=None,
        isolation={"enabled": False},
        policy={"enabled": False},
        rate_limits={"enabled": False},
    )


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=request_targets(), method=st.sampled_from(["GET", "POST", "DELETE"]))
async def test_proxy_rule_is_the_rule_comfyui_routes(
    case: tuple[str, str], method: str, open_client: Client, fake_comfy: FakeComfyUI
) -> None:
    form, path = case
    target = path if form == "origin" else f"{form}://{host_of(open_client)}{path}"
    fake_comfy.reset()
    with capture_logs() as logs:
        answer = await exchange(open_client, method, target, auth(ADMIN))
    [decision] = [e for e in logs if e.get("event") == "request_finished"]
    refused = decision.get("error") in TARGET_ERRORS
    assert refused == refusal_expected(path), (target, answer.status, answer.body[:200])
    received = [r for r in fake_comfy.received if not r.path.startswith("/__fake__")]
    if refused:
        assert answer.status == 400
        assert received == []
        return
    if not received and decision.get("error") in ("invalid_prompt", "invalid_body"):
        # An inspected route's empty body: refused by the body rule (tests/security/
        # test_resource_bounds.py), after routing decided the rule.
        assert decision["rule"] in ("prompt", "queue", "history", "interrupt", "jobs"), decision
        return
    if not received:  # answered by the proxy itself (users, the cached catalog, user data
        # route shapes or methods ComfyUI does not have: refused before it)
        assert decision["rule"] in ("users", "object_info", "models", "settings", "userdata"), (
            decision
        )
        return
    got = received[-1]
    assert got.raw_path == got.raw_path.strip()
    assert not got.raw_path.startswith("http")  # ComfyUI only ever gets origin-form
    if got.route is None:  # ComfyUI's router refuses it (404/405): nothing runs
        return
    expected = oracle_rule(got.route)
    if expected is not None:
        assert decision["rule"] == expected, (target, got.raw_path, got.route)


# -- several instances: merged views get the same canonical target -------------------------------


async def test_merged_views_decide_on_the_canonical_target(
    multi_proxy: Callable[..., Any], fakes: Fakes
) -> None:
    client: Client = await multi_proxy()
    a_prompt = await place(client, fakes[1], "alice")
    for fake in fakes:
        fake.reset()
    answer = await exchange(client, "GET", "http://x/api/history", auth(B))
    assert (answer.status, answer.error_type) == (400, "bad_request_target")
    answer = await exchange(client, "GET", own(client, "/internal/files/output"), auth(B))
    assert (answer.status, answer.error_type) == (403, "forbidden_role")
    assert all(relayed(fake) == [] for fake in fakes)
    for path in ("/api/history", "//api/%68istory", "/api/jobs", "/api/queue"):
        answer = await exchange(client, "GET", own(client, path), auth(B))
        assert answer.status == 200, (path, answer.body)
        assert a_prompt not in answer.body.decode(), path
    sent = {r.raw_path.partition("?")[0] for fake in fakes for r in relayed(fake)}
    assert sent <= {"/api/history", "/api/jobs", "/api/queue"}, sent


# -- the canonical form reads back as itself ----------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(
    path=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=4),
    query=st.lists(st.tuples(st.text(max_size=5), st.text(max_size=5)), max_size=3),
    prefixed=st.booleans(),
)
def test_forwarded_target_reads_back_as_what_was_decided(
    path: list[str], query: list[tuple[str, str]], prefixed: bool
) -> None:
    """Whatever the decoded segments and parameters, the target ComfyUI receives decodes (as
    aiohttp's router and ``rel_url.query`` decode it) to exactly the decision's path and query:
    ``%2F`` and ``%25`` inside a segment, ``?``, ``#``, ``+``, ``&``, ``=`` and non-ASCII
    included."""
    segments = [s.replace("%", "%25").replace("/", "%2F") for s in path]  # path_safe form
    decided = Target(path="/" + "/".join(segments), prefixed=prefixed, query=tuple(query))
    try:
        sent = decided.upstream
    except UnicodeEncodeError:  # lone surrogates: never in a decided target (refused)
        return
    if _UNREADABLE.search(decided.path) or {".", ".."} & set(decided.path.split("/")):
        return  # such paths are refused before anything is decided
    if decided.path.startswith("/api/") or decided.path == "/api":
        return  # not canonical: every /api is removed before deciding
    assert canonical_target("GET", sent, host="h") == decided
    received = URL.build(
        path=sent.partition("?")[0], query_string=sent.partition("?")[2], encoded=True
    )
    assert received.path_safe == ("/api" if prefixed else "") + decided.path
    assert list(received.query.items()) == list(query)
