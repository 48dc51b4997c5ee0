"""Request bodies read as ComfyUI reads them, minus everything two readers could read apart.

ComfyUI reads ``POST /prompt`` with aiohttp's ``await request.json()``: the bytes are decoded with
the request's charset (UTF-8 when none) and handed to ``json.loads``. This module does the same,
then refuses what ``json.loads`` accepts but would make the proxy's reading ambiguous or its
re-serialisation differ from the bytes it was given:

- a key repeated in one object (``json.loads`` keeps the last, other parsers the first);
- ``NaN``, ``Infinity``, ``-Infinity`` and numbers that overflow to an infinite float;
- integers outside ``[-2**63, 2**64 - 1]`` (no ComfyUI widget holds more, and the proxy's
  serialiser writes 64-bit integers only);
- text that is not Unicode (lone surrogates from ``\\ud800`` escapes), nesting too deep to read.

What is accepted is forwarded as :func:`dump_json` writes it: UTF-8, sent with
``Content-Type: application/json`` (no charset), so ComfyUI decodes it exactly as written.
"""

from __future__ import annotations

import codecs
import json
from typing import Any

import orjson

INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
"""The integers a body may carry: signed or unsigned 64-bit (seeds go up to ``2**64 - 1``)."""


class JsonRefused(ValueError):
    """The body is not JSON the proxy reads unambiguously; the message says why (for a 400)."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JsonRefused(f"the key {key[:80]!r} appears twice in one object")
            seen.add(key)
    return obj


def _constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise JsonRefused(f"the number {text[:40]} is too large")
    return value


# Integers are left to the C scanner (a hook per number would double the cost of a large
# body): the serialiser's check below refuses those beyond 64 bits.
_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float)


def parse_json(raw: bytes, charset: str | None = None) -> Any:
    """The body as ``json.loads`` reads it after aiohttp's decoding, strictly (module doc).

    Raises:
        JsonRefused: not decodable with ``charset``, not JSON, or ambiguous (module doc).
    """
    encoding = charset or "utf-8"
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise JsonRefused(f"unknown charset {encoding[:40]!r}") from None
    try:
        # SECURITY: decode as ComfyUI will (a charset=utf-7 body reads "+AC4-" as ".").
        text = raw.decode(encoding)
    except (UnicodeDecodeError, ValueError):
        raise JsonRefused(f"the body is not valid {encoding[:40]}") from None
    try:
        value = _DECODER.decode(text)
    except JsonRefused:
        raise
    except RecursionError:
        raise JsonRefused("the body is nested too deeply") from None
    except ValueError as exc:
        raise JsonRefused(f"the body is not JSON ({exc})") from None
    try:
        # Lone surrogates (text no UTF-8 writer can write back) and integers beyond 64 bits.
        orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        raise JsonRefused(f"the body holds a value JSON cannot carry back ({exc})") from None
    return value


def dump_json(value: object) -> bytes:
    """Compact UTF-8 JSON of a value :func:`parse_json` accepted (or built from one: the
    prompt model never holds a non-finite float, which orjson would write as ``null``).

    Raises:
        JsonRefused: a value no body could have carried (a lone surrogate, a huge integer).
    """
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        raise JsonRefused(f"cannot be written as JSON ({exc})") from None


__all__ = ["INT_MAX", "INT_MIN", "JsonRefused", "dump_json", "parse_json"]
