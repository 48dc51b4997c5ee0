"""Pure parts of the multi-instance layer: merges of ComfyUI answers, file locations, lost
prompts and the watch, the fan-in's frame sniffing and per-instance filters."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.multi.fanin import _event_type, _link_filter, _link_filters
from proxy.multi.lost import LostPrompt, LostStore, QueueWatch, job_items, queue_items
from proxy.multi.merge import (
    entry_time,
    job_sort,
    merge_history,
    merge_jobs,
    merge_prompt_info,
    merge_queue,
)
from proxy.multi.sticky import FileLocations
from proxy.tenancy.events import SocketEventFilter
from proxy.tenancy.ownership import MemoryOwnershipStore


def entry(*stamps: int) -> dict[str, Any]:
    return {
        "prompt": [0, "x", {}, {}, []],
        "outputs": {},
        "status": {
            "status_str": "success",
            "completed": True,
            "messages": [["execution_start", {"timestamp": s}] for s in stamps],
        },
    }


def test_entry_time_is_the_last_message_timestamp() -> None:
    assert entry_time(entry(5, 7, 9)) == 9
    no_stamp = entry(5, 7)
    no_stamp["status"]["messages"].append(["execution_cached", {"nodes": []}])
    assert entry_time(no_stamp) == 7
    assert entry_time({"status": {"messages": []}}) is None
    assert entry_time("junk") is None


def test_history_is_merged_in_completion_order_each_instance_kept_in_its_own() -> None:
    one = {"a": entry(10), "b": entry(30), "c": entry()}  # c: no timestamp, stays after b
    two = {"d": entry(20), "e": entry(40)}
    assert list(merge_history([one, two])) == ["a", "d", "b", "c", "e"]
    assert list(merge_history([one])) == ["a", "b", "c"]
    assert merge_history([{}, {}]) == {}
    # One id on two instances (re-run elsewhere): its latest entry, at its place.
    again = {"a": entry(50)}
    merged = merge_history([one, again])
    assert list(merged) == ["b", "c", "a"]
    assert merged["a"] is again["a"]


def test_queue_is_merged_side_by_side() -> None:
    q1 = {"queue_running": [[1, "r1", {}, {}, []]], "queue_pending": [[3, "p1", {}, {}, []]]}
    q2 = {"queue_running": [], "queue_pending": [[2, "p2", {}, {}, []]], "extra": 1}
    merged = merge_queue([q1, None, q2])
    assert [i[1] for i in merged["queue_running"]] == ["r1"]
    assert [i[1] for i in merged["queue_pending"]] == ["p1", "p2"]
    assert merged["extra"] == 1
    assert merge_queue([]) == {"queue_running": [], "queue_pending": []}


def test_prompt_info_is_summed() -> None:
    answers: list[object] = [
        {"exec_info": {"queue_remaining": 2}},
        {"exec_info": {"queue_remaining": 3}},
        {"exec_info": {"queue_remaining": True}},  # not a count
        "junk",
    ]
    assert merge_prompt_info(answers) == {"exec_info": {"queue_remaining": 5}}


def jobs(*items: tuple[str, int], total: int | None = None) -> dict[str, Any]:
    listed = [{"id": i, "create_time": t} for i, t in items]
    return {"jobs": listed, "pagination": {"total": len(listed) if total is None else total}}


def test_jobs_are_sorted_like_comfyui_then_paginated() -> None:
    answers: list[object] = [jobs(("a", 1), ("c", 3)), jobs(("b", 2), ("d", 4), total=10)]
    merged = merge_jobs(answers, sort_by="created_at", descending=True, offset=1, limit=2)
    assert [j["id"] for j in merged["jobs"]] == ["c", "b"]
    assert merged["pagination"] == {"offset": 1, "limit": 2, "total": 12, "has_more": True}
    ascending = merge_jobs(answers, sort_by="created_at", descending=False, offset=0, limit=None)
    assert [j["id"] for j in ascending["jobs"]] == ["a", "b", "c", "d"]
    timed = [
        {
            "jobs": [
                {"id": "slow", "execution_start_time": 1, "execution_end_time": 100},
                {"id": "fast", "execution_start_time": 1, "execution_end_time": 2},
            ]
        }
    ]
    by_duration = merge_jobs(
        timed, sort_by="execution_duration", descending=True, offset=0, limit=None
    )
    assert [j["id"] for j in by_duration["jobs"]] == ["slow", "fast"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("/api/jobs", ("created_at", True)),
        ("/api/jobs?sort_order=asc", ("created_at", False)),
        ("/api/jobs?sort_by=execution_duration&sort_order=desc", ("execution_duration", True)),
    ],
)
def test_job_sort_parameters(query: str, expected: tuple[str, bool]) -> None:
    assert job_sort(query) == expected


def test_file_locations_normalise_and_skip_inputs() -> None:
    locations = FileLocations(max_entries=2)
    locations.record("gpu1", [("output", "users/a/", "x.png"), ("input", "", "up.png")])
    assert locations.get(("output", "users/a", "x.png")) == "gpu1"
    assert locations.get(("input", "", "up.png")) is None
    locations.record("gpu2", [("temp", "", "t1.png"), ("temp", "", "t2.png")])
    assert locations.get(("output", "users/a", "x.png")) is None  # bounded: oldest out
    history = {"p1": {"outputs": {"9": {"images": [{"filename": "h.png", "type": "output"}]}}}}
    locations.record_history("gpu3", history)
    assert locations.get(("output", "", "h.png")) == "gpu3"
    locations.record("gpu1", [("output", "", "h.png")])
    locations.record_history("gpu3", history)  # already recorded for that prompt: not again
    assert locations.get(("output", "", "h.png")) == "gpu1"


def test_lost_prompt_shapes() -> None:
    lost = LostPrompt("p1", "gpu2:8188", 1000.0, 7)
    (error, end) = [orjson.loads(f) for f in lost.frames()]
    assert error["type"] == "execution_error"
    data = error["data"]
    assert data["prompt_id"] == "p1"
    assert data["node_id"] is None
    assert data["traceback"] == []
    assert "gpu2:8188" in data["exception_message"]
    assert data["timestamp"] == 1_000_000
    assert end == {"type": "executing", "data": {"node": None, "prompt_id": "p1"}}
    history = lost.history_entry()
    assert history["prompt"][:2] == [7, "p1"]
    assert history["status"]["status_str"] == "error"
    assert entry_time(history) == 1_000_000
    assert lost.job()["status"] == "failed"
    assert lost.job(detail=True)["execution_status"] == history["status"]


def test_lost_store_expires_and_deduplicates() -> None:
    now = [1000.0]
    store = LostStore(60, clock=lambda: now[0])
    assert store.add(LostPrompt("p1", "u", 1000.0, 0))
    assert not store.add(LostPrompt("p1", "u", 1001.0, 0))
    assert [lost.prompt_id for lost in store.all()] == ["p1"]
    now[0] = 1100.0
    assert store.get("p1") is None
    assert store.all() == []


def test_queue_watch_keeps_what_it_learnt_after_a_snapshot_was_asked() -> None:
    watch = QueueWatch()
    watch.observe("u", [("a", 1), ("b", 2)], asked_at=0.0)
    watch.note_submitted("u", "c")  # learnt now: after the next snapshot was asked for
    watch.observe("u", [("b", 2)], asked_at=0.0)  # an older snapshot without c
    assert watch.held("u") == {"b", "c"}
    watch.note_finished("c")
    assert watch.take("u") == {"b": 2}
    assert watch.held("u") == set()


def test_watch_sources() -> None:
    queue = {"queue_running": [[1, "r", {}, {}, []]], "queue_pending": [[2.5, "p"], "junk"]}
    assert queue_items(queue) == [("r", 1), ("p", 2.5)]
    assert job_items({"jobs": [{"id": "j", "priority": 3}, {"id": 5}]}) == [("j", 3)]
    assert queue_items(None) == []


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        ('{"type": "status", "data": {}}', "status"),
        ('{"type":"feature_flags","data":{}}', "feature_flags"),
        ('{"data": {}, "type": "executed"}', "executed"),
        ("not json", None),
        ('{"type": 5}', None),
    ],
)
def test_event_type_sniffing(frame: str, kind: str | None) -> None:
    assert _event_type(frame) == kind


async def observer(frame: str | bytes) -> str | bytes | None:
    """Another guard's frame filter next to the isolation filter (as the quota guard adds)."""
    return frame


def test_each_instance_gets_its_own_execution_window() -> None:
    base = SocketEventFilter(
        owner="a",
        client_id="c",
        upstream_client_id="a_c",
        ownership=MemoryOwnershipStore(60),
        passed_types=("status",),
    )
    base.running = "p1"
    copy = _link_filter(base)
    assert isinstance(copy, SocketEventFilter)
    assert copy is not base
    assert copy.running is None
    assert base.running == "p1"
    assert _link_filter(observer) is observer  # shared: only isolation's window is per instance
    assert _link_filters([observer, base]) is not None
    assert _link_filters([]) is None
