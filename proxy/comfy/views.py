"""Each user's view of ComfyUI's shared queue, history and jobs: pure JSON filters.

Nothing here touches aiohttp or the ownership store: the guard (``read_guard.py``) looks up which
prompt ids the caller owns and hands them in as a set, so every function is a plain, table-testable
transformation. Shapes follow docs/comfyui-protocol.md#queue-interrupt-memory,
docs/comfyui-protocol.md#history and docs/comfyui-protocol.md#jobs-api; answers that do not have the
expected shape fail closed (empty views), never open.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote_plus

from proxy.comfy.records import FileRef, PromptRecord

FILE_TYPES = frozenset({"output", "temp", "input"})
"""The ``type`` values ``/view`` accepts (docs/comfyui-protocol.md#files)."""
EMPTY_QUEUE: dict[str, list[Any]] = {"queue_running": [], "queue_pending": []}


# -- query strings (byte-exact editing of a raw path + query) -------------------------------


def _query_parts(raw_path: str) -> tuple[str, list[str]]:
    path, sep, query = raw_path.partition("?")
    return path, (query.split("&") if sep and query else [])


def _part_key(part: str) -> str:
    """The decoded name of one ``name=value`` part, as aiohttp/yarl decode it."""
    return unquote_plus(part.split("=", 1)[0])


def query_value(raw_path: str, name: str) -> str | None:
    """The first decoded value of ``name`` (what ComfyUI's ``rel_url.query.get`` returns)."""
    for part in _query_parts(raw_path)[1]:
        if _part_key(part) == name:
            return unquote_plus(part.split("=", 1)[1]) if "=" in part else ""
    return None


def without_query_params(raw_path: str, names: Collection[str]) -> str:
    """``raw_path`` without any parameter whose decoded name is in ``names``; every other byte
    (path, order, encoding of the other parameters) is kept."""
    path, parts = _query_parts(raw_path)
    if not parts:
        return raw_path
    kept = [p for p in parts if _part_key(p) not in names]
    if len(kept) == len(parts):
        return raw_path
    return f"{path}?{'&'.join(kept)}" if kept else path


def with_query_param(raw_path: str, name: str, value: str) -> str:
    """``raw_path`` with ``name`` set to ``value``: the first occurrence is replaced in place,
    later ones are dropped (so nothing downstream can read a different one), and the parameter
    is appended when absent. Other parameters stay byte-exact."""
    path, parts = _query_parts(raw_path)
    encoded = f"{quote(name, safe='')}={quote(value, safe='')}"
    out: list[str] = []
    placed = False
    for part in parts:
        if _part_key(part) != name:
            out.append(part)
        elif not placed:
            out.append(encoded)
            placed = True
    if not placed:
        out.append(encoded)
    return f"{path}?{'&'.join(out)}"


def parse_int(value: str | None) -> int | None:
    """``int(value)`` as ComfyUI parses its query parameters; None when absent or not an int."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


# -- history --------------------------------------------------------------------------------


def history_window(
    entries: Mapping[str, Any], max_items: int | None, offset: int | None
) -> dict[str, Any]:
    """ComfyUI's ``PromptQueue.get_history`` paging, applied to an already filtered history.

    Ported line by line, quirks included: with ``max_items`` and no (or a negative) ``offset``
    the *last* ``max_items`` entries; with an offset, entries from there, stopping once
    ``max_items`` are collected (checked after adding, so ``max_items <= 0`` still yields one).
    """
    start = -1 if offset is None else offset
    if start < 0 and max_items is not None:
        start = len(entries) - max_items
    out: dict[str, Any] = {}
    for i, key in enumerate(entries):
        if i >= start:
            out[key] = entries[key]
            if max_items is not None and len(out) >= max_items:
                break
    return out


def filter_history(history: object, owned: Collection[str]) -> dict[str, Any]:
    """Only the entries of ``owned`` prompt ids, in ComfyUI's (insertion) order.

    SECURITY: anything that is not a ``{prompt_id: entry}`` object yields ``{}``, which is also
    exactly ComfyUI's answer for an unknown id, so others' ids are indistinguishable from
    unknown ones.
    """
    if not isinstance(history, dict):
        return {}
    return {pid: entry for pid, entry in history.items() if pid in owned}


def output_files(outputs: object) -> Iterator[FileRef]:
    """The files an ``outputs`` object names: ``{node: {images|gifs|video|audio|...: [{filename,
    subfolder, type}]}}`` (history entries, job details and ``executed`` events alike)."""
    if not isinstance(outputs, dict):
        return
    for node_output in outputs.values():
        yield from node_files(node_output)


def node_files(node_output: object) -> Iterator[FileRef]:
    """The files one node's UI output names (the ``output`` of an ``executed`` event).

    What the node *says*: a node may name any file (``Preview3D`` echoes its inputs), so this
    is where files are (sticky routing), never whose they are (:mod:`proxy.tenancy.attribution`).
    """
    if not isinstance(node_output, dict):
        return
    for items in node_output.values():
        if not isinstance(items, list):
            continue  # e.g. "animated": [true], "text": ["..."] hold no file dicts
        for item in items:
            if not isinstance(item, dict):
                continue
            name = item.get("filename")
            kind = item.get("type", "output")
            subfolder = item.get("subfolder", "")
            if isinstance(name, str) and name and kind in FILE_TYPES and isinstance(subfolder, str):
                yield (kind, subfolder, name)


def history_delete_body(
    body: Mapping[str, Any], owned: Collection[str]
) -> dict[str, list[str]] | None:
    """``POST /history`` for a tenant: ``delete`` keeps only ``owned`` ids, ``clear`` becomes a
    ``delete`` of every owned id. None when nothing is left to do (a no-op answered locally)."""
    wanted = _own_ids(body.get("delete"), owned)
    if body.get("clear"):
        wanted = _dedupe([*wanted, *sorted(owned)])
    return {"delete": wanted} if wanted else None


# -- the client's own client id --------------------------------------------------------------


def sent_client_ids(records: Iterable[PromptRecord | None]) -> dict[str, str]:
    """Namespaced client id -> the id the client sent, for the records that know it."""
    return {
        r.client_id: r.sent_client_id
        for r in records
        if r is not None and r.client_id and r.sent_client_id is not None
    }


def show_client_id(extra_data: object, shown: Mapping[str, str]) -> None:
    """In place: ``extra_data.client_id`` back to what the client sent, when it is one of the
    namespaced ids in ``shown`` (the owner's own prompts; removed when the client sent none).
    ComfyUI copied the namespaced id there; the client knows only its own (as with the
    WebSocket ``sid``)."""
    if not isinstance(extra_data, dict):
        return
    namespaced = extra_data.get("client_id")
    if not isinstance(namespaced, str) or namespaced not in shown:
        return
    if sent := shown[namespaced]:
        extra_data["client_id"] = sent
    else:
        del extra_data["client_id"]


def item_extra_data(item: object) -> object:
    """``extra_data`` of a queue item or a history entry's ``prompt`` (``[number, id, prompt,
    extra_data, outputs]``)."""
    return item[3] if isinstance(item, list) and len(item) > 3 else None


def entry_extra_data(entry: object) -> object:
    """``extra_data`` of a history entry."""
    return item_extra_data(entry.get("prompt")) if isinstance(entry, dict) else None


def job_extra_data(job: object) -> object:
    """``extra_data`` of a job detail (``workflow.extra_data``)."""
    workflow = job.get("workflow") if isinstance(job, dict) else None
    return workflow.get("extra_data") if isinstance(workflow, dict) else None


# -- queue ----------------------------------------------------------------------------------


def placeholder_id(key: bytes, prompt_id: str) -> str:
    """A stable opaque UUID standing in for someone else's prompt id.

    SECURITY: a keyed HMAC, so it is the same on every poll (the UI keeps its list stable) but
    cannot be reversed or matched against a known prompt id without the key.
    """
    digest = hmac.new(key, prompt_id.encode(), hashlib.sha256).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def redact_item(item: object, key: bytes) -> list[Any]:
    """Someone else's queue item as a placeholder: ``[number, <opaque id>, {}, {}, []]``.

    The 5-element shape and the number (priority) stay, so the stock UI still renders the
    queue's length and positions; prompt, workflow, client id and extra data do not.
    """
    number: Any = 0
    real_id = ""
    if isinstance(item, list) and item:
        number = item[0] if isinstance(item[0], (int, float)) else 0
        real_id = str(item[1]) if len(item) > 1 else ""
    return [number, placeholder_id(key, real_id), {}, {}, []]


def _item_id(item: object) -> str | None:
    if isinstance(item, list) and len(item) > 1 and isinstance(item[1], str):
        return item[1]
    return None


def redact_queue(queue: object, owned: Collection[str], key: bytes) -> dict[str, Any]:
    """``GET /queue``: the caller's items in full, everyone else's as placeholders (same
    positions, heap order kept). Other top-level keys pass unchanged."""
    if not isinstance(queue, dict):
        return {name: [] for name in EMPTY_QUEUE}
    out = dict(queue)
    for name in EMPTY_QUEUE:
        items = queue.get(name)
        if not isinstance(items, list):
            out[name] = []
            continue
        out[name] = [item if _item_id(item) in owned else redact_item(item, key) for item in items]
    return out


def queue_ids(queue: object, section: str) -> list[str]:
    """The prompt ids of ``queue_running`` or ``queue_pending`` of a ``GET /queue`` answer."""
    items = queue.get(section) if isinstance(queue, dict) else None
    if not isinstance(items, list):
        return []
    return [pid for pid in map(_item_id, items) if pid is not None]


def queue_delete_body(
    body: Mapping[str, Any], owned: Collection[str], own_pending: Iterable[str]
) -> dict[str, list[str]] | None:
    """``POST /queue`` for a tenant: ``delete`` keeps only ``owned`` ids, ``clear`` becomes a
    ``delete`` of the caller's pending ids. None when nothing is left to do."""
    wanted = _own_ids(body.get("delete"), owned)
    if body.get("clear"):
        wanted = _dedupe([*wanted, *own_pending])
    return {"delete": wanted} if wanted else None


def _own_ids(ids: object, owned: Collection[str]) -> list[str]:
    if not isinstance(ids, list):
        return []
    return _dedupe([i for i in ids if isinstance(i, str) and i in owned])


def _dedupe(ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(ids))


# -- jobs -----------------------------------------------------------------------------------


def jobs_page_params(raw_path: str) -> tuple[int, int | None] | None:
    """``(offset, limit)`` of a ``GET /api/jobs`` query when both are valid for ComfyUI (limit
    > 0, offset >= 0, defaults 0 and None); None when ComfyUI would refuse them with 400 (the
    query is then forwarded unchanged, so the client gets ComfyUI's own error)."""
    raw_limit = query_value(raw_path, "limit")
    raw_offset = query_value(raw_path, "offset")
    limit = parse_int(raw_limit)
    offset = parse_int(raw_offset) if raw_offset is not None else 0
    if (raw_limit is not None and (limit is None or limit <= 0)) or offset is None or offset < 0:
        return None
    return offset, limit


def filter_jobs(
    answer: object, owned: Collection[str], offset: int, limit: int | None
) -> dict[str, Any]:
    """``GET /api/jobs`` for a tenant: ComfyUI's full (unpaginated) list, filtered to ``owned``
    ids, then paginated like ComfyUI (``total`` and ``has_more`` of the caller's list)."""
    jobs = answer.get("jobs") if isinstance(answer, dict) else None
    mine = [
        job
        for job in (jobs if isinstance(jobs, list) else [])
        if isinstance(job, dict) and job.get("id") in owned
    ]
    total = len(mine)
    page = mine[offset:] if offset > 0 else mine
    if limit is not None:
        page = page[:limit]
    out = dict(answer) if isinstance(answer, dict) else {}
    out["jobs"] = page
    out["pagination"] = {
        "offset": offset,
        "limit": limit,
        "total": total,
        "has_more": offset + len(page) < total,
    }
    return out


JOB_STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
JOB_DETAIL_KEYS = ("outputs", "execution_status", "workflow")
"""What ``GET /api/jobs/{id}`` adds to the list item of the same job
(docs/comfyui-protocol.md#jobs-api)."""


@dataclass(frozen=True, slots=True)
class JobsQuery:
    """The parameters of a ``GET /api/jobs`` as ComfyUI reads them."""

    statuses: tuple[str, ...]
    workflow_id: str | None
    sort_by: str
    descending: bool
    offset: int
    limit: int | None


def jobs_query(raw_path: str) -> JobsQuery | None:
    """The query of a ``GET /api/jobs``, validated as ComfyUI validates it; None when ComfyUI
    would answer 400 (the request then goes to ComfyUI for its own error)."""
    raw_status = query_value(raw_path, "status")
    statuses: tuple[str, ...] = JOB_STATUSES
    if raw_status:
        statuses = tuple(s.strip() for s in raw_status.split(",") if s.strip())
        if any(s not in JOB_STATUSES for s in statuses):
            return None
    sort_by = query_value(raw_path, "sort_by")
    sort_order = query_value(raw_path, "sort_order")
    page = jobs_page_params(raw_path)
    if (
        page is None
        or (sort_by is not None and sort_by not in ("created_at", "execution_duration"))
        or (sort_order is not None and sort_order not in ("asc", "desc"))
    ):
        return None
    return JobsQuery(
        statuses=statuses,
        workflow_id=query_value(raw_path, "workflow_id") or None,
        sort_by=sort_by or "created_at",
        descending=sort_order != "asc",
        offset=page[0],
        limit=page[1],
    )


def job_list_item(detail: Mapping[str, Any]) -> dict[str, Any]:
    """A job's list item from its ``GET /api/jobs/{id}`` detail."""
    return {k: v for k, v in detail.items() if k not in JOB_DETAIL_KEYS}


def _job_sort_key(sort_by: str) -> Callable[[Mapping[str, Any]], Any]:
    """ComfyUI's sort key (``comfy_execution/jobs.py``): ``create_time``, or the execution's
    duration (0 when it has not both ends)."""

    def key(job: Mapping[str, Any]) -> Any:
        if sort_by == "execution_duration":
            start, end = job.get("execution_start_time", 0), job.get("execution_end_time", 0)
            return end - start if _number(start) and _number(end) and start and end else 0
        created = job.get("create_time", 0)
        return created if _number(created) else 0

    return key


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def jobs_answer(jobs: Iterable[Mapping[str, Any]], query: JobsQuery) -> dict[str, Any]:
    """``GET /api/jobs``'s answer over ``jobs`` (list items in ComfyUI's listing order:
    running, pending, then history), filtered, sorted and paginated as ComfyUI does."""
    wanted = set(query.statuses)
    found = [
        j
        for j in jobs
        if j.get("status") in wanted
        and (not query.workflow_id or j.get("workflow_id") == query.workflow_id)
    ]
    # sorted() is stable, also reversed: ties keep ComfyUI's listing order, as there.
    found = sorted(found, key=_job_sort_key(query.sort_by), reverse=query.descending)
    total = len(found)
    page = found[query.offset :] if query.offset > 0 else found
    if query.limit is not None:
        page = page[: query.limit]
    return {
        "jobs": page,
        "pagination": {
            "offset": query.offset,
            "limit": query.limit,
            "total": total,
            "has_more": query.offset + len(page) < total,
        },
    }


def is_canonical_uuid(value: object) -> bool:
    """ComfyUI's job id rule: a canonical lowercase hyphenated UUID."""
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def jobs_cancel_ids(ids: list[Any], owned: Collection[str]) -> list[Any]:
    """``POST /api/jobs/cancel`` ``job_ids`` for a tenant.

    Valid ids of others are dropped (ComfyUI never hears of them); ids ComfyUI would refuse as
    malformed are kept, so the client still gets ComfyUI's own 400 ``invalid_ids`` answer.
    An empty result means nothing of the caller's to cancel.
    """
    return [i for i in ids if (isinstance(i, str) and i in owned) or not is_canonical_uuid(i)]


__all__ = [
    "EMPTY_QUEUE",
    "JOB_STATUSES",
    "JobsQuery",
    "entry_extra_data",
    "filter_history",
    "filter_jobs",
    "history_delete_body",
    "history_window",
    "is_canonical_uuid",
    "item_extra_data",
    "job_extra_data",
    "job_list_item",
    "jobs_answer",
    "jobs_cancel_ids",
    "jobs_page_params",
    "jobs_query",
    "node_files",
    "output_files",
    "parse_int",
    "placeholder_id",
    "query_value",
    "queue_delete_body",
    "queue_ids",
    "redact_item",
    "redact_queue",
    "sent_client_ids",
    "show_client_id",
    "with_query_param",
    "without_query_params",
]
