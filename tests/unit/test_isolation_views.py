"""The pure JSON views of tenant isolation: history paging (ComfyUI's semantics), filtering,
queue redaction, jobs pagination, body rewrites and byte-exact query editing."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from proxy.comfy import views
from tests.fakes.comfyui.queue import PromptQueue

KEY = b"k" * 32


def comfy_history(n: int, max_items: int | None, offset: int) -> list[str]:
    """ComfyUI's own paging (the fake ports ``PromptQueue.get_history`` line by line)."""
    queue = PromptQueue.__new__(PromptQueue)
    queue.history = {f"p{i}": {} for i in range(n)}
    return list(queue.get_history(max_items=max_items, offset=offset))


@pytest.mark.parametrize(
    ("max_items", "offset", "expected"),
    [
        (None, None, ["p0", "p1", "p2", "p3", "p4"]),
        (2, None, ["p3", "p4"]),  # the last max_items
        (2, -1, ["p3", "p4"]),
        (2, -7, ["p3", "p4"]),
        (2, 0, ["p0", "p1"]),
        (2, 4, ["p4"]),
        (2, 9, []),
        (None, 3, ["p3", "p4"]),
        (9, None, ["p0", "p1", "p2", "p3", "p4"]),
        (0, None, []),
        (0, 1, ["p1"]),  # ComfyUI checks the count after adding
        (-1, None, []),
    ],
)
def test_history_window_matches_comfyui(
    max_items: int | None, offset: int | None, expected: list[str]
) -> None:
    entries = {f"p{i}": {"n": i} for i in range(5)}
    got = list(views.history_window(entries, max_items, offset))
    assert got == expected
    assert got == comfy_history(5, max_items, -1 if offset is None else offset)


@pytest.mark.parametrize(
    ("history", "owned", "expected"),
    [
        ({"a": 1, "b": 2, "c": 3}, {"a", "c"}, {"a": 1, "c": 3}),
        ({"b": 2}, {"a"}, {}),
        ({}, {"a"}, {}),
        ([["a", 1]], {"a"}, {}),  # not ComfyUI's shape: fail closed
        (None, {"a"}, {}),
    ],
)
def test_filter_history(history: object, owned: set[str], expected: dict[str, Any]) -> None:
    assert views.filter_history(history, owned) == expected


def test_filter_history_keeps_order() -> None:
    history = {f"p{i}": i for i in range(10)}
    assert list(views.filter_history(history, {"p7", "p2", "p5"})) == ["p2", "p5", "p7"]


def test_output_files() -> None:
    outputs = {
        "9": {"images": [{"filename": "a.png", "subfolder": "users/x", "type": "output"}]},
        "10": {
            "gifs": [{"filename": "b.webp", "subfolder": "", "type": "temp", "format": "x"}],
            "animated": [True],
            "text": ["hello"],
        },
        "11": {"audio": [{"filename": "c.flac", "subfolder": ""}]},  # type defaults to output
        "12": {"images": [{"filename": "d.png", "type": "weird"}, {"filename": ""}, "x"]},
        "13": "not a dict",
    }
    assert list(views.output_files(outputs)) == [
        ("output", "users/x", "a.png"),
        ("temp", "", "b.webp"),
        ("output", "", "c.flac"),
    ]
    assert list(views.output_files(None)) == []


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"delete": ["a", "x", "b", "a"]}, {"delete": ["a", "b"]}),
        ({"delete": ["x"]}, None),
        ({"delete": "a"}, None),  # ComfyUI would iterate the characters
        ({"delete": [1, None, "a"]}, {"delete": ["a"]}),
        ({"clear": True}, {"delete": ["a", "b"]}),
        ({"clear": True, "delete": ["b"]}, {"delete": ["b", "a"]}),
        ({"clear": False}, None),
        ({}, None),
    ],
)
def test_history_delete_body(body: dict[str, Any], expected: dict[str, Any] | None) -> None:
    assert views.history_delete_body(body, {"a", "b"}) == expected


@pytest.mark.parametrize(
    ("body", "pending", "expected"),
    [
        ({"delete": ["a", "x"]}, ["b"], {"delete": ["a"]}),
        ({"clear": True}, ["b"], {"delete": ["b"]}),
        ({"clear": True}, [], None),
        ({"clear": True, "delete": ["a"]}, ["b", "a"], {"delete": ["a", "b"]}),
        ({"delete": ["x"]}, ["b"], None),
    ],
)
def test_queue_delete_body(
    body: dict[str, Any], pending: list[str], expected: dict[str, Any] | None
) -> None:
    assert views.queue_delete_body(body, {"a", "b"}, pending) == expected


def item(number: int, pid: str) -> list[Any]:
    return [number, pid, {"1": {"class_type": "X"}}, {"client_id": "c-" + pid}, ["1"]]


def test_redact_queue() -> None:
    queue = {
        "queue_running": [item(3, "theirs-running")],
        "queue_pending": [item(5, "mine"), item(4, "theirs"), item(6, "mine2")],
        "extra": "kept",
    }
    out = views.redact_queue(queue, {"mine", "mine2"}, KEY)
    assert out["extra"] == "kept"
    assert out["queue_pending"][0] == item(5, "mine")
    assert out["queue_pending"][2] == item(6, "mine2")
    for redacted, number, real in (
        (out["queue_pending"][1], 4, "theirs"),
        (out["queue_running"][0], 3, "theirs-running"),
    ):
        assert redacted[0] == number
        assert redacted[2:] == [{}, {}, []]
        assert redacted[1] != real
        assert uuid.UUID(redacted[1]).version == 4
        assert redacted[1] == views.placeholder_id(KEY, real)  # stable
    assert views.placeholder_id(b"other key" * 4, "theirs") != views.placeholder_id(KEY, "theirs")
    # The original is untouched (the guard may hold it elsewhere).
    assert queue["queue_pending"][1] == item(4, "theirs")


@pytest.mark.parametrize(
    "queue",
    [None, [], {"queue_running": "x"}, {"queue_pending": [["only-number"]]}],
)
def test_redact_queue_fails_closed(queue: object) -> None:
    out = views.redact_queue(queue, {"mine"}, KEY)
    assert set(out) >= {"queue_running", "queue_pending"}
    for items in (out["queue_running"], out["queue_pending"]):
        for entry in items:
            assert entry[2:] == [{}, {}, []]


def test_queue_ids() -> None:
    queue = {"queue_running": [item(1, "r")], "queue_pending": [item(2, "p"), [3]]}
    assert views.queue_ids(queue, "queue_running") == ["r"]
    assert views.queue_ids(queue, "queue_pending") == ["p"]
    assert views.queue_ids(None, "queue_pending") == []


def jobs(*ids: str) -> dict[str, Any]:
    return {"jobs": [{"id": i, "status": "completed"} for i in ids], "pagination": {}}


@pytest.mark.parametrize(
    ("offset", "limit", "page", "has_more"),
    [
        (0, None, ["a1", "a2", "a3"], False),
        (0, 2, ["a1", "a2"], True),
        (1, 1, ["a2"], True),
        (2, 1, ["a3"], False),
        (2, 5, ["a3"], False),
        (3, None, [], False),
        (7, 2, [], False),
    ],
)
def test_filter_jobs_paginates_own_list(
    offset: int, limit: int | None, page: list[str], has_more: bool
) -> None:
    answer = jobs("b1", "a1", "b2", "a2", "a3")
    out = views.filter_jobs(answer, {"a1", "a2", "a3"}, offset, limit)
    assert [j["id"] for j in out["jobs"]] == page
    assert out["pagination"] == {
        "offset": offset,
        "limit": limit,
        "total": 3,
        "has_more": has_more,
    }


def test_filter_jobs_fails_closed() -> None:
    out = views.filter_jobs({"jobs": "x"}, {"a"}, 0, None)
    assert out["jobs"] == []
    assert out["pagination"]["total"] == 0
    assert views.filter_jobs(None, {"a"}, 0, 1)["jobs"] == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/api/jobs", (0, None)),
        ("/api/jobs?limit=5&offset=2", (2, 5)),
        ("/api/jobs?limit=0", None),
        ("/api/jobs?limit=-1", None),
        ("/api/jobs?limit=x", None),
        ("/api/jobs?offset=-1", None),
        ("/api/jobs?offset=", None),
        ("/api/jobs?status=pending&offset=3", (3, None)),
    ],
)
def test_jobs_page_params(raw: str, expected: tuple[int, int | None] | None) -> None:
    assert views.jobs_page_params(raw) == expected


def test_jobs_cancel_ids() -> None:
    mine, theirs = str(uuid.uuid4()), str(uuid.uuid4())
    assert views.jobs_cancel_ids([mine, theirs], {mine}) == [mine]
    assert views.jobs_cancel_ids([theirs], {mine}) == []
    # Malformed ids stay, so ComfyUI answers its own 400 invalid_ids.
    assert views.jobs_cancel_ids([theirs, "nope", 5, theirs.upper()], {mine}) == [
        "nope",
        5,
        theirs.upper(),
    ]


@pytest.mark.parametrize(
    ("raw", "names", "expected"),
    [
        ("/history?max_items=5&offset=2", ("max_items", "offset"), "/history"),
        ("/history?a=%2F&max_items=5&b=x+y", ("max_items",), "/history?a=%2F&b=x+y"),
        ("/history?max%5Fitems=5&a=1", ("max_items",), "/history?a=1"),
        ("/history?max_items=1&max_items=2", ("max_items",), "/history"),
        ("/history?x=1", ("max_items",), "/history?x=1"),
        ("/history", ("max_items",), "/history"),
        ("/history?", ("max_items",), "/history?"),
        ("/history?max_items", ("max_items",), "/history"),
    ],
)
def test_without_query_params(raw: str, names: tuple[str, ...], expected: str) -> None:
    assert views.without_query_params(raw, names) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/ws", "/ws?clientId=NS"),
        ("/ws?clientId=abc", "/ws?clientId=NS"),
        ("/api/ws?a=%2F&clientId=abc&b=1", "/api/ws?a=%2F&clientId=NS&b=1"),
        ("/ws?clientId=abc&clientId=def", "/ws?clientId=NS"),
        ("/ws?client%49d=abc&x=1", "/ws?clientId=NS&x=1"),
        ("/ws?x=1", "/ws?x=1&clientId=NS"),
    ],
)
def test_with_query_param(raw: str, expected: str) -> None:
    assert views.with_query_param(raw, "clientId", "NS") == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/ws?clientId=abc&clientId=def", "abc"),
        ("/ws?clientId=a%20b+c", "a b c"),
        ("/ws?clientId=", ""),
        ("/ws?clientId", ""),
        ("/ws?x=1", None),
        ("/ws", None),
    ],
)
def test_query_value(raw: str, expected: str | None) -> None:
    assert views.query_value(raw, "clientId") == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("5", 5), ("-3", -3), (" 7 ", 7), ("x", None), ("", None), (None, None), ("1.5", None)],
)
def test_parse_int_like_comfyui(value: str | None, expected: int | None) -> None:
    assert views.parse_int(value) == expected
