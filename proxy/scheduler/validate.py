"""ComfyUI's validation, predicted before a prompt is held (``docs/scheduler.md``).

With the gateway queue on, ComfyUI sees a prompt only at release, so its 400 answer (with the
``node_errors`` the stock UI outlines nodes with) could no longer reach the client.
:class:`HoldValidator` predicts that answer from the ``/object_info`` of every instance the
prompt may be released to (:mod:`proxy.comfy.validation`) and :class:`~proxy.scheduler.hook.
HoldGuard` refuses with it, exactly as ComfyUI would, before anything is held.

It refuses only when sure, for every candidate instance, with the same answer:

- an unsure prediction (module doc of :mod:`proxy.comfy.validation`: custom validation, custom
  ``"*"`` types, what would raise inside ComfyUI) is held as before, ComfyUI deciding at
  release (a refusal then becomes an ``execution_error``);
- an answer that rests on lists the instance re-reads on every ``/object_info`` (a combo's
  models or files, the installed classes) is re-checked against a copy at most
  :data:`FRESH_SECONDS` old: an older copy is refetched once (the fetch is shared by
  concurrent prompts, so an instance is asked at most once per :data:`FRESH_SECONDS` for this);
  if that fails, the prompt is held;
- instances that disagree (different models, classes): held.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from proxy.comfy.validation import Rules, Verdict, validate_prompt
from proxy.errors import ProxyError
from proxy.policy.catalog.cache import ObjectInfoCache, Snapshot
from proxy.policy.catalog.upstream import Catalog
from proxy.upstream.pool import Upstream

log = structlog.get_logger("comfygate.scheduler")

FRESH_SECONDS = 10.0
"""A copy of ``/object_info`` this young is trusted for a refusal on a combo's options."""
REFETCH_TIMEOUT = 15.0
"""How long a refusal waits for the refetch of a stale copy before holding instead."""
_NO_COPY = "no /object_info of the instance"


class HoldValidator:
    """Predicts ComfyUI's answer to a prompt on its candidate instances (module doc); keeps
    one :class:`Rules` per instance, per copy of its ``/object_info``."""

    def __init__(self) -> None:
        self._rules: dict[str, tuple[Snapshot, Rules]] = {}

    async def verdict(
        self, catalog: Catalog, instances: Sequence[Upstream], body: bytes
    ) -> Verdict:
        """ComfyUI's answer to ``body`` (the bytes it will be sent) on every one of
        ``instances``, when they all agree; an unsure :class:`Verdict` otherwise."""
        if not instances:
            return Verdict(None, unsure="no instance to validate on")
        # ComfyUI reads the body with json.loads: validate what it will read.
        sent = json.loads(body)
        graph = sent.get("prompt")
        if not isinstance(graph, dict):
            return Verdict(None, unsure="no prompt")
        partial = sent.get("partial_execution_targets")
        try:
            verdicts = [await self._on(catalog.cache(u), u.name, graph, partial) for u in instances]
        except Exception:  # a bug here must not refuse (or 500) what ComfyUI would judge
            log.exception("hold_validation_crashed")
            return Verdict(None, unsure="the prediction failed")
        first = verdicts[0]
        if any(v.unsure for v in verdicts):
            return next(v for v in verdicts if v.unsure)
        if any((v.error, v.node_errors) != (first.error, first.node_errors) for v in verdicts):
            return Verdict(None, unsure="the candidate instances disagree")
        return first

    async def _on(
        self, cache: ObjectInfoCache, name: str, graph: Mapping[str, Any], partial: object
    ) -> Verdict:
        snapshot = cache.snapshot
        if snapshot is None:
            snapshot = await _fetched(cache, refetch=False)
            if snapshot is None:
                return Verdict(None, unsure=_NO_COPY)
        verdict = validate_prompt(graph, self._rules_of(name, snapshot), partial)
        needs_fresh = verdict.stale_sensitive and (verdict.error or verdict.node_errors)
        if not needs_fresh or verdict.unsure:
            return verdict
        if cache.clock() - snapshot.fetched_at <= FRESH_SECONDS:
            return verdict
        fresh = await _fetched(cache, refetch=True)
        if fresh is None or cache.clock() - fresh.fetched_at > FRESH_SECONDS:
            log.info("hold_validation_stale", upstream=name)
            return Verdict(None, unsure="the instance's /object_info could not be refreshed")
        return validate_prompt(graph, self._rules_of(name, fresh), partial)

    def _rules_of(self, name: str, snapshot: Snapshot) -> Rules:
        known = self._rules.get(name)
        if known is not None and known[0] is snapshot:
            return known[1]
        rules = Rules(snapshot.info)
        self._rules[name] = (snapshot, rules)
        return rules


async def _fetched(cache: ObjectInfoCache, *, refetch: bool) -> Snapshot | None:
    """A copy of the instance's ``/object_info`` (fetched now with ``refetch``); None when none
    can be had in time."""
    try:
        async with asyncio.timeout(REFETCH_TIMEOUT):
            current = await (cache.refetch() if refetch else cache.current())
    except (ProxyError, TimeoutError):
        return None
    return current if isinstance(current, Snapshot) else None


__all__ = ["FRESH_SECONDS", "HoldValidator"]
