"""Route decisions are made on the normalised path: bare, /api, and percent-encoded forms agree."""

from __future__ import annotations

import pytest

from proxy.errors import BadRequest
from proxy.routes import classify, normalise_path


@pytest.mark.parametrize(
    ("raw", "path", "prefixed"),
    [
        ("/history", "/history", False),
        ("/api/history", "/history", True),
        ("/api/%68istory", "/history", True),
        ("/%61pi/history", "/history", True),
        ("/api/history?max_items=5", "/history", True),
        ("/api/api/jobs", "/jobs", True),
        ("/api/jobs/abc/cancel", "/jobs/abc/cancel", True),
        ("/api", "/", True),
        ("/api/", "/", True),
        ("/", "/", False),
        ("//internal//logs", "/internal/logs", False),
        # %2F stays encoded (it is part of one segment, as aiohttp routes it) ...
        ("/api/userdata/workflows%2Fa.json", "/userdata/workflows%2Fa.json", True),
        # ... and %25 is not decoded into a new escape.
        ("/api/userdata/a%252Fb", "/userdata/a%252Fb", True),
        ("/API/history", "/API/history", False),  # routes are case-sensitive upstream too
    ],
)
def test_normalise_path(raw: str, path: str, prefixed: bool) -> None:
    assert normalise_path(raw) == (path, prefixed)


@pytest.mark.parametrize("raw", ["/a/../history", "/api/./prompt", "/api/%2e%2e/internal/logs"])
def test_dot_segments_are_refused(raw: str) -> None:
    with pytest.raises(BadRequest) as info:
        normalise_path(raw)
    assert info.value.error_type == "bad_path"


@pytest.mark.parametrize(
    ("method", "raw", "rule"),
    [
        ("GET", "/ws", "ws"),
        ("GET", "/api/ws", "ws"),
        ("POST", "/ws", "other"),
        ("POST", "/prompt", "prompt"),
        ("GET", "/api/%70rompt", "prompt"),
        ("GET", "/api/history/123", "history"),
        ("POST", "/api/jobs/cancel", "jobs"),
        ("GET", "/api/api/jobs", "jobs"),
        ("GET", "/view?filename=a.png", "view"),
        ("GET", "/api/view_metadata/checkpoints", "view"),
        ("POST", "/api/upload/image", "upload"),
        ("POST", "/upload/mask", "upload"),
        ("GET", "/api/object_info/KSampler", "object_info"),
        ("GET", "/api/experiment/models/checkpoints", "models"),
        ("GET", "/api/userdata/workflows%2Fa.json", "userdata"),
        ("GET", "/api/v2/userdata", "userdata"),
        ("GET", "/internal/logs/raw", "internal"),
        ("PATCH", "/internal/logs/subscribe", "internal"),
        ("GET", "/api/assets/1234", "assets"),
        ("GET", "/assets/index-abc.js", "static"),  # the frontend's bundle, not the assets API
        ("GET", "/api/manager/queue/status", "manager"),
        ("GET", "/", "static"),
        ("GET", "/extensions/core/x.js", "static"),
        ("GET", "/no/such/thing", "other"),
    ],
)
def test_classify(method: str, raw: str, rule: str) -> None:
    path, prefixed = normalise_path(raw)
    assert classify(method, path, prefixed=prefixed).name == rule


def test_get_rules_accept_head() -> None:
    assert classify("HEAD", "/ws").name == "ws"
