"""Route classes: (rule, method, upgrade) -> class, over the real route table."""

from __future__ import annotations

import pytest

from proxy.limits.classes import limited_rule, route_class
from proxy.routes import RULES, classify, normalise_path


def cls_of(method: str, raw_path: str, *, websocket: bool = False) -> str | None:
    path, prefixed = normalise_path(raw_path)
    return route_class(classify(method, path, prefixed=prefixed).name, method, websocket=websocket)


@pytest.mark.parametrize(
    ("method", "path", "websocket", "expected"),
    [
        ("POST", "/prompt", False, "submit"),
        ("POST", "/api/prompt", False, "submit"),
        ("POST", "/api/%70rompt", False, "submit"),
        ("GET", "/prompt", False, "read"),
        ("GET", "/history", False, "read"),
        ("GET", "/api/history/abc", False, "read"),
        ("POST", "/history", False, "read"),
        ("GET", "/queue", False, "read"),
        ("POST", "/api/queue", False, "read"),  # delete / clear
        ("POST", "/interrupt", False, "read"),
        ("GET", "/api/jobs", False, "read"),
        ("POST", "/api/jobs/x/cancel", False, "read"),
        ("GET", "/object_info", False, "read"),
        ("GET", "/object_info/KSampler", False, "read"),
        ("GET", "/models/checkpoints", False, "read"),
        ("GET", "/embeddings", False, "read"),
        ("GET", "/settings", False, "read"),
        ("POST", "/settings/Comfy.X", False, "read"),
        ("GET", "/userdata?dir=workflows", False, "read"),
        ("GET", "/system_stats", False, "read"),
        ("GET", "/users", False, "read"),
        ("GET", "/internal/logs", False, "read"),
        ("POST", "/free", False, "read"),
        ("GET", "/api/assets", False, "read"),
        ("GET", "/manager/queue/status", False, "read"),
        ("GET", "/view?filename=a.png", False, "view"),
        ("GET", "/api/view_metadata/loras", False, "view"),
        ("POST", "/upload/image", False, "upload"),
        ("POST", "/api/upload/mask", False, "upload"),
        ("GET", "/ws?clientId=x", True, "ws_connect"),
        ("GET", "/api/ws", True, "ws_connect"),
        ("GET", "/ws", False, "read"),  # not an upgrade: an ordinary request
        # The frontend's files: a class of their own.
        ("GET", "/", False, "static"),
        ("GET", "/assets/index-abc.js", False, "static"),
        ("GET", "/extensions/core/x.js", False, "static"),
        ("GET", "/templates/default.json", False, "static"),
        # Paths no rule names (rule "other"): custom nodes' APIs, /api/i18n, files.
        ("GET", "/favicon.ico", False, "read"),
        ("GET", "/some/unknown/file.css", False, "read"),
        ("GET", "/api/i18n", False, "read"),
    ],
)
def test_comfyui_routes(method: str, path: str, websocket: bool, expected: str | None) -> None:
    assert cls_of(method, path, websocket=websocket) == expected


@pytest.mark.parametrize(
    ("rule", "method", "expected"),
    [
        ("login", "POST", "login"),
        ("login", "GET", None),
        ("logout", "POST", None),
        ("healthz", "GET", None),
        ("readyz", "GET", None),
        ("login_static", "GET", None),
        ("base_redirect", "GET", None),
    ],
)
def test_proxy_own_routes(rule: str, method: str, expected: str | None) -> None:
    assert route_class(rule, method) == expected


def test_the_guard_is_wired_on_every_comfyui_rule() -> None:
    wired = {r.name for r in RULES if limited_rule(r.name)}
    assert wired == {r.name for r in RULES}
    assert limited_rule("other")
