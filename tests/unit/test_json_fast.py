"""The fast JSON path (proxy.comfy.json_fast) reads exactly as the strict reader, or declines."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from bench.fixtures import prompt_body
from proxy.comfy.json_body import JsonRefused, dump_json, parse_json
from proxy.comfy.json_fast import parse_canonical

ACCEPTED = [
    b"{}",
    b' {"a": 1, "b": [1, 2.5, -0, 1e5, "x:y"], "c": {"d": null}} ',
    b'{"seed": 18446744073709551615, "neg": -9223372036854775808}',
    b'{"f": 0.1, "g": 1.7976931348623157e308, "h": 5e-324, "i": 2.2250738585072014e-308}',
    b'{"a": "\\u003a", "b": "caf\\u00e9 \\ud83d\\ude00"}',
    json.dumps({"deep": json.loads("[" * 200 + "]" * 200)}).encode(),
    b'{"x": [' + b",".join(b"{}" for _ in range(600)) + b"]}",
]

DECLINED = [
    b'{"a": 1, "a": 2}',
    b'{"a": {"b": 1, "b": 1}}',
    b'{"a": ":", "a": "\\u003a"}',  # a repeated key hidden by an escaped colon
    b'{"a": 1, "a": "\\u003A"}',
    b'{"big": 18446744073709551616}',
    b'{"neg": -9223372036854775809}',
    b'{"n": NaN}',
    b'{"n": 1e400}',
    b'"\\ud800"',
    b"\xef\xbb\xbf{}",
    b"[" * 1100 + b"]" * 1100,
    b"[" * 300 + b"]" * 300,  # deeper than any body the proxy forwards (its dump stops at 255)
    b'{"long": "12345678901234567890123"}',  # a long digit run it cannot place: declined
]


@pytest.mark.parametrize("raw", ACCEPTED)
def test_fast_path_reads_as_the_strict_reader(raw: bytes) -> None:
    fast = parse_canonical(raw, None)
    assert fast is not None
    value, dumped = fast
    strict = parse_json(raw)
    assert value == strict
    assert dumped == dump_json(strict)


@pytest.mark.parametrize("raw", DECLINED)
def test_fast_path_declines_what_it_cannot_prove(raw: bytes) -> None:
    assert parse_canonical(raw, None) is None


def test_repeated_keys_are_still_refused_by_the_strict_reader() -> None:
    with pytest.raises(JsonRefused, match="appears twice"):
        parse_json(DECLINED[2])


def test_other_charsets_take_the_strict_reader() -> None:
    assert parse_canonical(b"{}", "latin-1") is None
    assert parse_canonical(b"{}", "utf-8") == ({}, b"{}")


def test_bench_prompt_takes_the_fast_path(tmp_path: Path) -> None:
    raw = prompt_body("p", 20_000, "c")
    fast = parse_canonical(raw, None)
    assert fast is not None
    assert fast[1] == orjson.dumps(json.loads(raw))
