"""Shared pieces of the guards' unit tests: mocked requests, contexts and principals.

No server, no Redis: ``make_mocked_request`` and the in-memory stores.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
from aiohttp import StreamReader, web
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from proxy.observability.metrics import METRICS, Metrics
from proxy.policy.catalog.upstream import CATALOG, Catalog
from proxy.policy.schema_source import PolicySchemas
from proxy.policy.store import POLICY, PolicyStore
from proxy.principal import Principal
from proxy.request.bodies import BODY_BUDGET, MB, BodyBudget, BodyReader
from proxy.request.prompt import NODE_SCHEMAS, PromptReader
from proxy.routes import OTHER, RULES, RouteRule, RuleName
from proxy.settings import SETTINGS, Settings
from proxy.state import CONTEXT, RequestContext
from proxy.upstream.pool import POOL, UpstreamPool
from tests.conftest import make_settings

UPSTREAM = "http://127.0.0.1:8188"
OBJECT_INFO = Path(__file__).resolve().parents[2] / "data" / "comfyui_object_info.json"


def settings(**sections: dict[str, object]) -> Settings:
    return make_settings(UPSTREAM, **sections)


def rule_named(name: RuleName) -> RouteRule:
    return next(r for r in (*RULES, OTHER) if r.name == name)


def principal(subject: str = "alice", *roles: str, source: str = "bearer") -> Principal:
    return Principal(subject, frozenset(roles or ("user",)), source)  # type: ignore[arg-type]


def request(
    method: str,
    path: str,
    *,
    rule: RuleName = "other",
    who: Principal | None = None,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    payload: bytes | None = None,
    app: web.Application | None = None,
) -> tuple[web.Request, RequestContext]:
    """A mocked request and its context, as the chain leaves it before the guards run.

    ``body``: already read (``ctx.body``); ``payload``: still to be read from the request's
    stream (its Content-Length set unless ``headers`` has one); ``app``: e.g. :func:`body_app`.
    """
    all_headers = CIMultiDict(headers or {})
    stream = None
    if payload is not None:
        all_headers.setdefault("Content-Length", str(len(payload)))
        stream = StreamReader(mock.Mock(), 2**16, loop=asyncio.get_running_loop())
        stream.feed_data(payload)
        stream.feed_eof()
    req = make_mocked_request(
        method,
        path,
        headers=all_headers,
        app=app,
        payload=stream if stream is not None else EMPTY_PAYLOAD,
    )
    ctx = RequestContext(request_id="test", rule=rule_named(rule), principal=who)
    ctx.path, _, _ = path.partition("?")
    ctx.upstream_path = path
    if body is not None:
        ctx.body = body
    req[CONTEXT] = ctx
    return req, ctx


@cache
def object_info() -> dict[str, Any]:
    """The captured ``/object_info`` of a real ComfyUI (what the catalog would have fetched)."""
    info: dict[str, Any] = orjson.loads(OBJECT_INFO.read_bytes())
    return info


def prompt_reader(configured: Settings, *, schemas: bool = True) -> PromptReader:
    """The collaborators of everything that reads ``POST /prompt`` and inspected bodies, in
    memory; ``schemas``: the node schemas are known (as once the catalog fetched them)."""
    metrics = Metrics(CollectorRegistry())
    pool = UpstreamPool(configured.upstream)
    policy = PolicyStore(configured.policy, configured.roles)
    if schemas:
        policy.set_object_info(object_info())
    budget = BodyBudget.from_settings(configured.server, metrics)
    bodies = BodyReader(budget, int(configured.server.max_inspected_body_mb * MB), metrics)
    # The schema source production installs (proxy.policy.schema_source), over an app
    # holding just what it reads: the policy store, the pool and the catalog.
    holder = web.Application()
    holder[POLICY] = policy
    holder[POOL] = pool
    holder[CATALOG] = Catalog(pool, metrics, configured)
    return PromptReader(configured, PolicySchemas(holder), metrics, bodies)


def body_app(reader: PromptReader) -> web.Application:
    """An app holding what the shared body and prompt readers look up when a guard calls them
    without collaborators of its own (``read_json_body``, ``read_prompt``)."""
    app = web.Application()
    app[SETTINGS] = reader.settings
    app[METRICS] = reader.metrics
    app[BODY_BUDGET] = reader.bodies.budget
    app[NODE_SCHEMAS] = reader.schemas
    return app
