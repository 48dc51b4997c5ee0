"""``Idempotency-Key`` on ``POST /prompt``: a repeated key answers the first answer, unsubmitted.

A client that lost the answer to a submission (timeout, dropped connection) sends it again with
the same ``Idempotency-Key``; within ``upstream.placement.idempotency_ttl_seconds`` (24 h) it
gets the first answer back (``Idempotent-Replayed: true``) and nothing is queued twice.

- Keys are per principal: the stored entry is named by a hash of (subject, key), so one user's
  key never replays another user's answer.
- The first request *claims* the key (Redis ``SET NX``; in memory without Redis) before it is
  placed or recorded. A duplicate that arrives while the first is still in flight gets **409**
  ``idempotency_key_in_use`` with ``Retry-After: 1`` (it is not queued behind the first: the
  client retries and then gets the stored answer). A key reused with a different body gets
  **422** ``idempotency_key_reused``.
- Stored answers: ComfyUI's 2xx and 4xx (deterministic: the same body gets the same 400
  again). A 5xx, a proxy refusal (rate limit, 503) or a failure leaves the key free, so the
  client's retry is judged afresh.

The guard claims; :func:`idempotency_finish` (a middleware around the guards) stores or
releases once the response is known, whatever raised in between.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import orjson
import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from proxy.errors import BadRequest, ProxyError
from proxy.observability.metrics import Metrics
from proxy.redis.client import REDIS
from proxy.request.prompt import PromptReader, read_prompt
from proxy.settings import SETTINGS, UpstreamSettings
from proxy.state import RequestContext

if TYPE_CHECKING:
    from proxy.redis.client import RedisClient

log = structlog.get_logger("comfygate.idempotency")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
PENDING_MARGIN_SECONDS = 60.0
"""A claim outlives the longest submission (connect + read timeout) by this much; a proxy that
dies mid-request leaves the key claimed at most that long."""
KEY_PREFIX = "comfygate:idem:"
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    status: int
    body: bytes
    content_type: str


@dataclass(frozen=True, slots=True)
class Claimed:
    token: str


ClaimOutcome = Claimed | StoredAnswer | Literal["in_progress", "mismatch"]


class IdempotencyStore(Protocol):
    async def claim(self, key: str, fingerprint: str, pending_ttl: float) -> ClaimOutcome: ...

    async def complete(
        self, key: str, fingerprint: str, answer: StoredAnswer, ttl: float
    ) -> None: ...

    async def release(self, key: str, fingerprint: str, token: str) -> None: ...


def _pending(fingerprint: str, token: str) -> bytes:
    return orjson.dumps({"state": "pending", "fp": fingerprint, "token": token})


def _done(fingerprint: str, answer: StoredAnswer) -> bytes:
    return orjson.dumps(
        {
            "state": "done",
            "fp": fingerprint,
            "status": answer.status,
            "body": base64.b64encode(answer.body).decode(),
            "type": answer.content_type,
        }
    )


def _judge(raw: bytes | str, fingerprint: str) -> ClaimOutcome:
    data = orjson.loads(raw)
    if data.get("fp") != fingerprint:
        return "mismatch"
    if data.get("state") != "done":
        return "in_progress"
    return StoredAnswer(
        int(data["status"]), base64.b64decode(data["body"]), str(data.get("type") or "")
    )


class MemoryIdempotencyStore:
    """Single-process store (bounded: the oldest entries go first)."""

    def __init__(self, *, max_entries: int = 100_000) -> None:
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._max = max_entries

    async def claim(self, key: str, fingerprint: str, pending_ttl: float) -> ClaimOutcome:
        now = time.monotonic()
        known = self._entries.get(key)
        if known is not None and known[0] > now:
            return _judge(known[1], fingerprint)
        token = secrets.token_hex(8)
        self._put(key, now + pending_ttl, _pending(fingerprint, token))
        return Claimed(token)

    async def complete(self, key: str, fingerprint: str, answer: StoredAnswer, ttl: float) -> None:
        self._put(key, time.monotonic() + ttl, _done(fingerprint, answer))

    async def release(self, key: str, fingerprint: str, token: str) -> None:
        known = self._entries.get(key)
        if known is not None and known[1] == _pending(fingerprint, token):
            del self._entries[key]

    def _put(self, key: str, expires: float, value: bytes) -> None:
        self._entries[key] = (expires, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


class RedisIdempotencyStore:
    """Shared by every replica: one key per (principal, Idempotency-Key)."""

    def __init__(self, client: RedisClient) -> None:
        self._redis = client

    async def claim(self, key: str, fingerprint: str, pending_ttl: float) -> ClaimOutcome:
        token = secrets.token_hex(8)
        name = KEY_PREFIX + key
        created = await self._redis.set(
            name, _pending(fingerprint, token), nx=True, px=max(1, int(pending_ttl * 1000))
        )
        if created:
            return Claimed(token)
        raw = await self._redis.get(name)
        if raw is None:  # expired in between: claim again
            return await self.claim(key, fingerprint, pending_ttl)
        return _judge(raw, fingerprint)

    async def complete(self, key: str, fingerprint: str, answer: StoredAnswer, ttl: float) -> None:
        await self._redis.set(KEY_PREFIX + key, _done(fingerprint, answer), px=int(ttl * 1000))

    async def release(self, key: str, fingerprint: str, token: str) -> None:
        # Only our own pending claim: after it expired, another request may hold the key.
        await self._redis.eval(_RELEASE, 1, KEY_PREFIX + key, _pending(fingerprint, token))


IDEMPOTENCY: web.AppKey[IdempotencyStore] = web.AppKey("comfygate.idempotency")


@dataclass(frozen=True, slots=True)
class Claim:
    """A key this request holds until its response is known."""

    store: IdempotencyStore
    key: str
    fingerprint: str
    token: str


CLAIM = web.RequestKey("comfygate.idempotency_claim", Claim)


class IdempotencyGuard:
    """Claims the key of a ``POST /prompt`` (see the module docstring)."""

    name = "idempotency"

    def __init__(
        self,
        store: IdempotencyStore,
        upstream: UpstreamSettings,
        metrics: Metrics,
        prompts: PromptReader,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._prompts = prompts
        # A claim outlives the longest submission (every placement attempt's connect, then
        # the read), plus a margin.
        self._pending_ttl = (
            upstream.connect_timeout_seconds * upstream.placement.max_attempts
            + upstream.read_timeout_seconds
            + PENDING_MARGIN_SECONDS
        )

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        raw_key = request.headers.get(HEADER)
        if raw_key is None or request.method != hdrs.METH_POST or ctx.path != "/prompt":
            return
        if not 0 < len(raw_key) <= MAX_KEY_LENGTH or not raw_key.isascii():
            raise BadRequest(
                f"{HEADER} must be 1 to {MAX_KEY_LENGTH} ASCII characters",
                error_type="bad_idempotency_key",
            )
        principal = ctx.principal
        subject = principal.subject if principal is not None else ""
        submission = await read_prompt(request, ctx, reader=self._prompts)
        # SECURITY: the key is scoped to the principal; nobody replays someone else's answer.
        key = hashlib.sha256(f"{subject}\0{raw_key}".encode()).hexdigest()
        # The submission as read, before isolation mints ids into it (a repeat must match):
        # its own serialisation, not ctx.body (written once, after the last guard).
        fingerprint = hashlib.sha256(submission.dump()).hexdigest()
        store = self._store
        outcome = await store.claim(key, fingerprint, self._pending_ttl)
        metrics = self._metrics
        if isinstance(outcome, Claimed):
            metrics.idempotency.labels("first").inc()
            request[CLAIM] = Claim(store, key, fingerprint, outcome.token)
            if not ctx.response_filters:
                # The answer is stored and replayed: read it in a known encoding (identity),
                # as every answer the proxy keeps (``proxy.upstream.encoding``).
                ctx.response_filters.append(_kept_as_is)
            return
        if isinstance(outcome, StoredAnswer):
            metrics.idempotency.labels("replayed").inc()
            ctx.rejected_by = self.name  # answered by the proxy: ComfyUI never saw it
            raise Replay(outcome)
        metrics.idempotency.labels(outcome).inc()
        if outcome == "in_progress":
            raise ProxyError(
                "a request with this Idempotency-Key is still being processed; retry shortly",
                error_type="idempotency_key_in_use",
                status=409,
                headers={"Retry-After": "1"},
            )
        raise ProxyError(
            "this Idempotency-Key was used with a different request body",
            error_type="idempotency_key_reused",
            status=422,
        )


class Replay(Exception):
    """Raised by the guard with the stored first answer; :func:`idempotency_finish` (around the
    guards) sends it as it was, with ``Idempotent-Replayed: true``."""

    def __init__(self, answer: StoredAnswer) -> None:
        super().__init__("idempotent replay")
        self.answer = answer

    def response(self) -> web.Response:
        headers = {REPLAYED_HEADER: "true"}
        if self.answer.content_type:
            headers[hdrs.CONTENT_TYPE] = self.answer.content_type
        return web.Response(status=self.answer.status, body=self.answer.body, headers=headers)


_NOT_STORED = frozenset({408, 409, 425, 429})


async def _kept_as_is(status: int, body: bytes) -> bytes:
    del status
    return body


def _storable(response: web.StreamResponse) -> StoredAnswer | None:
    status = response.status
    if not (200 <= status < 300 or 400 <= status < 500) or status in _NOT_STORED:
        return None
    if not isinstance(response, web.Response) or not isinstance(response.body, bytes):
        return None
    if hdrs.CONTENT_ENCODING in response.headers:
        return None  # bytes in an encoding the replay would not announce: never stored
    return StoredAnswer(status, response.body, response.headers.get(hdrs.CONTENT_TYPE, ""))


@web.middleware
async def idempotency_finish(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Store the answer of a request that claimed a key, or free the key (see module doc)."""
    try:
        response = await handler(request)
    except Replay as replay:
        return replay.response()
    except BaseException:
        claim = request.get(CLAIM)
        if claim is not None:
            await _release(claim)
        raise
    claim = request.get(CLAIM)
    if claim is not None:
        answer = _storable(response)
        if answer is None:
            await _release(claim)
        else:
            ttl = request.app[SETTINGS].upstream.placement.idempotency_ttl_seconds
            try:
                await claim.store.complete(claim.key, claim.fingerprint, answer, ttl)
            except Exception as exc:  # noqa: BLE001 - the answer itself must still go out
                log.warning("idempotency_store_failed", error=type(exc).__name__)
    return response


async def _release(claim: Claim) -> None:
    try:
        await claim.store.release(claim.key, claim.fingerprint, claim.token)
    except Exception as exc:  # noqa: BLE001 - the key then expires on its own
        log.warning("idempotency_release_failed", error=type(exc).__name__)


async def idempotency_context(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: in Redis when configured (after ``redis_client``), else in memory."""
    client = app[REDIS]
    app[IDEMPOTENCY] = (
        RedisIdempotencyStore(client) if client is not None else MemoryIdempotencyStore()
    )
    yield
