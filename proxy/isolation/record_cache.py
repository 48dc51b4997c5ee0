"""Per-process memory of whose each prompt in ComfyUI's history is (issue 17: a user polling
``GET /history/{id}`` costs a Redis round trip per request without it).

What is cached, and why it cannot show B's entry to A:

* Only **positive** facts: a record that exists (``owner``, the ``client_id`` the owner sent).
  "No record" is never cached: a record being written, or one lost to a Redis failure, must be
  asked again.
* Only for ids ComfyUI **answered with a history entry**: the prompt was accepted and ran. The
  store forgets records (freeing the id, which a client may choose) only for prompts ComfyUI
  never accepted (refused, not placed, cancelled while held) or to move one to another instance
  before it is sent (owner and client id unchanged). A prompt in ComfyUI's history keeps its
  owner and client id until its record expires.
* Never past the record's own expiry (``created_at + isolation.retention_seconds``), after
  which the id could be claimed again; and never longer than :data:`MAX_AGE_SECONDS`, so a
  record removed by hand in Redis (an operator's fix) is seen within that bound.
* Bounded (:data:`MAX_ENTRIES`); cleared when full, as the WebSocket filter's owner cache.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from typing import Final

from proxy.comfy.records import PromptRecord
from proxy.tenancy.ownership import OwnershipStore

MAX_ENTRIES: Final = 16_384
MAX_AGE_SECONDS: Final = 300.0


class RecordCache:
    """Records of prompts in ComfyUI's history, as read from the store (see the module doc)."""

    def __init__(self, retention_seconds: float) -> None:
        self._retention = retention_seconds
        self._entries: dict[str, tuple[float, PromptRecord]] = {}

    def get(self, prompt_id: str, now: float) -> PromptRecord | None:
        hit = self._entries.get(prompt_id)
        if hit is None:
            return None
        if hit[0] <= now:
            del self._entries[prompt_id]
            return None
        return hit[1]

    def put(self, record: PromptRecord, now: float) -> None:
        expires = min(now + MAX_AGE_SECONDS, record.created_at + self._retention)
        if expires <= now:
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[record.prompt_id] = (expires, record)

    async def records(
        self, ownership: OwnershipStore, prompt_ids: Sequence[str]
    ) -> list[PromptRecord | None]:
        """``ownership.records(prompt_ids)`` for ids of history entries: known ones from here,
        the others in one round trip (none when every id is known)."""
        now = time.time()
        found = [self.get(pid, now) for pid in prompt_ids]
        missing = [pid for pid, record in zip(prompt_ids, found, strict=True) if record is None]
        if not missing:
            return found
        read = dict(zip(missing, await ownership.records(missing), strict=True))
        out: list[PromptRecord | None] = []
        for pid, record in zip(prompt_ids, found, strict=True):
            if record is None and (record := read[pid]) is not None:
                self.put(record, now)
            out.append(record)
        return out


_CACHES: weakref.WeakKeyDictionary[OwnershipStore, RecordCache] = weakref.WeakKeyDictionary()


def record_cache(ownership: OwnershipStore, retention_seconds: float) -> RecordCache:
    """The cache of ``ownership`` (one per store, so per app and per test)."""
    cache = _CACHES.get(ownership)
    if cache is None:
        cache = _CACHES[ownership] = RecordCache(retention_seconds)
    return cache


__all__ = ["MAX_AGE_SECONDS", "MAX_ENTRIES", "RecordCache", "record_cache"]
