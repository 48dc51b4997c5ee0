"""The WebSocket frame filter of tenant isolation, one frame kind at a time."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from proxy.comfy.records import PromptRecord
from proxy.tenancy.events import SocketEventFilter, preview_prompt_id
from proxy.tenancy.ownership import MemoryOwnershipStore

MINE, THEIRS, UNKNOWN = "p-mine", "p-theirs", "p-unknown"


@pytest.fixture
async def store() -> MemoryOwnershipStore:
    store = MemoryOwnershipStore(3600)
    await store.record_prompt(PromptRecord(MINE, "alice", "u", "ns-a", 0.0, previews=("9",)))
    await store.record_prompt(PromptRecord(THEIRS, "bob", "u", "ns-b", 0.0))
    return store


def make(store: MemoryOwnershipStore, *, admin: bool = False) -> SocketEventFilter:
    return SocketEventFilter(
        owner="alice",
        client_id="tab",
        upstream_client_id="ns-a",
        ownership=store,
        passed_types=("status", "feature_flags", "logs"),
        admin=admin,
    )


def text(kind: str, **data: Any) -> str:
    return json.dumps({"type": kind, "data": data})


def binary(kind: int, payload: bytes = b"\xff\xd8jpeg") -> bytes:
    return struct.pack(">II", kind, 1) + payload


def preview4(prompt_id: Any) -> bytes:
    meta = json.dumps({"node_id": "3", "prompt_id": prompt_id, "image_type": "image/png"})
    return struct.pack(">II", 4, len(meta)) + meta.encode() + b"\x89PNG"


TEXT3 = struct.pack(">II", 3, 1) + b"5width: 8"


@pytest.mark.parametrize(
    ("frame", "passes"),
    [
        (text("status", status={"exec_info": {"queue_remaining": 2}}), True),
        (text("feature_flags", supports_preview_metadata=True), True),
        (text("executing", node="4"), True),  # connect-time, no prompt_id
        (text("execution_start", prompt_id=MINE, timestamp=1), True),
        (text("execution_start", prompt_id=THEIRS, timestamp=1), False),
        (text("execution_start", prompt_id=UNKNOWN, timestamp=1), False),
        (text("progress", value=1, max=2, prompt_id=THEIRS, node="3"), False),
        (text("progress_state", prompt_id=MINE, nodes={}), True),
        (text("executed", node="9", output={}, prompt_id=THEIRS), False),
        (text("executing", node=None, prompt_id=THEIRS), False),
        (text("execution_error", prompt_id=5), False),
        (text("logs", entries=[{"t": "x", "m": "secret"}], size=None), False),
        (text("display_component", node_id="1", component="Chat", props={}), False),
        (text("notification", value="hello"), False),
        (json.dumps(["not", "an", "event"]), False),
        ("not json", False),
        (preview4(MINE), True),
        (preview4(THEIRS), False),
        (preview4(None), False),
        (struct.pack(">II", 4, 999) + b"{}", False),  # length past the end
        (struct.pack(">II", 4, 2) + b"[]", False),
        (binary(1), False),  # nothing of ours is executing
        (TEXT3, False),
        (binary(2), False),
        (binary(77), False),
        (b"\x00", False),
    ],
)
async def test_frame_table(store: MemoryOwnershipStore, frame: str | bytes, passes: bool) -> None:
    result = await make(store)(frame)
    assert (result is frame) if passes else (result is None)


async def test_status_sid_mapped_back_to_the_clients_id(store: MemoryOwnershipStore) -> None:
    for admin in (False, True):
        frame = text("status", status={"exec_info": {"queue_remaining": 0}}, sid="ns-a")
        result = await make(store, admin=admin)(frame)
        assert isinstance(result, str)
        assert json.loads(result) == {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "tab"},
        }


async def test_passed_types_are_configurable(store: MemoryOwnershipStore) -> None:
    only_flags = SocketEventFilter(
        owner="alice",
        client_id="tab",
        upstream_client_id="ns-a",
        ownership=store,
        passed_types=("feature_flags", "custom_event"),
    )
    assert await only_flags(text("custom_event", x=1)) is not None
    assert await only_flags(text("status", status={})) is None
    # The connect-time status is always needed: the client adopts its sid.
    assert await only_flags(text("status", status={}, sid="ns-a")) is not None
    # A passed type that names a prompt is still only the owner's.
    assert await only_flags(text("custom_event", prompt_id=THEIRS)) is None


@pytest.mark.parametrize(
    "end",
    [
        text("execution_success", prompt_id=MINE, timestamp=2),
        text("execution_error", prompt_id=MINE, node_id="1"),
        text("execution_interrupted", prompt_id=MINE, node_id="1"),
        text("executing", node=None, prompt_id=MINE),
    ],
)
async def test_untagged_binaries_pass_only_in_own_execution_window(
    store: MemoryOwnershipStore, end: str
) -> None:
    events = make(store)
    preview1 = binary(1)
    assert await events(preview1) is None
    assert await events(text("execution_start", prompt_id=THEIRS)) is None
    assert await events(preview1) is None  # someone else's run
    assert await events(text("execution_start", prompt_id=MINE)) is not None
    assert await events(preview1) is preview1
    assert await events(TEXT3) is TEXT3
    assert await events(text("execution_success", prompt_id=THEIRS)) is None
    assert await events(preview1) is preview1  # a foreign end event does not close ours
    assert await events(end) is not None
    assert await events(preview1) is None
    assert await events(TEXT3) is None


async def test_connect_time_executing_opens_the_window(store: MemoryOwnershipStore) -> None:
    events = make(store)
    assert await events(text("executing", node="7")) is not None
    assert await events(TEXT3) is TEXT3
    assert await events(text("execution_success", prompt_id=MINE)) is not None
    assert await events(TEXT3) is None


async def test_executed_outputs_recorded_as_callers_files(store: MemoryOwnershipStore) -> None:
    events = make(store)
    output = {
        "images": [{"filename": "ComfyUI_temp_abc_00001_.png", "subfolder": "", "type": "temp"}]
    }
    await events(text("executed", node="9", output=output, prompt_id=MINE))
    assert await store.file_owner(("temp", "", "ComfyUI_temp_abc_00001_.png")) == "alice"
    other = {"images": [{"filename": "theirs.png", "subfolder": "", "type": "temp"}]}
    await events(text("executed", node="9", output=other, prompt_id=THEIRS))
    assert await store.file_owner(("temp", "", "theirs.png")) is None


@pytest.mark.parametrize(
    ("node", "item"),
    [
        # Not one of the prompt's preview nodes (e.g. Preview3D echoing camera_info).
        ("3", {"filename": "x.png", "subfolder": "", "type": "temp"}),
        (None, {"filename": "x.png", "subfolder": "", "type": "temp"}),
        # A preview node's output, but not a preview ComfyUI names itself.
        ("9", {"filename": "x.png", "subfolder": "users/bob-0123", "type": "temp"}),
        ("9", {"filename": "x.png", "subfolder": "", "type": "input"}),
        ("9", {"filename": "x.png", "subfolder": "", "type": "output"}),
        ("9", {"filename": "x.png"}),  # type defaults to output
        ("9", {"filename": "users/bob-0123/x.png", "subfolder": "", "type": "temp"}),
        ("9", {"filename": "..", "subfolder": "", "type": "temp"}),
    ],
)
async def test_executed_files_not_attributable_are_not_recorded(
    store: MemoryOwnershipStore, node: str | None, item: dict[str, str]
) -> None:
    events = make(store)
    frame = text("executed", node=node, output={"result": ["", item]}, prompt_id=MINE)
    assert await events(frame) == frame  # the event itself is the caller's and passes
    ref = (item.get("type", "output"), item.get("subfolder", ""), item["filename"])
    assert await store.file_owner(ref) is None


async def test_a_preview_claimed_first_stays_its_owners(store: MemoryOwnershipStore) -> None:
    name = "ComfyUI_temp_qwert_00001_.png"
    await store.record_files("bob", [("temp", "", name)])
    output = {"images": [{"filename": name, "subfolder": "", "type": "temp"}]}
    await make(store)(text("executed", node="9", output=output, prompt_id=MINE))
    assert await store.file_owner(("temp", "", name)) == "bob"


async def test_admin_sees_everything(store: MemoryOwnershipStore) -> None:
    events = make(store, admin=True)
    for frame in (
        text("execution_start", prompt_id=THEIRS),
        text("logs", entries=[]),
        text("display_component", node_id="1"),
        "not json",
        preview4(THEIRS),
        binary(1),
        TEXT3,
        binary(77),
    ):
        assert await events(frame) is frame


async def test_ownership_lookups_are_cached(store: MemoryOwnershipStore) -> None:
    events = make(store)
    calls: list[str] = []
    lookup = store.prompt

    async def counting(prompt_id: str) -> PromptRecord | None:
        calls.append(prompt_id)
        return await lookup(prompt_id)

    store.prompt = counting  # type: ignore[method-assign]
    for _ in range(3):
        await events(text("progress", prompt_id=MINE))
        await events(text("progress", prompt_id=THEIRS))
        await events(preview4(MINE))
    assert sorted(calls) == [MINE, THEIRS]


def test_preview_prompt_id() -> None:
    assert preview_prompt_id(preview4(MINE)) == MINE
    assert preview_prompt_id(b"\x00\x00\x00\x04") is None
    assert preview_prompt_id(struct.pack(">II", 4, 3) + b"{x}") is None


async def test_broadcast_prompt_window_opens_on_progress_and_closes_on_status_or_others(
    store: MemoryOwnershipStore,
) -> None:
    """A prompt without a client_id: ComfyUI broadcasts only its progress events, previews and
    the queue status (no execution_start, no end event)."""
    events = make(store)
    preview1 = binary(1)
    assert await events(text("progress_state", prompt_id=MINE, nodes={})) is not None
    assert await events(preview1) is preview1
    assert await events(text("status", status={"exec_info": {"queue_remaining": 0}})) is not None
    assert await events(preview1) is None  # the queue moved: the broadcast prompt is over
    assert await events(text("progress", prompt_id=MINE, value=1, max=2, node="9")) is not None
    assert await events(preview1) is preview1
    # Another prompt's progress (a broadcast one reaches every socket): ours is not running.
    assert await events(text("progress", prompt_id=THEIRS, value=1, max=2, node="9")) is None
    assert await events(preview1) is None
    assert await events(text("progress", prompt_id=MINE, value=2, max=2, node="9")) is not None
    assert await events(text("executing", node="9", prompt_id=UNKNOWN)) is None
    assert await events(preview1) is None  # cannot be told to be ours: closed
