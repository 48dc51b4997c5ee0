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
from typing import NoReturn

import structlog
from aiohttp import hdrs, web

from proxy.comfy.graph import UNKNOWN_NODE, is_ui_format
from proxy.comfy.violations import Violation
from proxy.observability.metrics import Metrics
from proxy.policy.checker import BODY_TOO_LARGE, NODE_NOT_ALLOWED, check_workflow
from proxy.policy.refusal import PolicyRejected
from proxy.policy.store import PolicyStore
from proxy.request.prompt import read_prompt
from proxy.state import RequestContext

log = structlog.get_logger("comfygate.policy")

_LOGGED_NODES = 20
"""Node ids named in one refusal's log line (a bounded line for a huge workflow)."""


class PolicyGuard:
    """The workflow policy on ``POST /prompt`` (see module doc)."""

    name = "policy"

    def __init__(self, store: PolicyStore, metrics: Metrics, *, isolation: bool) -> None:
        """``isolation``: whether isolation checks the files a prompt names (then the policy
        leaves them to it)."""
        self._store = store
        self._metrics = metrics
        self._isolation = isolation

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        if request.method != hdrs.METH_POST or ctx.principal is None:
            return
        store = self._store
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
            self._refuse(ctx, [Violation("", "", "", BODY_TOO_LARGE, message)])
        # The one reading of the body (proxy.comfy), typed with the instance's schemas; its
        # malformed parts are reported below with the policy's findings.
        submission = await read_prompt(request, ctx, refuse_problems=False)
        body = submission.body
        workflow = body.get("prompt")
        if "prompt" not in body and is_ui_format(body):
            workflow = body  # a UI workflow posted as the whole body: say what to do instead
        violations = check_workflow(
            workflow,
            policy,
            prompt=submission.prompt if workflow is body.get("prompt") else None,
            body_size=ctx.bytes_in,  # as received, not as re-serialised
            isolation_checks_files=self._isolation,
        )
        if violations:
            self._refuse(ctx, _without_doubles(violations))

    def _refuse(self, ctx: RequestContext, violations: list[Violation]) -> NoReturn:
        counts = Counter(v.error_type for v in violations)
        refusals = self._metrics.policy_refusals
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


def _without_doubles(violations: list[Violation]) -> list[Violation]:
    """A node both missing on the instance and not allowed: said once (not allowed)."""
    refused = {v.node_id for v in violations if v.error_type == NODE_NOT_ALLOWED}
    return [v for v in violations if v.error_type != UNKNOWN_NODE or v.node_id not in refused]


__all__ = ["PolicyGuard"]
