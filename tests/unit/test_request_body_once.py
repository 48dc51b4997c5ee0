"""``RequestContext``: a parse serialised once, on the first read of ``body``, then sealed."""

from __future__ import annotations

import pytest

from proxy.state import RequestContext


class Parse:
    def __init__(self, value: bytes) -> None:
        self.value = value
        self.dumps = 0

    def dump(self) -> bytes:
        self.dumps += 1
        return self.value


def test_serialised_on_the_first_read_only() -> None:
    ctx = RequestContext(request_id="t")
    parse = Parse(b'{"a":1}')
    ctx.serialise_later(parse)
    ctx.serialise_later(parse)  # edited twice before anyone read it: still one write
    assert ctx.current_parse() is parse
    assert parse.dumps == 0
    assert ctx.body == b'{"a":1}'
    assert ctx.body is ctx.body
    assert parse.dumps == 1
    assert ctx.parsed_body == (ctx.body, parse)
    assert ctx.current_parse() is parse


def test_no_edit_after_the_bytes_were_read() -> None:
    ctx = RequestContext(request_id="t")
    parse = Parse(b"{}")
    ctx.serialise_later(parse)
    assert ctx.body == b"{}"
    with pytest.raises(RuntimeError, match="read before"):
        ctx.serialise_later(parse)
    assert ctx.body == b"{}"  # unchanged: what was read is what is forwarded


def test_replacing_the_bytes_drops_the_parse() -> None:
    ctx = RequestContext(request_id="t")
    ctx.serialise_later(Parse(b"{}"))
    ctx.body = b"raw"
    assert ctx.body == b"raw"
    assert ctx.current_parse() is None
    ctx.serialise_later(Parse(b"[]"))  # a fresh parse of new bytes may be edited again
    assert ctx.body == b"[]"
