"""The proxy's exception tree. Library errors are mapped to it at the boundary that sees them.

::

    ProxyError                    rendered by chain.render_errors into one JSON shape
      Rejection                   the proxy refuses the request itself (status, error type)
        BadRequest                400
        Unauthenticated           401 (302 to the login page for a browser navigation)
        Forbidden                 403
        NotFound                  404
        PayloadTooLarge           413
        RateLimited               429 + Retry-After
        ServiceUnavailable        503 (draining, not ready)
      UpstreamError               ComfyUI could not be reached or did not answer
        UpstreamUnavailable       502 (refused, reset, DNS)
        UpstreamTimeout           504
    SettingsError                 startup only; lists every configuration problem at once

The body is always ``{"error": {"type": ..., "message": ...}}``, which is also ComfyUI's own
shape on ``/prompt`` (the stock frontend shows ``error.message``), plus ``node_errors`` there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ProxyError(Exception):
    """Base of every error the proxy renders as an HTTP response."""

    status: int = 500
    error_type: str = "proxy_error"
    empty_body: bool = False
    """Answer with an empty body (to look exactly like ComfyUI's own 404 for a hidden file)."""
    node_errors: Mapping[str, Any] | None = None
    """ComfyUI's per-node errors, rendered on ``/prompt`` so the UI marks the nodes."""

    def __init__(
        self,
        message: str,
        *,
        error_type: str | None = None,
        status: int | None = None,
        details: str = "",
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if error_type is not None:
            self.error_type = error_type
        if status is not None:
            self.status = status
        self.details = details
        self.headers = headers or {}
        self.extra = extra or {}
        self.fields: dict[str, Any] = {}
        """More members of the body's ``error`` object (e.g. ``retry_after``)."""


class Rejection(ProxyError):
    """The proxy refuses the request (a guard decided, or the request is malformed)."""


class BadRequest(Rejection):
    status = 400
    error_type = "bad_request"


class Unauthenticated(Rejection):
    status = 401
    error_type = "unauthenticated"


class Forbidden(Rejection):
    status = 403
    error_type = "forbidden"


class NotFound(Rejection):
    status = 404
    error_type = "not_found"


class PayloadTooLarge(Rejection):
    status = 413
    error_type = "payload_too_large"


class RateLimited(Rejection):
    """429: over a rate limit or a quota. ``retry_after`` (whole seconds, rounded up by the
    caller) becomes the ``Retry-After`` header and ``error.retry_after`` in the body."""

    status = 429
    error_type = "rate_limited"

    def __init__(self, message: str, *, retry_after: int, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = max(1, retry_after)
        self.headers.setdefault("Retry-After", str(self.retry_after))
        self.fields = {**self.fields, "retry_after": self.retry_after}


class ServiceUnavailable(Rejection):
    status = 503
    error_type = "service_unavailable"


class UpstreamError(ProxyError):
    """ComfyUI could not be reached or did not answer in time."""

    status = 502
    error_type = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    status = 502
    error_type = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    error_type = "upstream_timeout"


class SettingsError(Exception):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
