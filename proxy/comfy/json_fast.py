"""The fast path of :func:`proxy.comfy.json_body.parse_json`: orjson reads the body, and
cheap byte-level checks prove it reads exactly as the strict reader would; anything they cannot
prove goes to the strict reader, which decides (and words the refusal) as before.

The strict reader is ``json.loads`` with a Python hook per object and per float: for a 20 KB
``POST /prompt`` body it was the largest single cost of the request (issue 17). orjson differs
from it in four ways, each checked here:

* a repeated key: orjson keeps the last silently. Proof of none: every key of the body adds
  exactly one structural ``:``, the canonical dump keeps one per distinct key, and strings carry
  the same ``:`` characters on both sides (orjson writes ``:`` literally; the body may escape it
  as ``\\u003a``, so those are added to the body's count). A repeated key drops a pair (and the
  strings in it) from the dump, so the body's count is then strictly larger; equal counts prove
  there was none. A count that differs for any other reason only means the strict reader runs.
* integers beyond 64 bits: orjson reads them as floats. Every digit run of 19 or more is read
  as an integer and must lie within the accepted range (a run inside a string or a fraction
  merely sends the body to the strict reader).
* nesting: orjson reads up to 1024 levels, ``json.loads`` stops near the interpreter's recursion
  limit; but the canonical dump (orjson, as the strict reader's own check) stops at 255 levels,
  far below either: whatever it writes, the strict reader reads.
* ``NaN``/``Infinity``, overflowing floats, lone surrogates, invalid UTF-8: orjson refuses them
  all, so the strict reader runs and refuses them with its own message.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from proxy.comfy.json_body import INT_MAX, INT_MIN

_LONG_DIGITS = re.compile(rb"-?[0-9]{19,}")
_DIGITS_ONLY = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))
"""``bytes.translate`` table: every digit to ``0``, every other byte to a space."""
_NINETEEN_DIGITS = b"0" * 19
_UTF8 = frozenset({"utf-8", "utf8", "UTF-8", "UTF8"})


def _long_digit_runs(raw: bytes) -> list[bytes]:
    """Digit runs of 19 or more (with a leading ``-``); most bodies have none, which one C-level
    ``translate`` and one substring search tell."""
    if _NINETEEN_DIGITS not in raw.translate(_DIGITS_ONLY):
        return []
    return _LONG_DIGITS.findall(raw)


def parse_canonical(raw: bytes, charset: str | None) -> tuple[Any, bytes] | None:
    """The body's value and its canonical serialisation (``orjson.dumps``), or None when the
    fast path cannot prove it reads the body as the strict reader would (see the module doc)."""
    if charset is not None and charset not in _UTF8:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    for run in _long_digit_runs(raw):
        if not INT_MIN <= int(run) <= INT_MAX:
            return None
    try:
        dumped = orjson.dumps(value)
    except orjson.JSONEncodeError:
        return None  # nested deeper than 255 levels: the strict reader refuses it too
    colons = raw.count(b":")
    if b"\\u003" in raw:
        colons += raw.count(b"\\u003a") + raw.count(b"\\u003A")
    if colons != dumped.count(b":"):
        return None  # a repeated key, or an escape the count cannot place: the strict reader
    return value, dumped


__all__ = ["parse_canonical"]
