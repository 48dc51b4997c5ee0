"""Where the catalog comes from: one ``/object_info`` cache per ComfyUI instance
(``app[CATALOG]``), and the one way the catalog asks ComfyUI something (:func:`fetch_answer`:
the whole answer, decoded, because it is going to be read).

Issue 8 (several instances): :meth:`Catalog.cache` is per instance; the merged view
(:attr:`Catalog.union`, ``catalog_union``) is the union over the caches of ``pool.reachable()``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from aiohttp import hdrs, web
from multidict import CIMultiDict

from proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnavailable
from proxy.multi.capabilities import OBJECT_INFO
from proxy.observability.metrics import METRICS, Metrics
from proxy.policy.catalog.cache import Answer, CatalogNotJson, Miss, ObjectInfoCache, Snapshot
from proxy.policy.catalog.http import JSON, is_json
from proxy.policy.catalog.union import UnionView
from proxy.policy.store import POLICY
from proxy.settings import SETTINGS, Settings
from proxy.upstream.encoding import content_codings, decode
from proxy.upstream.headers import client_response_headers
from proxy.upstream.http1 import UpstreamConnectError, UpstreamHttpError, UpstreamHttpTimeout
from proxy.upstream.pool import POOL, Upstream, UpstreamPool

OBJECT_INFO_PATHS = ("/api/object_info", "/object_info")
"""Where a background refresh fetches the catalog: the stock frontend's path first, the bare one
for a ComfyUI without the ``/api`` mirror (before 0.2, which answers 404 to the first)."""
TRANSPORT_ERRORS = (UpstreamHttpError, TimeoutError, OSError)


class Catalog:
    """The ``/object_info`` caches, one per ComfyUI instance (``app[CATALOG]``)."""

    def __init__(
        self,
        pool: UpstreamPool,
        metrics: Metrics,
        settings: Settings,
        *,
        on_object_info: Callable[[Mapping[str, Any]], None] | None = None,
        policy_version: Callable[[], int] | None = None,
    ) -> None:
        """``on_object_info``: called with every new upstream answer (the policy store learns
        each node type's outputs from it). ``policy_version``: the policy store's version (a
        copy fetched in the background under the current policy is not refetched for it)."""
        self._pool = pool
        self._policy_version = policy_version
        self._on_object_info = on_object_info
        self._metrics = metrics
        self._ttl = float(settings.policy.object_info_ttl_seconds)
        self.max_bytes = int(settings.server.max_inspected_body_mb * 1024 * 1024)
        """Largest answer (decoded) the catalog reads: ``server.max_inspected_body_mb``."""
        self._caches: dict[str, ObjectInfoCache] = {}
        self.union = UnionView()
        """The union of several instances' copies (``catalog_union``)."""

    async def object_info(self, name: str) -> tuple[object, Mapping[str, Any]] | None:
        """Instance ``name``'s current ``/object_info`` through its cache, for placement
        (``proxy.multi.capabilities.OBJECT_INFO``: one fetch serves the clients and placement);
        None for an unknown instance, or when ComfyUI answered an error (keep what was known)."""
        upstream = self._pool.get(name)
        if upstream is None:
            return None
        current = await self.cache(upstream).current()
        if not isinstance(current, Snapshot):
            return None
        return (current.generation, current.info)

    def cache(self, upstream: Upstream) -> ObjectInfoCache:
        """The cache of one instance (created on first use: instances may join at runtime)."""
        cache = self._caches.get(upstream.name)
        if cache is None:

            async def fetch(miss: Miss | None) -> Answer:
                outcome = "failed"
                try:
                    answer = await self._fetch(upstream, miss)
                    if answer.status == 200:
                        outcome = "ok"
                    return answer
                finally:
                    self._metrics.catalog_refreshes.labels(upstream.name, outcome).inc()

            cache = self._caches[upstream.name] = ObjectInfoCache(
                upstream.name,
                fetch,
                ttl=self._ttl,
                on_snapshot=self._snapshot_taken,
                policy_version=self._policy_version,
            )
        return cache

    def _snapshot_taken(self, snapshot: Snapshot) -> None:
        if self._on_object_info is None:
            return
        others = [
            c.snapshot.info
            for c in self._caches.values()
            if c.snapshot is not None and c.snapshot is not snapshot
        ]
        if not others:
            self._on_object_info(snapshot.info)
            return
        # Several instances: the listener (the policy store's output counts) replaces what it
        # knew, so it hears every class any instance has, not only the one just refreshed.
        merged: dict[str, Any] = {}
        for info in (*others, snapshot.info):
            merged.update(info)
        self._on_object_info(merged)

    async def idle(self) -> None:
        """Until no refresh is in flight anywhere."""
        for cache in list(self._caches.values()):
            await cache.idle()

    async def close(self) -> None:
        for cache in self._caches.values():
            await cache.close()

    async def _fetch(self, upstream: Upstream, miss: Miss | None) -> Answer:
        """One ``GET /object_info`` for everybody: none of a client's own headers, credentials
        or cookies, only the identity the proxy asserts for the client of a miss."""
        headers = [("Host", upstream.host_header), ("Accept", JSON), ("Accept-Encoding", "gzip")]
        paths: Sequence[str] = OBJECT_INFO_PATHS
        if miss is not None:
            paths = (miss[0],)
            headers.extend(miss[1].items())
        try:
            for path in paths:
                answer = await fetch_answer(
                    self._pool, upstream, path, headers, limit=self.max_bytes
                )
                if answer.status != 404:
                    break
        except TRANSPORT_ERRORS as exc:
            raise _transport_error(exc, upstream, self._metrics) from None
        if answer.status == 200 and not is_json(answer.content_type):
            raise CatalogNotJson(
                f"ComfyUI at {upstream.name} sent an /object_info that is not JSON"
            )
        return answer


async def fetch_answer(
    pool: UpstreamPool,
    upstream: Upstream,
    raw_path: str,
    headers: Sequence[tuple[str, str]],
    *,
    limit: int,
) -> Answer:
    """``GET raw_path`` and the whole answer, gzip/deflate decoded, at most ``limit`` bytes
    (``proxy.upstream.encoding``, the one reader of encoded answers).

    Raises:
        UpstreamHttpError, TimeoutError, OSError: the exchange failed (:data:`TRANSPORT_ERRORS`).
        UpstreamUnavailable: the answer is larger than ``limit``.
        UnreadableAnswer: an encoding that was not asked for, or a corrupt one.
    """
    resp = await pool.http1(upstream).request(
        hdrs.METH_GET, upstream.target_prefix + raw_path, list(headers), None
    )
    try:
        chunks: list[bytes] = []
        size = 0
        while chunk := await resp.read_chunk():
            size += len(chunk)
            if size > limit:
                raise UpstreamUnavailable(f"ComfyUI at {upstream.name}: answer too large to read")
            chunks.append(chunk)
    finally:
        resp.release()
    body = b"".join(chunks)
    compressed = bool(content_codings(resp.headers))
    body = decode(body, resp.headers, limit=limit, upstream=upstream.name, metrics=pool.metrics)
    out: CIMultiDict[str] = client_response_headers(resp.headers)
    out.popall(hdrs.CONTENT_ENCODING, None)
    return Answer(resp.status, resp.reason, out, body, compressed)


def _transport_error(exc: BaseException, upstream: Upstream, metrics: Metrics) -> ProxyError:
    """The background fetch has no request: the same mapping as ``forward.map_client_error``."""
    if isinstance(exc, (TimeoutError, UpstreamHttpTimeout)):
        metrics.upstream_errors.labels(upstream.name, "timeout").inc()
        return UpstreamTimeout(f"ComfyUI at {upstream.name} did not answer in time")
    kind = "refused" if isinstance(exc, UpstreamConnectError) else "protocol"
    metrics.upstream_errors.labels(upstream.name, kind).inc()
    return UpstreamUnavailable(f"ComfyUI at {upstream.name} is unreachable ({type(exc).__name__})")


async def catalog_context(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: the caches live as long as the upstream pool they fetch through."""

    def learn(info: Mapping[str, Any]) -> None:
        store = app.get(POLICY)
        if store is not None:
            store.set_object_info(info)

    def policy_version() -> int:
        store = app.get(POLICY)
        return store.version if store is not None else 0

    catalog = Catalog(
        app[POOL],
        app[METRICS],
        app[SETTINGS],
        on_object_info=learn,
        policy_version=policy_version,
    )
    app[CATALOG] = catalog
    app[OBJECT_INFO] = catalog.object_info
    yield
    await catalog.close()


CATALOG = web.AppKey("comfygate.catalog", Catalog)
"""``/object_info`` cached per ComfyUI instance, filtered per role (``proxy.policy.catalog``)."""
