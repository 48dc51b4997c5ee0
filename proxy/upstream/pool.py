"""The ComfyUI instances behind the proxy (the registry), and the clients that reach them: a lean
HTTP/1.1 keep-alive pool per instance for forwarded requests (the hot path), and one aiohttp
session for WebSockets and probes.

Instances come from ``upstream.urls``/``upstream.instances`` and from DNS discovery, and join
and leave at runtime (:meth:`UpstreamPool.join`, :meth:`UpstreamPool.leave`). Each has a
circuit breaker (``health_checks``), a drain flag, its capabilities (``capabilities``) and what
placement needs to know about its load. Listeners (:meth:`UpstreamPool.subscribe`) hear
``joined``, ``left``, ``up`` and ``down``.

A single configured instance without discovery is *unmanaged*: no active checks, no breaker
(a dead ComfyUI answers 502 as before), no capability reads; every request goes to it.

Library errors from aiohttp's client are mapped here (and in ``forward``/``websocket``) to
:class:`~proxy.errors.UpstreamError`; nothing above ``upstream/`` sees an aiohttp client error.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import aiohttp
import structlog
from aiohttp import hdrs, web
from yarl import URL

from proxy.errors import ServiceUnavailable
from proxy.redis.breaker import BreakerState
from proxy.settings import UpstreamSettings
from proxy.settings.upstreams import instance_name
from proxy.tasks import task_failed
from proxy.upstream.health_checks import Breaker, probe
from proxy.upstream.http1 import Http1Pool

if TYPE_CHECKING:
    from proxy.comfy.capabilities import Capabilities
    from proxy.observability.metrics import Metrics
    from proxy.redis.client import RedisClient

log = structlog.get_logger("comfygate.upstream")

# The client library adds these unless told not to; a transparent proxy sends only what the client
# sent (an added Accept-Encoding would make ComfyUI compress what the client did not ask to be).
SKIP_AUTO_HEADERS = frozenset(
    {hdrs.USER_AGENT, hdrs.ACCEPT_ENCODING, hdrs.ACCEPT, hdrs.CONTENT_TYPE}
)
PROBE_TIMEOUT_SECONDS = 2.0
PROBE_CACHE_SECONDS = 1.0
DRAINED_KEY = "comfygate:upstreams:drained"
"""Redis set of drained instance names, shared by every proxy replica."""

PoolListener = Callable[[str, "Upstream"], Awaitable[None] | None]
"""A pool event listener: ``(event, upstream)``, event in joined/left/up/down."""
PoolEvent = Literal["joined", "left", "up", "down"]
FailureKind = Literal["refused", "timeout", "5xx", "check", "protocol"]
"""Why a request to an instance failed; ``refused`` (nothing listens) ejects at once."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """One ComfyUI instance."""

    name: str
    """Bounded label for logs, metrics, ownership records and the admin API (``host:port``
    unless configured)."""
    base: str
    """``scheme://host:port[/prefix]`` without a trailing slash; raw paths are appended."""
    host_header: str
    origin: str
    weight: float = 1.0
    tags: tuple[str, ...] = ()
    discovered: bool = False
    """Found by DNS discovery (leaves when the name no longer resolves to it)."""

    @classmethod
    def from_url(
        cls,
        raw: str,
        *,
        name: str = "",
        weight: float = 1.0,
        tags: tuple[str, ...] = (),
        discovered: bool = False,
    ) -> Upstream:
        url = URL(raw)
        netloc = instance_name(raw)
        return cls(
            name=name or netloc,
            base=raw.rstrip("/"),
            host_header=netloc,
            origin=f"{url.scheme}://{netloc}",
            weight=weight,
            tags=tuple(tags),
            discovered=discovered,
        )

    @property
    def target_prefix(self) -> str:
        """The path part of ``base`` (ComfyUI served under a prefix), still encoded."""
        return URL(self.base).raw_path.rstrip("/")

    def url_for(self, raw_path: str) -> URL:
        """The upstream URL for a raw (still percent-encoded) path and query, kept byte-exact."""
        return URL(self.base + raw_path, encoded=True)

    def ws_url_for(self, raw_path: str) -> URL:
        return URL(self.base.replace("http", "ws", 1) + raw_path, encoded=True)


@dataclass(eq=False)
class Instance:
    """The registry's mutable knowledge of one instance."""

    upstream: Upstream
    breaker: Breaker
    order: int
    """Position in the registry (configured order, then discovery order): the last tie-break."""
    capabilities: Capabilities | None = None
    """Node types and model lists from its ``/object_info``; None until read."""
    reported_queue: int | None = None
    """``queue_remaining`` at the last active check (pending + running)."""
    submitted_since_check: int = 0
    """Prompts it accepted from this proxy since that check."""
    last_checkpoints: frozenset[str] = frozenset()
    """The checkpoints its last prompt from this proxy loaded (model affinity)."""

    @property
    def outstanding(self) -> int:
        """Work ahead of a new prompt there: its reported queue plus what we sent since."""
        return (self.reported_queue or 0) + self.submitted_since_check

    def observe_queue(self, remaining: int | None) -> None:
        if remaining is not None:
            self.reported_queue = remaining
            self.submitted_since_check = 0


class UpstreamPool:
    """The registry of instances, the shared keep-alive pools, and readiness probes."""

    def __init__(
        self, settings: UpstreamSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        """Breakers' time source (tests advance it instead of sleeping)."""
        static = tuple(
            Upstream.from_url(i.url, name=i.name, weight=i.weight, tags=i.tags)
            for i in settings.static_instances
        )
        self.managed = len(static) > 1 or bool(settings.discovery.hostname)
        """Several instances (or discovery): health, placement and replication are on."""
        self._instances: dict[str, Instance] = {}
        self._order = 0
        self.upstreams: tuple[Upstream, ...] = ()
        """The current instances, in registry order (changes at runtime with discovery)."""
        for upstream in static:
            self._add(upstream)
        self._drained: set[str] = set()
        self._session: aiohttp.ClientSession | None = None
        self._http1: dict[str, Http1Pool] = {}
        self._probe_cache: dict[str, tuple[float, bool]] = {}
        self._listeners: list[PoolListener] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.metrics: Metrics | None = None
        self.redis: RedisClient | None = None

    # -- lifetime ---------------------------------------------------------------------------
    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("UpstreamPool used outside its cleanup context")
        return self._session

    def http1(self, upstream: Upstream) -> Http1Pool:
        """The lean HTTP/1.1 keep-alive pool that forwards plain HTTP requests to ``upstream``
        (created on first use: instances join at runtime)."""
        pool = self._http1.get(upstream.name)
        if pool is None:
            pool = self._http1[upstream.name] = self._new_http1(upstream)
        return pool

    def _new_http1(self, upstream: Upstream) -> Http1Pool:
        url = URL(upstream.base)
        secure = url.scheme == "https"
        return Http1Pool(
            host=url.raw_host or "",
            port=url.port or (443 if secure else 80),
            ssl=ssl.create_default_context() if secure else None,
            server_hostname=url.raw_host if secure else None,
            connect_timeout=self.settings.connect_timeout_seconds,
            read_timeout=self.settings.read_timeout_seconds,
            keepalive_timeout=self.settings.keepalive_seconds,
        )

    async def start(self) -> None:
        for upstream in self.upstreams:
            self.http1(upstream)
        connector = aiohttp.TCPConnector(
            limit=0,  # no global cap: every relayed WebSocket holds a connection (perf notes)
            limit_per_host=self.settings.pool_limit_per_host,
            keepalive_timeout=self.settings.keepalive_seconds,
            ttl_dns_cache=10,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # cookies belong to clients, not to the proxy
            auto_decompress=False,  # bodies pass through with their Content-Encoding intact
            skip_auto_headers=SKIP_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.settings.connect_timeout_seconds,
                sock_read=self.settings.read_timeout_seconds,
            ),
            read_bufsize=2**18,
            trust_env=False,
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for http1 in self._http1.values():
            await http1.close()
        self._http1.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the interface other modules use (notes/UPSTREAMS_INTERFACE.md) ---------------------
    def get(self, name: str) -> Upstream | None:
        """The instance called ``name`` (the name kept in ``PromptRecord.upstream``)."""
        instance = self._instances.get(name)
        return instance.upstream if instance is not None else None

    def home(self) -> Upstream:
        """The designated home instance (settings, user data, ``user.css``): ``upstream.home``,
        else the first one.

        Raises:
            ServiceUnavailable: no instance is known (discovery found none yet).
        """
        if self.settings.home:
            instance = self._instances.get(self.settings.home)
            if instance is not None:
                return instance.upstream
        if not self.upstreams:
            raise unavailable(
                "no ComfyUI instance is known yet",
                "no_upstream",
                retry_after=max(1, int(self.settings.discovery.interval_seconds)),
            )
        return self.upstreams[0]

    def pick(self) -> Upstream:
        """Kept for single-instance call sites: the home instance."""
        return self.home()

    def routable(self) -> list[Upstream]:
        """Healthy and not drained: the candidates for new prompts."""
        return [
            i.upstream
            for i in self._instances.values()
            if i.breaker.closed and i.upstream.name not in self._drained
        ]

    def reachable(self) -> list[Upstream]:
        """Healthy, drained ones included: reads, merged views, WebSocket fan-in."""
        return [i.upstream for i in self._instances.values() if i.breaker.closed]

    def is_healthy(self, name: str) -> bool:
        instance = self._instances.get(name)
        return instance is not None and instance.breaker.closed

    def is_drained(self, name: str) -> bool:
        return name in self._drained

    def subscribe(self, callback: PoolListener) -> None:
        """Call ``callback(event, upstream)`` on ``joined``, ``left``, ``up`` and ``down``.
        A coroutine callback is awaited (in order) when the event comes from async code, and
        runs as a task when it comes from :meth:`report_failure`."""
        self._listeners.append(callback)

    def report_failure(self, upstream: Upstream, kind: FailureKind) -> None:
        """Passive health: a request to ``upstream`` failed (``refused`` ejects at once)."""
        instance = self._instances.get(upstream.name)
        if instance is None or not self.managed:
            return
        if instance.breaker.failure(immediate=kind == "refused"):
            self._went_down(instance, kind)
            self._spawn(self._emit("down", upstream))

    def report_success(self, upstream: Upstream) -> None:
        """Passive health: ``upstream`` answered (below 500)."""
        instance = self._instances.get(upstream.name)
        if instance is None or not self.managed:
            return
        if instance.breaker.state is BreakerState.CLOSED:
            instance.breaker.failures = 0
            return
        if instance.breaker.success():
            self._came_up(instance)
            self._spawn(self._emit("up", upstream))

    def report_response(self, upstream: Upstream, status: int) -> None:
        """Passive health from an answer's status: 502/503/504 (a gateway or an overloaded
        server in front of ComfyUI) count as failures. A 500 does not: ComfyUI answers 500 to
        malformed requests, so a client could eject instances with bad bodies."""
        if status in (502, 503, 504):
            self.report_failure(upstream, "5xx")
        else:
            self.report_success(upstream)

    # -- the registry's own surface (placement, discovery, health, admin) -------------------
    def instances(self) -> list[Instance]:
        return list(self._instances.values())

    def instance(self, name: str) -> Instance | None:
        return self._instances.get(name)

    def names(self) -> set[str]:
        return set(self._instances)

    async def record_failure(self, instance: Instance, kind: FailureKind) -> None:
        """Like :meth:`report_failure`, awaiting the listeners (async callers)."""
        if instance.breaker.failure(immediate=kind == "refused"):
            self._went_down(instance, kind)
            await self._emit("down", instance.upstream)
        self._gauge(instance)

    async def record_success(self, instance: Instance) -> None:
        if instance.breaker.success():
            self._came_up(instance)
            await self._emit("up", instance.upstream)
        self._gauge(instance)

    async def join(self, upstream: Upstream) -> bool:
        """Add an instance at runtime (discovery); False when one with that name exists."""
        if upstream.name in self._instances:
            return False
        instance = self._add(upstream)
        log.info("upstream_joined", upstream=upstream.name, base=upstream.base)
        self._gauge(instance)
        await self._emit("joined", upstream)
        return True

    async def leave(self, name: str) -> bool:
        """Remove an instance at runtime; its idle connections are closed."""
        instance = self._instances.pop(name, None)
        if instance is None:
            return False
        self.upstreams = tuple(i.upstream for i in self._instances.values())
        http1 = self._http1.pop(name, None)
        if http1 is not None:
            self._spawn(http1.close())
        self._probe_cache.pop(name, None)
        if self.metrics is not None:
            for gauge in (self.metrics.upstream_state, self.metrics.upstream_drained):
                with contextlib.suppress(KeyError):
                    gauge.remove(name)
        log.info("upstream_left", upstream=name)
        await self._emit("left", instance.upstream)
        return True

    async def set_drained(self, name: str, drained: bool) -> None:
        """Drain (no new prompts; reads and its queue go on) or undrain an instance, in every
        replica when Redis is configured."""
        if drained:
            self._drained.add(name)
        else:
            self._drained.discard(name)
        if self.redis is not None:
            if drained:
                await self.redis.sadd(DRAINED_KEY, name)
            else:
                await self.redis.srem(DRAINED_KEY, name)
        log.info("upstream_drained" if drained else "upstream_undrained", upstream=name)
        instance = self._instances.get(name)
        if instance is not None:
            self._gauge(instance)

    async def sync_drained(self) -> None:
        """Adopt the drained set other replicas wrote (called with every round of checks)."""
        if self.redis is None:
            return
        try:
            members = await self.redis.smembers(DRAINED_KEY)
        except Exception as exc:  # noqa: BLE001 - Redis down or slow: keep what we know
            log.warning("drained_sync_failed", error=type(exc).__name__)
            return
        self._drained = {m.decode() if isinstance(m, bytes) else str(m) for m in members}
        for instance in self._instances.values():
            self._gauge(instance)

    def note_submitted(self, name: str, checkpoints: frozenset[str]) -> None:
        """A prompt was accepted there: one more outstanding, and its checkpoints loaded."""
        instance = self._instances.get(name)
        if instance is not None:
            instance.submitted_since_check += 1
            if checkpoints:
                instance.last_checkpoints = checkpoints

    def retry_after(self) -> int:
        """Whole seconds until some instance may take prompts again (for ``Retry-After``)."""
        waits = [
            i.breaker.retry_in()
            for i in self._instances.values()
            if i.upstream.name not in self._drained
        ]
        soonest = min(waits, default=0.0) or self.settings.health.interval_seconds
        return max(1, int(soonest + 0.999))

    def spawn(self, coro: Awaitable[None]) -> None:
        """Run ``coro`` as a task owned by the pool (cancelled on close)."""
        self._spawn(coro)

    # -- readiness --------------------------------------------------------------------------
    async def probe(self, upstream: Upstream) -> bool:
        """Whether the instance answers; cached briefly so probe storms cost one request."""
        now = time.monotonic()
        cached = self._probe_cache.get(upstream.name)
        if cached is not None and now - cached[0] < PROBE_CACHE_SECONDS:
            return cached[1]
        ok = (await probe(self.session, upstream, PROBE_TIMEOUT_SECONDS)).up
        self._probe_cache[upstream.name] = (now, ok)
        return ok

    def readiness(self, answered: dict[str, bool]) -> dict[str, str]:
        """Each probed instance's readiness: ``up``, ``down``, ``drained`` (answers, takes no
        new prompts) or ``ejected`` (answers, but its breaker is still open)."""
        states = {}
        for name, ok in answered.items():
            instance = self._instances.get(name)
            if not ok:
                states[name] = "down"
            elif name in self._drained:
                states[name] = "drained"
            elif instance is not None and not instance.breaker.closed:
                states[name] = "ejected"
            else:
                states[name] = "up"
        return states

    # -- internals --------------------------------------------------------------------------
    def _add(self, upstream: Upstream) -> Instance:
        instance = Instance(
            upstream=upstream,
            breaker=Breaker(self.settings.health, self._now),
            order=self._order,
        )
        self._order += 1
        self._instances[upstream.name] = instance
        self.upstreams = tuple(i.upstream for i in self._instances.values())
        return instance

    def _now(self) -> float:
        return self.clock()  # looked up per call: tests replace ``clock``

    def _went_down(self, instance: Instance, kind: str) -> None:
        log.warning(
            "upstream_down",
            upstream=instance.upstream.name,
            cause=kind,
            retry_in_s=round(instance.breaker.retry_in(), 3),
        )
        self._gauge(instance)

    def _came_up(self, instance: Instance) -> None:
        log.info("upstream_up", upstream=instance.upstream.name)
        self._gauge(instance)

    def _gauge(self, instance: Instance) -> None:
        if self.metrics is None:
            return
        name = instance.upstream.name
        self.metrics.upstream_state.labels(name).set(int(instance.breaker.state))
        self.metrics.upstream_drained.labels(name).set(1 if name in self._drained else 0)

    async def _emit(self, event: PoolEvent, upstream: Upstream) -> None:
        if self.metrics is not None:
            self.metrics.upstream_events.labels(event).inc()
        for callback in list(self._listeners):
            try:
                result = callback(event, upstream)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - one listener's bug must not stop the others
                task_failed(
                    "pool_listener",
                    self.metrics.task_failures if self.metrics is not None else None,
                    logger=log,
                    event="pool_listener_failed",
                    pool_event=event,
                    upstream=upstream.name,
                )

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception:  # noqa: BLE001 - a background step: logged and counted, not lost
                task_failed(
                    "pool", self.metrics.task_failures if self.metrics is not None else None
                )

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def unavailable(message: str, error_type: str, *, retry_after: int) -> ServiceUnavailable:
    """A 503 with ``Retry-After`` (header and ``error.retry_after``)."""
    exc = ServiceUnavailable(
        message, error_type=error_type, headers={"Retry-After": str(retry_after)}
    )
    exc.fields = {"retry_after": retry_after}
    return exc


POOL = web.AppKey("comfygate.upstream_pool", UpstreamPool)
