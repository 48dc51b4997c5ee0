"""``PolicyGuard``: every ``POST /prompt`` checked against the submitter's workflow policy.

Runs after the rate-limit guard (a flood is refused before its bodies are parsed) and before
isolation (which rewrites what the policy allowed). Principals with an unrestricted role
(admins) and ``policy.enabled = false`` pass untouched.

A refused prompt never reaches ComfyUI: 400 in ComfyUI's own shape with ``node_errors``, one
``prompt_refused_by_policy`` log line (types and node ids, never the body) and the
``comfygate_policy_refusals`` counter per violation type.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

import structlog
from aiohttp import hdrs, web

from proxy.isolation.prompt import NOT_JSON, Violation, parse_request_body
from proxy.limits.bodies import read_body
from proxy.policy.checker import BODY_TOO_LARGE, check_workflow, is_ui_format, ui_node_types
from proxy.policy.refusal import PolicyRejected
from proxy.state import METRICS, POLICY, SETTINGS, RequestContext

log = structlog.get_logger("comfygate.policy")

_LOGGED_NODES = 20
"""Node ids named in one refusal's log line (a bounded line for a huge workflow)."""


class PolicyGuard:
    """The workflow policy on ``POST /prompt`` (see module doc)."""

    name = "policy"

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        if request.method != hdrs.METH_POST or ctx.principal is None:
            return
        store = request.app[POLICY]
        if not store.enabled:
            return
        policy = store.for_principal(ctx.principal)
        if policy.unrestricted:
            return
        length = request.content_length
        if length is not None and length > policy.max_body_bytes:
            # Refused before reading: the size alone is the answer.
            message = (
                f"the request body is {length} bytes; your role's limit is "
                f"{policy.max_body_bytes} bytes"
            )
            self._refuse(request, ctx, [Violation("", "", "", BODY_TOO_LARGE, message)])
        await read_body(request, ctx)  # keeps ctx.body for forwarding (size-limited)
        parsed = parse_request_body(ctx, request.charset)  # reused by the isolation guard
        if parsed is NOT_JSON or not isinstance(parsed.value, dict):
            return  # the body guard, next, refuses it (proxy.limits.bodies)
        body = parsed.value
        workflow = body.get("prompt")
        if "prompt" not in body and is_ui_format(body):
            workflow = body  # a UI workflow posted as the whole body: say what to do instead
        violations = check_workflow(
            workflow,
            policy,
            body_size=len(ctx.body or b""),
            output_counts=store.output_counts,
            isolation_checks_files=request.app[SETTINGS].isolation.enabled,
            ui_types=_UiTypes(body),
        )
        if violations:
            self._refuse(request, ctx, violations)

    def _refuse(
        self, request: web.Request, ctx: RequestContext, violations: list[Violation]
    ) -> NoReturn:
        counts = Counter(v.error_type for v in violations)
        refusals = request.app[METRICS].policy_refusals
        for reason, count in counts.items():
            refusals.labels(reason).inc(count)
        principal = ctx.principal
        log.warning(
            "prompt_refused_by_policy",
            request_id=ctx.request_id,
            user=principal.comfy_user if principal is not None else None,
            roles=sorted(principal.roles) if principal is not None else [],
            violations=dict(counts),
            nodes=sorted({v.node_id for v in violations if v.node_id})[:_LOGGED_NODES],
        )
        raise PolicyRejected(violations)


class _UiTypes(Mapping[str, str]):
    """The UI workflow's node types, read from the body only if the checker asks (a node
    without ``class_type``: rare), so the common path never walks the attached UI workflow."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        self._body = body
        self._types: dict[str, str] | None = None

    def _load(self) -> dict[str, str]:
        if self._types is None:
            self._types = ui_node_types(self._body)
        return self._types

    def __getitem__(self, key: str) -> str:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


__all__ = ["PolicyGuard"]
