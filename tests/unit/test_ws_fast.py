"""Quick decisions (``proxy.relay.ws_fast``) never contradict the filters' full calls."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from proxy.comfy.records import PromptRecord
from proxy.limits.quota.reconciler import QuotaEventObserver
from proxy.state import UNDECIDED, compose_frame_filters, quick_of
from proxy.tenancy.ownership import MemoryOwnershipStore
from tests.unit.test_isolation_events import (
    MINE,
    TEXT3,
    THEIRS,
    UNKNOWN,
    binary,
    make,
    preview4,
    store,  # noqa: F401 - fixture
    text,
)

FRAMES: list[str | bytes] = [
    text("status", status={"exec_info": {"queue_remaining": 1}}),
    text("status", sid="ns-a"),
    text("execution_start", prompt_id=MINE),
    text("progress", prompt_id=THEIRS, value=1, max=2),
    text("logs", entries=[]),
    text("executing", node=None, prompt_id=MINE),
    "not json",
    preview4(MINE),
    preview4(THEIRS),
    preview4(UNKNOWN),
    preview4(7),
    binary(1),
    TEXT3,
    binary(77),
    b"\x00",
    b"\x00\x00\x00\x04\x00\x00\xff\xff{",
]


async def check_sequence(events: Callable[[str | bytes], Awaitable[str | bytes | None]]) -> int:
    """Every frame: the quick answer (if any) equals the full call's; returns how many were
    decided quickly."""
    quick = quick_of(events)
    assert quick is not None
    decided = 0
    for _ in range(2):  # the second round runs with warm caches
        for frame in FRAMES:
            fast = quick(frame)
            full = await events(frame)
            if fast is not UNDECIDED:
                decided += 1
                assert fast == full, frame
    return decided


@pytest.mark.parametrize("admin", [False, True])
async def test_isolation_quick_agrees_with_full(
    store: MemoryOwnershipStore,  # noqa: F811
    admin: bool,
) -> None:
    assert await check_sequence(make(store, admin=admin)) > 0


async def test_composed_filters_quick_agrees_with_full(
    store: MemoryOwnershipStore,  # noqa: F811
) -> None:
    """The quota's observer then isolation's filter, composed as the relay composes
    ``ctx.frame_filters``: the composition decides quickly only when both do, and agrees."""
    released: list[str] = []

    class Quota:
        async def release(self, ids: list[str], *, reason: str) -> None:
            released.extend(ids)

    observer = QuotaEventObserver(Quota())  # type: ignore[arg-type]
    assert observer.quick(text("execution_success", prompt_id=MINE)) is UNDECIDED
    composed = compose_frame_filters([observer, make(store)])
    assert composed is not None
    assert await check_sequence(composed) > 0
    assert released == [MINE]  # the end event went through the full call


async def test_preview_owner_looked_up_once_then_decided_quickly(
    store: MemoryOwnershipStore,  # noqa: F811
) -> None:
    events = make(store)
    lookups: list[str] = []
    lookup = store.prompt

    async def counting(prompt_id: str) -> PromptRecord | None:
        lookups.append(prompt_id)
        return await lookup(prompt_id)

    store.prompt = counting  # type: ignore[method-assign]
    mine, theirs = preview4(MINE), preview4(THEIRS)
    assert events.quick(mine) is UNDECIDED  # not looked up yet: the full call asks the store
    assert events.quick(theirs) is UNDECIDED
    assert await events(mine) is mine
    assert await events(theirs) is None
    for _ in range(5):
        assert events.quick(mine) is mine
        assert events.quick(theirs) is None
    assert lookups == [MINE, THEIRS]


async def test_store_failure_is_never_decided_quickly(store: MemoryOwnershipStore) -> None:  # noqa: F811
    events = make(store)

    async def failing(prompt_id: str) -> PromptRecord | None:
        raise ConnectionError("redis down")

    store.prompt = failing  # type: ignore[method-assign]
    frame = preview4(MINE)
    assert await events(frame) is None  # SECURITY: not attributed, dropped
    assert events.quick(frame) is UNDECIDED  # and not cached: the next frame asks again
