"""ComfyUI's ``/object_info``, cached per instance, with one ready-to-send copy per role.

``/object_info`` is the frontend's first big request: several hundred KB to several MB of JSON
that ComfyUI rebuilds on every call (it rescans the model folders), hundreds of ms each time.
:class:`ObjectInfoCache` keeps one parsed answer per upstream:

* **stale-while-revalidate**: once a copy exists, a request never waits for ComfyUI; a copy
  older than the TTL is served while one background fetch replaces it.
* **one fetch at a time**: concurrent misses (and refreshes) share one upstream request.
* **errors**: a failed refresh (unreachable, 5xx, not JSON) keeps the old copy in force and is
  retried after :data:`RETRY_SECONDS`; with no copy yet, the upstream's error answer is passed
  through unchanged (and not cached) and transport failures become the usual 502/504.
* **transparency**: the fetch that fills an empty cache is the missing client's own request
  (its path, its ``Comfy-User``); refreshes are the proxy's. ComfyUI's answers are decoded
  (gzip) for reading, and the proxy compresses its answers exactly when ComfyUI does.
* **filtered copies**: per (policy version, role key), serialized once (orjson) with their ETag
  and, on first demand, their gzip/deflate forms. A new upstream answer or a policy reload (a new
  ``PolicyStore.version``) makes them obsolete; copies of the roles in use are rebuilt by the
  refresh itself, before the swap, so no client pays for the filtering after a refresh.
* **reload**: a new policy version also starts a background refetch (operators reload after
  installing models or nodes); meanwhile the copy in hand is filtered with the new policy.

The union over several instances (issue 8) happens above this cache
(:func:`~proxy.policy.catalog.filter.union_object_info`); this module knows one instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from proxy.errors import ProxyError, UpstreamError
from proxy.policy.catalog.filter import filter_object_info, model_classes
from proxy.policy.model import RolePolicy

log = structlog.get_logger("comfygate.catalog")

RETRY_SECONDS = 5.0
"""After a failed refresh, the stale copy is served this long before the next attempt (at most
the TTL)."""
MAX_COPIES = 256
"""Filtered copies kept per instance; past it they are rebuilt on demand (role keys are
bounded, so this only guards against a misbehaving key function)."""
ZLIB_LEVEL = 6
"""zlib's default, as aiohttp (and so ComfyUI) compresses."""


class Rendered:
    """One answer ready to send: its bytes, a weak ETag, and its encoded forms, each made once."""

    __slots__ = ("_encoded", "body", "content_type", "etag")

    def __init__(self, body: bytes, content_type: str) -> None:
        self.body = body
        self.content_type = content_type
        # Weak: the same representation is sent identity, gzip or deflate encoded.
        self.etag = f'W/"{hashlib.blake2b(body, digest_size=16).hexdigest()}"'
        self._encoded: dict[str, asyncio.Future[bytes]] = {}

    async def encoded(self, coding: str) -> bytes:
        """The body in ``coding`` (``gzip`` or ``deflate``), compressed in a worker thread the
        first time (zlib releases the GIL), then reused; concurrent first callers share it."""
        future = self._encoded.get(coding)
        if future is None:
            future = asyncio.ensure_future(asyncio.to_thread(encode, self.body, coding))
            self._encoded[coding] = future
        return await asyncio.shield(future)


def encode(body: bytes, coding: str) -> bytes:
    """``gzip`` (no file name, no mtime: deterministic) or ``deflate`` (zlib-wrapped, as
    aiohttp and every browser understand it)."""
    wbits = 16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS
    compressor = zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, wbits)
    return compressor.compress(body) + compressor.flush()


@dataclass(frozen=True, slots=True)
class Answer:
    """One upstream answer with its body decoded (the proxy must read it)."""

    status: int
    reason: str
    headers: Mapping[str, str]
    """For the client: hop-by-hop, ``Content-Length`` and ``Content-Encoding`` removed."""
    body: bytes
    """Identity-encoded."""
    compressed: bool
    """ComfyUI gzip-encoded it (``--enable-compress-response-body``): the proxy's answers are
    compressed for clients that accept it, as ComfyUI's would be, and only then."""

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")


Miss = tuple[str, Mapping[str, str]]
"""A client's request that found no copy: its raw path (no query) and the identity headers the
proxy asserts for it (``Comfy-User``); the fetch it starts is sent as that request."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One successful upstream answer."""

    generation: int
    info: dict[str, Any]
    raw: Rendered
    """The upstream's bytes as received (decoded): what an unrestricted principal gets."""
    compressed: bool
    """See :attr:`Answer.compressed`."""
    fetched_at: float
    models: frozenset[str]
    """Classes with model-file combos (see ``catalog_filter.model_classes``)."""


class CatalogNotJson(UpstreamError):
    """ComfyUI answered 200 with something that is not a JSON object: it cannot be filtered,
    so it is not sent to anyone (rendered as 502)."""

    status = 502
    error_type = "upstream_bad_catalog"


@dataclass
class _RoleCopies:
    """Filtered copies of one snapshot, and the policies they were made with (to rebuild)."""

    generation: int = -1
    copies: dict[tuple[int, str], Rendered] = field(default_factory=dict)
    policies: dict[str, tuple[int, RolePolicy]] = field(default_factory=dict)


class ObjectInfoCache:
    """The cached ``/object_info`` of one ComfyUI instance (see the module docstring)."""

    def __init__(
        self,
        name: str,
        fetch: Callable[[Miss | None], Awaitable[Answer]],
        *,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        on_snapshot: Callable[[Snapshot], None] | None = None,
        policy_version: Callable[[], int] | None = None,
    ) -> None:
        """``policy_version``: the policy store's current version; a copy fetched under it is
        not refetched when a caller first names that version (a background fetch, such as the
        registry's capability read, knows no version)."""
        self.name = name
        self._current_policy_version = policy_version
        self._on_snapshot = on_snapshot
        self.ttl = ttl
        self.clock = clock
        self.fetches = 0
        """Upstream fetches started (introspection for tests and logs)."""
        self._fetch = fetch
        self._snapshot: Snapshot | None = None
        self._inflight: asyncio.Task[Snapshot | Answer] | None = None
        self._retry_at = 0.0
        self._policy_version = 0
        self._generation = 0
        self._roles = _RoleCopies()

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    async def current(self, policy_version: int = 0, miss: Miss | None = None) -> Snapshot | Answer:
        """The copy to answer from: the cached one (a refresh starts in the background when it
        is older than the TTL or the policy was reloaded since it was fetched), or, with none
        yet, the result of the shared fetch: a :class:`Snapshot`, or ComfyUI's error
        :class:`Answer` (not cached).

        ``miss``: the client's request, sent as the fetch when it finds no copy (so ComfyUI
        sees the path and user it would see without the proxy); background refreshes are the
        proxy's own. The answer is shared either way: ``/object_info`` is the same for all.

        Raises:
            ProxyError: no copy yet and ComfyUI could not be reached or sent no catalog.
        """
        reloaded = policy_version > self._policy_version
        if reloaded:
            self._policy_version = policy_version
        snapshot = self._snapshot
        if snapshot is None or self.ttl <= 0:
            return await asyncio.shield(self._start(miss))
        now = self.clock()
        if reloaded or (now - snapshot.fetched_at >= self.ttl and now >= self._retry_at):
            # A reload is when operators expect new models and nodes to show: refetch too.
            self._start(None)
        return snapshot

    async def refetch(self) -> Snapshot | Answer:
        """A copy fetched now (joining a fetch in flight), whatever the TTL: the gateway
        queue's check before it refuses a prompt on a list the instance re-reads (models,
        input files). A failed fetch gives the stale copy, as :meth:`current` would.

        Raises:
            ProxyError: no copy yet and ComfyUI could not be reached or sent no catalog.
        """
        return await asyncio.shield(self._start(None))

    def copy_for(
        self, snapshot: Snapshot, policy: RolePolicy, version: int, role_key: str
    ) -> Rendered:
        """The filtered copy of ``snapshot`` for principals with this effective policy."""
        roles = self._roles
        if roles.generation != snapshot.generation:
            if snapshot.generation < roles.generation:
                # A request that started before a refresh swapped: answer it, keep nothing.
                return _filtered(snapshot, policy)
            roles.generation = snapshot.generation
            roles.copies.clear()
        key = (version, role_key)
        rendered = roles.copies.get(key)
        if rendered is None:
            if len(roles.copies) >= MAX_COPIES or any(v != version for v, _ in roles.copies):
                # A reload makes every copy of the older version obsolete at once.
                roles.copies = {k: r for k, r in roles.copies.items() if k[0] == version}
                if len(roles.copies) >= MAX_COPIES:
                    roles.copies.clear()
            rendered = _filtered(snapshot, policy)
            roles.copies[key] = rendered
            roles.policies[role_key] = (version, policy)
        return rendered

    async def idle(self) -> None:
        """Until no fetch is in flight (tests wait on this instead of sleeping)."""
        while (task := self._inflight) is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    async def close(self) -> None:
        """Cancel a fetch in flight (application shutdown)."""
        task = self._inflight
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    def _start(self, miss: Miss | None) -> asyncio.Task[Snapshot | Answer]:
        task = self._inflight
        if task is None:
            self.fetches += 1
            task = self._inflight = asyncio.create_task(self._refresh(miss))
            # Retrieve the outcome even when every waiter went away (no "never retrieved").
            task.add_done_callback(_consume)
        return task

    async def _refresh(self, miss: Miss | None) -> Snapshot | Answer:
        try:
            answer = await self._fetch(miss)
            if answer.status != 200:
                return self._failed(answer, f"status {answer.status}")
            snapshot = self._parse(answer)
            if self._current_policy_version is not None:
                self._policy_version = max(self._policy_version, self._current_policy_version())
            self._prebuild(snapshot)
            self._snapshot = snapshot
            if self._on_snapshot is not None:
                self._on_snapshot(snapshot)
            log.info(
                "catalog_refreshed",
                upstream=self.name,
                generation=snapshot.generation,
                classes=len(snapshot.info),
                bytes=len(answer.body),
            )
            return snapshot
        except ProxyError as exc:
            return self._failed(exc, exc.error_type)
        except Exception as exc:  # a bug must not take the stale copy down with it
            log.exception("catalog_refresh_crashed", upstream=self.name)
            failure = ProxyError("internal proxy error", error_type="internal_error")
            return self._failed(failure, type(exc).__name__)
        finally:
            self._inflight = None

    def _failed(self, outcome: Answer | ProxyError, why: str) -> Snapshot | Answer:
        """A fetch that brought no catalog: keep serving the stale copy if there is one."""
        stale = self._snapshot
        self._retry_at = self.clock() + min(self.ttl, RETRY_SECONDS)
        log.warning(
            "catalog_refresh_failed",
            upstream=self.name,
            reason=why,
            serving_stale=stale is not None,
        )
        if stale is not None:
            return stale
        if isinstance(outcome, ProxyError):
            raise outcome
        return outcome

    def _parse(self, answer: Answer) -> Snapshot:
        try:
            info = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            info = None
        if not isinstance(info, dict):
            raise CatalogNotJson(f"ComfyUI at {self.name} sent an /object_info that is not JSON")
        self._generation += 1
        return Snapshot(
            generation=self._generation,
            info=info,
            raw=Rendered(answer.body, answer.content_type),
            compressed=answer.compressed,
            fetched_at=self.clock(),
            models=model_classes(info),
        )

    def _prebuild(self, snapshot: Snapshot) -> None:
        """Filtered copies of the new snapshot for the roles served from the old one (at their
        latest policy version), so the first request after the swap finds them ready."""
        latest = max((v for v, _ in self._roles.policies.values()), default=None)
        for role_key, (version, policy) in list(self._roles.policies.items()):
            if version == latest:
                self.copy_for(snapshot, policy, version, role_key)
            else:
                del self._roles.policies[role_key]


def render(obj: Any, content_type: str) -> Rendered:
    """Serialize once (orjson: compact, several times faster than ComfyUI's json.dumps)."""
    return Rendered(orjson.dumps(obj), content_type)


def _filtered(snapshot: Snapshot, policy: RolePolicy) -> Rendered:
    """A role's copy, with the content type ComfyUI sent."""
    info = filter_object_info(snapshot.info, policy, snapshot.models)
    return render(info, snapshot.raw.content_type)


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
