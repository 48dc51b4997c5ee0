"""The caller's entries of a short history answer (``GET /history/{id}``), in one store read.

The general path reads every prompt id the caller owns (``OwnershipStore.prompts_of``: a Redis
sorted-set range that grows with what the user ever submitted) and then the records of the
entries it kept (a second round trip, for the client ids to show). An answer of a few entries
needs neither: the records of its own keys say both whose each entry is and which client id it
was sent with. Same decision (an entry is shown iff its record is the caller's; no record, or
another owner's: not shown), one round trip, a cost that does not grow with the caller's
history (issue 17).
"""

from __future__ import annotations

from typing import Any

from proxy.comfy import views
from proxy.isolation.record_cache import RecordCache
from proxy.tenancy.ownership import OwnershipStore

MAX_KEYS = 16
"""Answers with more entries take the general path (one set read beats many record reads)."""


async def own_entries(
    ownership: OwnershipStore, owner: str, history: object, cache: RecordCache | None = None
) -> tuple[dict[str, Any], dict[str, str]] | None:
    """The caller's entries of ``history`` (ComfyUI's order) and the client ids to show in them
    (``views.sent_client_ids``); None when ``history`` has too many entries for this path.
    With ``cache``, records already read for these entries cost no round trip
    (:mod:`proxy.isolation.record_cache`: ComfyUI answered with these entries).

    Raises:
        RedisError (and the store's other errors): the records could not be read; the caller
        treats it as a failed ``prompts_of``.
    """
    if not isinstance(history, dict):
        return {}, {}
    if len(history) > MAX_KEYS:
        return None
    ids = list(history)
    if not ids:
        return {}, {}
    records = await (ownership.records(ids) if cache is None else cache.records(ownership, ids))
    mine = {pid: r for pid, r in zip(ids, records, strict=True) if r and r.owner == owner}
    return views.filter_history(history, mine), views.sent_client_ids(mine.values())


__all__ = ["MAX_KEYS", "own_entries"]
