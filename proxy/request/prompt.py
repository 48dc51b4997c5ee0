"""``POST /prompt`` read once per request: :func:`read_prompt` and the :class:`PromptGuard`.

Every guard of the ``prompt`` rule (policy, placement, isolation, queue quota) calls
:func:`read_prompt` and decides on the :class:`~proxy.comfy.submission.Submission` it
returns; a guard that changes it calls :func:`forward_submission`, so ``ctx.body`` is always
the proxy's serialisation of what was decided on, never the client's bytes.

One serialisation (issue 17): guards edit the one parsed submission and
:func:`forward_submission` only marks it due; ``ctx.body`` writes it on its first read, which
on this route is the forwarder's (or the scheduler's hold, the last guard), so every edit is
in the one serialisation ComfyUI receives. SECURITY: whoever reads ``ctx.body`` gets exactly
the bytes that are forwarded - once they have been read, the submission is sealed and a later
:func:`forward_submission` is refused (``RequestContext.serialise_later``), so no guard can
decide on bytes that differ from what ComfyUI receives. Guards that need a digest of the
submission before the others edit it (idempotency) take :meth:`Submission.dump` themselves. The
:class:`PromptGuard` runs on every ``POST /prompt`` (admins' too), so a body no other guard
needed to read is still read, checked and re-serialised.

The instance's node schemas (``/object_info``, through the catalog's cache) type the literals
and say which inputs read files. They are required for a principal the workflow policy
restricts or isolation confines: if no copy of ``/object_info`` can be had, such a prompt is
refused with 503 ``catalog_unavailable`` (default deny: without it, a file input cannot be
told from a text input), a node type the schemas do not list is refused as ComfyUI would
refuse it (``missing_node_type``), and so are literals nothing can judge (object literals,
hidden inputs). Others' prompts (admins') are read with whatever schemas are known, their
object literals kept for ComfyUI to read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import structlog
from aiohttp import hdrs, web

from proxy.comfy.graph import UNKNOWN_NODE, Prompt
from proxy.comfy.schemas import NodeSchemas
from proxy.comfy.submission import Submission, submission_of
from proxy.comfy.violations import PromptRejected, Violation
from proxy.errors import ProxyError, ServiceUnavailable
from proxy.observability.metrics import METRICS, Metrics
from proxy.principal import Principal
from proxy.request.bodies import BodyReader, read_json_body
from proxy.settings import SETTINGS, Settings
from proxy.state import RequestContext

log = structlog.get_logger("comfygate.workflow")

CATALOG_UNAVAILABLE = "catalog_unavailable"
_RETRY_SECONDS = 5


class SchemaSource(Protocol):
    """Where prompts get their node schemas and who must be judged on them: the workflow
    policy's store, filled from the instances' ``/object_info`` by the catalog
    (``proxy.policy.schema_source.PolicySchemas``, installed by the app)."""

    def restricts(self, principal: Principal) -> bool:
        """Whether the workflow policy restricts ``principal``."""
        ...

    def known(self) -> NodeSchemas | None:
        """The schemas known now (None until a copy of ``/object_info`` was read)."""
        ...

    async def refresh(self, *, fetch: bool) -> None:
        """Bring the copy up to date: a stale cached copy starts a refresh (not waited for);
        with ``fetch``, a missing one is fetched now.

        Raises:
            ProxyError: ComfyUI could not be reached for it.
        """
        ...


NODE_SCHEMAS: web.AppKey[SchemaSource] = web.AppKey("comfygate.node_schemas")


@dataclass(frozen=True, slots=True)
class PromptReader:
    """What reading ``POST /prompt`` needs: who is judged on the schemas (``settings``'
    isolation and roles, the schema source), where the schemas come from (the app's
    :class:`SchemaSource`), the body reader and the metrics. The guards get one when
    the route table is built; :func:`read_prompt` finds the app's (:meth:`of`) without one."""

    settings: Settings
    schemas: SchemaSource
    metrics: Metrics
    bodies: BodyReader

    @classmethod
    def of(cls, app: web.Application) -> PromptReader:
        return cls(app[SETTINGS], app[NODE_SCHEMAS], app[METRICS], BodyReader.of(app))


def is_prompt_submission(request: web.Request, ctx: RequestContext) -> bool:
    """A ``POST /prompt`` (or ``/api/prompt``): the requests this module reads."""
    return request.method == hdrs.METH_POST and ctx.path == "/prompt"


async def read_prompt(
    request: web.Request,
    ctx: RequestContext,
    *,
    refuse_problems: bool = True,
    reader: PromptReader | None = None,
) -> Submission:
    """The submission of this request, read once (cached on ``ctx`` with the body it was read
    from) and forwarded as the proxy serialises it.

    ``refuse_problems``: raise when the graph is malformed (the workflow policy asks for the
    problems instead, to report them with its own findings at once). ``reader``: the
    collaborators (the app's when None).

    Raises:
        BadRequest: an unreadable body (``invalid_prompt``, :func:`read_json_body`).
        PromptRejected: a malformed graph, or a node type the schemas do not list when they
            are required (module doc); ComfyUI's 400 shape.
        ServiceUnavailable: schemas are required and no ``/object_info`` can be had.
        PayloadTooLarge: over ``server.max_inspected_body_mb`` (``read_body``).
    """
    cached = ctx.current_parse()
    if isinstance(cached, Submission):
        submission = cached
    else:
        reader = reader or PromptReader.of(request.app)
        # The one bounded, strict reader of every inspected body (charset, encoding, size,
        # JSON, object): unreadable bodies are refused there as ComfyUI's invalid_prompt.
        body = await read_json_body(request, ctx, reader.bodies)
        required = schemas_required(reader, ctx)
        schemas = await node_schemas(reader, ctx, required=required)
        submission = submission_of(body, schemas, judged=required)
        if required and submission.prompt is not None:
            _add_unknown(submission.prompt)
        forward_submission(ctx, submission)
    prompt = submission.prompt
    if refuse_problems and prompt is not None and prompt.problems:
        metrics = reader.metrics if reader is not None else request.app[METRICS]
        _refused(metrics, ctx, prompt.problems[0].error_type)
        raise PromptRejected(prompt.problems)
    return submission


def forward_submission(ctx: RequestContext, submission: Submission) -> None:
    """Make ``submission`` what ComfyUI receives (JSON content type): serialised once, when
    ``ctx.body`` is first read (after the last guard that edits it; see the module doc).

    Raises:
        RuntimeError: the bytes were read already (a guard decided on them): a bug.
    """
    ctx.serialise_later(submission)
    ctx.upstream_headers[hdrs.CONTENT_TYPE] = "application/json"


def schemas_required(reader: PromptReader, ctx: RequestContext) -> bool:
    """Whether this principal's prompt is judged on the schemas (policy-restricted, or
    confined by isolation)."""
    principal = ctx.principal
    if principal is None:
        return False
    settings = reader.settings
    if settings.isolation.enabled and not principal.is_admin(settings.roles):
        return True
    return reader.schemas.restricts(principal)


async def node_schemas(
    reader: PromptReader, ctx: RequestContext, *, required: bool
) -> NodeSchemas | None:
    """The node schemas known from the instances' ``/object_info`` (kept fresh by the catalog's
    TTL); fetched now when ``required`` and none is known yet.

    Raises:
        ServiceUnavailable: ``required`` and no copy could be fetched.
        ProxyError: ComfyUI could not be reached for it.
    """
    source = reader.schemas
    schemas = source.known()
    if schemas is not None:
        if required:
            await source.refresh(fetch=False)  # a stale copy starts a refresh, not waited for
        return schemas
    if not required:
        return None
    try:
        await source.refresh(fetch=True)
    except ProxyError as exc:
        log.warning("catalog_unavailable", request_id=ctx.request_id, error=exc.error_type)
        raise _unavailable() from None
    schemas = source.known()
    if schemas is None:
        log.warning("catalog_unavailable", request_id=ctx.request_id, error="no_catalog")
        raise _unavailable()
    return schemas


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "ComfyUI's node catalog (/object_info) is unavailable, so the prompt cannot be "
        "checked; try again shortly",
        error_type=CATALOG_UNAVAILABLE,
        headers={hdrs.RETRY_AFTER: str(_RETRY_SECONDS)},
    )


def _add_unknown(prompt: Prompt) -> None:
    """A node type the instances do not list: refused as ComfyUI refuses it (its inputs
    cannot be judged either)."""
    for node_id in prompt.unknown:
        class_type = prompt.nodes[node_id].class_type
        message = f"Cannot execute because node {class_type} does not exist."
        prompt.problems.append(
            Violation(
                node_id, class_type, "", UNKNOWN_NODE, message, details=f"Node ID '#{node_id}'"
            )
        )


def _refused(metrics: Metrics, ctx: RequestContext, reason: str) -> None:
    metrics.prompt_refusals.labels(reason).inc()
    principal = ctx.principal
    log.warning(
        "prompt_malformed",
        request_id=ctx.request_id,
        user=principal.comfy_user if principal is not None else None,
        reason=reason,
    )


class PromptGuard:
    """Reads and re-serialises every ``POST /prompt`` (see module doc)."""

    name = "prompt"

    def __init__(self, reader: PromptReader) -> None:
        self._reader = reader

    async def check(self, request: web.Request, ctx: RequestContext) -> None:
        if is_prompt_submission(request, ctx):
            await read_prompt(request, ctx, reader=self._reader)


__all__ = [
    "CATALOG_UNAVAILABLE",
    "NODE_SCHEMAS",
    "PromptGuard",
    "PromptReader",
    "SchemaSource",
    "forward_submission",
    "is_prompt_submission",
    "node_schemas",
    "read_prompt",
    "schemas_required",
]
