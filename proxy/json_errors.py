"""The proxy's JSON error answers, in ComfyUI's own error shape: what every refusal looks like
on the wire, from the middleware chain, the login page and the metrics endpoint alike."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web


def error_body(
    error_type: str,
    message: str,
    *,
    details: str = "",
    extra: Mapping[str, Any] | None = None,
    comfy_prompt: bool = False,
    node_errors: Mapping[str, Any] | None = None,
    fields: Mapping[str, Any] | None = None,
) -> bytes:
    """The JSON error body: ComfyUI's own shape, so the stock frontend shows ``message``;
    ``fields`` adds members to the ``error`` object (e.g. ``retry_after``)."""
    body: dict[str, Any] = {
        "error": {
            "type": error_type,
            "message": message,
            "details": details,
            "extra_info": dict(extra or {}),
            **(fields or {}),
        }
    }
    if comfy_prompt:
        body["node_errors"] = dict(node_errors or {})
    return orjson.dumps(body)


def json_error(
    status: int,
    error_type: str,
    message: str,
    *,
    comfy_prompt: bool = False,
    details: str = "",
    extra: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    node_errors: Mapping[str, Any] | None = None,
    fields: Mapping[str, Any] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(
            error_type,
            message,
            details=details,
            extra=extra,
            comfy_prompt=comfy_prompt,
            node_errors=node_errors,
            fields=fields,
        ),
        content_type="application/json",
        headers=headers,
    )


__all__ = ["error_body", "json_error"]
