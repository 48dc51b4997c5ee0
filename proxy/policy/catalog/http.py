"""The catalog's answers on the wire: cached bytes with a weak ETag (``If-None-Match`` -> 304),
and ComfyUI's own answers with a filtered body.

Transparent encoding: an answer is encoded exactly when and how ComfyUI's would be (ComfyUI
compresses JSON only with ``--enable-compress-response-body``, for clients whose
``Accept-Encoding`` names gzip, with aiohttp's choice of coding). The cached ``/object_info``
copies are compressed once per coding (``Rendered.encoded``), not per request.

The ETag of a role's copy is the hash of that copy: a client's ``If-None-Match`` is compared
with the copy of the caller's own role, so a tag learnt under one role never validates another
role's answer.
"""

from __future__ import annotations

from aiohttp import hdrs, web

from proxy.policy.catalog.cache import Answer, Rendered
from proxy.state import RequestContext

JSON = "application/json"


async def send_rendered(
    request: web.Request, ctx: RequestContext, rendered: Rendered, *, compressed: bool
) -> web.Response:
    """A cached answer: 304 when the client has it, else its bytes, encoded as ComfyUI would
    encode them for this client when it compresses (``compressed``)."""
    headers = {hdrs.ETAG: rendered.etag}
    if compressed:
        headers[hdrs.VARY] = hdrs.ACCEPT_ENCODING
    if not_modified(request, rendered.etag):
        return web.Response(status=304, headers=headers)
    headers[hdrs.CONTENT_TYPE] = rendered.content_type
    body = rendered.body
    coding = comfy_coding(request) if compressed and body else None
    if coding is not None:
        body = await rendered.encoded(coding)
        headers[hdrs.CONTENT_ENCODING] = coding
    ctx.bytes_out = len(body)
    return web.Response(status=200, headers=headers, body=body)


def answer_response(
    request: web.Request, ctx: RequestContext, answer: Answer, body: bytes | None = None
) -> web.Response:
    """ComfyUI's answer with its status and headers, and ``body`` (default: its own), encoded
    as ComfyUI encoded it (the request carried the client's ``Accept-Encoding``)."""
    payload = answer.body if body is None else body
    response = web.Response(
        status=answer.status, reason=answer.reason, headers=answer.headers, body=payload
    )
    if answer.compressed and payload:
        response.enable_compression()  # aiohttp's choice, as ComfyUI's compress_body makes it
    ctx.bytes_out = len(payload)
    return response


def not_modified(request: web.Request, etag: str) -> bool:
    header = request.headers.get(hdrs.IF_NONE_MATCH)
    if not header:
        return False
    opaque = etag.removeprefix("W/")
    for candidate in header.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == opaque:  # weak comparison (RFC 9110 13.1.2)
            return True
    return False


def comfy_coding(request: web.Request) -> str | None:
    """The content coding ComfyUI (with ``--enable-compress-response-body``) would use for this
    request: none unless ``gzip`` appears in ``Accept-Encoding``; then aiohttp's choice, which
    tries ``deflate`` before ``gzip``. q-values are ignored, as they are there."""
    header = request.headers.get(hdrs.ACCEPT_ENCODING, "")
    if "gzip" not in header:
        return None
    return "deflate" if "deflate" in header.lower() else "gzip"


def is_json(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == JSON
