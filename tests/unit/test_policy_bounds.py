"""The input-bound rule language: what parses, what it means, and the errors for what does not."""

from __future__ import annotations

import math
import re

import pytest

from proxy.policy.bounds import Bound, RuleSyntaxError, parse_bound


@pytest.mark.parametrize(
    ("text", "normalised", "inputs", "length"),
    [
        ("steps <= 60", "steps <= 60", ("steps",), False),
        ("steps<=60", "steps <= 60", ("steps",), False),
        (
            "width * height <= 2048*2048",
            "width * height <= 2048 * 2048",
            ("width", "height"),
            False,
        ),
        ("0 <= denoise <= 1", "0 <= denoise <= 1", ("denoise",), False),
        ("denoise in [0, 1]", "0 <= denoise <= 1", ("denoise",), False),
        ("cfg in [1.5, 30]", "1.5 <= cfg <= 30", ("cfg",), False),
        ("len(text) <= 4000", "len(text) <= 4000", ("text",), True),
        ("width * height * length <= 1280 * 720 * 121", None, ("width", "height", "length"), False),
        ("shift > -1", "shift > -1", ("shift",), False),
        ("strength != 0", "strength != 0", ("strength",), False),
        ("width <= height * 2", "width <= height * 2", ("width", "height"), False),
        ("x == 1e3", "x == 1000.0", ("x",), False),
    ],
)
def test_rules_that_parse(
    text: str, normalised: str | None, inputs: tuple[str, ...], length: bool
) -> None:
    bound = parse_bound(text)
    if normalised is not None:
        assert bound.text == normalised
    assert bound.inputs == inputs
    assert bound.length is length


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "non-empty"),
        ("steps", "needs a comparison"),
        ("steps <=", "ends too early"),
        ("60 <= 70", "must name an input"),
        ("steps <= 60 <= 70 <= 80", "at most two comparisons"),
        ("steps + 1 <= 60", "unexpected '+ 1"),
        ("steps <= 60 steps", "expected a comparison"),
        ("__import__('os') <= 1", "unexpected"),
        ("len(text) * width <= 5", "cannot be mixed"),
        ("denoise in [1, 0]", "empty range"),
        ("denoise in [0, x]", "expected a number"),
        ("len in [0, 1]", "not a rule"),
        ("steps <= 1e999", "not a finite number"),
        ("steps <= (60)", "expected a number or an input name"),
        ("steps; rm -rf / <= 1", "unexpected"),
    ],
)
def test_rules_that_do_not_parse_say_why(text: str, message: str) -> None:
    with pytest.raises(RuleSyntaxError, match=re.escape(message)):
        parse_bound(text)


@pytest.mark.parametrize(
    ("text", "values", "holds"),
    [
        ("steps <= 60", {"steps": 60}, True),
        ("steps <= 60", {"steps": 61}, False),
        ("steps < 60", {"steps": 60}, False),
        ("width * height <= 2048 * 2048", {"width": 2048, "height": 2048}, True),
        ("width * height <= 2048 * 2048", {"width": 4096, "height": 1025}, False),
        ("width * height <= 2048 * 2048", {"width": 4096, "height": 1024}, True),
        ("0 <= denoise <= 1", {"denoise": 0.0}, True),
        ("0 <= denoise <= 1", {"denoise": -0.01}, False),
        ("0 <= denoise <= 1", {"denoise": 1.0001}, False),
        ("0 <= denoise <= 1", {"denoise": math.nan}, False),  # NaN is never within bounds
        ("steps <= 60", {"steps": math.inf}, False),
        ("steps >= 1", {"steps": math.inf}, False),  # infinity is never a bounded value
        ("width * height <= 100", {"width": 10**30, "height": 10**30}, False),  # exact ints
        ("len(text) <= 3", {"text": 3}, True),
    ],
)
def test_what_rules_mean(text: str, values: dict[str, float], holds: bool) -> None:
    assert parse_bound(text).holds(values) is holds


def test_signature_is_what_the_rule_is_about() -> None:
    assert parse_bound("steps <= 60").signature == parse_bound("steps < 150").signature
    assert parse_bound("width * height <= 4").signature == parse_bound("height*width<=9").signature
    assert parse_bound("width <= 4").signature != parse_bound("width * height <= 4").signature
    assert parse_bound("len(text) <= 4").signature != parse_bound("text <= 4").signature


def test_a_rule_is_data_not_code() -> None:
    bound = parse_bound("width * height <= 2048 * 2048")
    assert bound == Bound(
        text="width * height <= 2048 * 2048",
        sides=(("width", "height"), (2048, 2048)),
        ops=("<=",),
        inputs=("width", "height"),
    )
