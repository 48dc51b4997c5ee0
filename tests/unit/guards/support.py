"""Shared pieces of the guards' unit tests: mocked requests, contexts and principals.

No server, no Redis: ``make_mocked_request`` and the in-memory stores.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from proxy.principal import Principal
from proxy.routes import OTHER, RULES, RouteRule, RuleName
from proxy.settings import Settings
from proxy.state import CONTEXT, RequestContext
from tests.conftest import make_settings

UPSTREAM = "http://127.0.0.1:8188"


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
) -> tuple[web.Request, RequestContext]:
    """A mocked request and its context, as the chain leaves it before the guards run."""
    req = make_mocked_request(method, path, headers=CIMultiDict(headers or {}))
    ctx = RequestContext(request_id="test", rule=rule_named(rule), principal=who)
    ctx.path, _, _ = path.partition("?")
    ctx.upstream_path = path
    if body is not None:
        ctx.body = body
    req[CONTEXT] = ctx
    return req, ctx
