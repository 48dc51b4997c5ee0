"""Input bounds: a tiny, non-evaluating rule language (``steps <= 60``, ``width * height <=
2048 * 2048``, ``0 <= denoise <= 1``, ``denoise in [0, 1]``, ``len(text) <= 4000``).

Grammar (whitespace is free; nothing else is accepted)::

    rule    := product (op product){1,2}          chained: "0 <= denoise <= 1"
             | NAME "in" "[" number "," number "]"   sugar for "lo <= NAME <= hi"
    product := factor ("*" factor)*
    factor  := number | NAME | "len" "(" NAME ")"
    number  := ["-"] digits ["." digits] [("e"|"E") ["+"|"-"] digits]
    op      := "<=" | "<" | ">=" | ">" | "==" | "!="

``NAME`` is an input name of the node (an identifier). A rule must name at least one input;
``len(...)`` rules (string length) cannot be mixed with numeric ones.

SECURITY: rules are parsed into data by this module's own tokenizer and evaluated by walking
that data; no text from a policy file ever reaches ``eval``, ``compile`` or ``re``.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Number = int | float
Factor = Number | str
"""A literal number, or the name of an input whose (numeric or length) value is used."""

COMPARISONS: dict[str, Callable[[Number, Number], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
    "==": operator.eq,
    "!=": operator.ne,
}
_TOKEN = re.compile(
    r"\s*(?:"
    r"(?P<number>-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op><=|>=|==|!=|<|>)"
    r"|(?P<punct>[*()\[\],])"
    r")"
)
MAX_COMPARISONS = 2


class RuleSyntaxError(ValueError):
    """A rule that does not parse; the message says where and what was expected."""


@dataclass(frozen=True, slots=True)
class Bound:
    """One compiled rule: ``sides[0] ops[0] sides[1] [ops[1] sides[2]]``."""

    text: str
    """The rule as written (whitespace normalised), quoted in refusals."""
    sides: tuple[tuple[Factor, ...], ...]
    ops: tuple[str, ...]
    inputs: tuple[str, ...]
    """The inputs the rule names, in order of first appearance."""
    length: bool = False
    """A ``len(...)`` rule: inputs are strings and their lengths are compared."""

    @property
    def signature(self) -> tuple[bool, frozenset[str]]:
        """What the rule is *about*: a later or more specific rule with the same signature
        replaces this one (``steps <= 150`` for power users replaces the base's ``steps <= 60``)."""
        return (self.length, frozenset(self.inputs))

    def holds(self, values: Mapping[str, Number]) -> bool:
        """Whether the rule holds for ``values`` (every input the rule names must be present).

        NaN and infinite products never hold: a bound is a promise of a finite, known value.
        """
        results = [_product(side, values) for side in self.sides]
        for i, op in enumerate(self.ops):
            left, right = results[i], results[i + 1]
            if _not_finite(left) or _not_finite(right) or not COMPARISONS[op](left, right):
                return False
        return True


def _not_finite(value: Number) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _product(side: tuple[Factor, ...], values: Mapping[str, Number]) -> Number:
    result: Number = 1
    for factor in side:
        result *= values[factor] if isinstance(factor, str) else factor
    return result


def parse_bound(text: str) -> Bound:
    """Compile one rule.

    Raises:
        RuleSyntaxError: the rule does not follow the grammar (the message names the problem).
    """
    if not isinstance(text, str) or not text.strip():
        raise RuleSyntaxError("a rule must be a non-empty string such as 'steps <= 60'")
    return _Parser(text).rule()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.pos = 0
        self.inputs: list[str] = []
        self.length: bool | None = None

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise self.error("the rule ends too early")
        self.pos += 1
        return token

    def expect(self, kind: str, value: str | None = None) -> str:
        token = self.take()
        if token[0] != kind or (value is not None and token[1] != value):
            raise self.error(f"expected {value or kind!r}, found {token[1]!r}")
        return token[1]

    def error(self, message: str) -> RuleSyntaxError:
        return RuleSyntaxError(f"{self.text.strip()!r}: {message}")

    def rule(self) -> Bound:
        if len(self.tokens) >= 2 and self.tokens[1] == ("name", "in"):
            return self._in_range()
        sides = [self.product()]
        ops: list[str] = []
        while (token := self.peek()) is not None:
            if token[0] != "op":
                found = token[1]
                raise self.error(f"expected a comparison (<=, <, >=, >, ==, !=), found {found!r}")
            ops.append(self.take()[1])
            sides.append(self.product())
        if not ops:
            raise self.error("a rule needs a comparison, e.g. 'steps <= 60'")
        if len(ops) > MAX_COMPARISONS:
            raise self.error("at most two comparisons, e.g. '0 <= denoise <= 1'")
        return self._finish(tuple(sides), tuple(ops))

    def _in_range(self) -> Bound:
        name = self.expect("name")
        if name == "len":
            raise self.error("'len in [...]' is not a rule; write 'len(text) <= 4000'")
        self._use_input(name, length=False)
        self.expect("name", "in")
        self.expect("punct", "[")
        low = self.number()
        self.expect("punct", ",")
        high = self.number()
        self.expect("punct", "]")
        if self.peek() is not None:
            raise self.error(f"unexpected {self.take()[1]!r} after the range")
        if low > high:
            raise self.error(f"empty range [{low}, {high}]")
        return self._finish(((low,), (name,), (high,)), ("<=", "<="))

    def product(self) -> tuple[Factor, ...]:
        factors = [self.factor()]
        while self.peek() == ("punct", "*"):
            self.take()
            factors.append(self.factor())
        return tuple(factors)

    def factor(self) -> Factor:
        kind, value = self.take()
        if kind == "number":
            return _number(value, self)
        if kind != "name":
            raise self.error(f"expected a number or an input name, found {value!r}")
        if value == "len" and self.peek() == ("punct", "("):
            self.take()
            name = self.expect("name")
            self.expect("punct", ")")
            self._use_input(name, length=True)
            return name
        if value in ("in", "len"):
            raise self.error(f"{value!r} cannot be used as an input name here")
        self._use_input(value, length=False)
        return value

    def number(self) -> Number:
        kind, value = self.take()
        if kind != "number":
            raise self.error(f"expected a number, found {value!r}")
        return _number(value, self)

    def _use_input(self, name: str, *, length: bool) -> None:
        if self.length is not None and self.length != length:
            raise self.error("len(...) cannot be mixed with numeric inputs in one rule")
        self.length = length
        if name not in self.inputs:
            self.inputs.append(name)

    def _finish(self, sides: tuple[tuple[Factor, ...], ...], ops: tuple[str, ...]) -> Bound:
        if not self.inputs:
            raise self.error("a rule must name an input, e.g. 'steps <= 60'")
        text = f" {ops[0]} ".join(" * ".join(_show(f, self.length) for f in s) for s in sides[:2])
        if len(sides) > 2:
            text += f" {ops[1]} " + " * ".join(_show(f, self.length) for f in sides[2])
        return Bound(
            text=text,
            sides=sides,
            ops=ops,
            inputs=tuple(self.inputs),
            length=bool(self.length),
        )


def _show(factor: Factor, length: bool | None) -> str:
    if isinstance(factor, str):
        return f"len({factor})" if length else factor
    return repr(factor)


def _number(text: str, parser: _Parser) -> Number:
    value: Number = float(text) if any(c in text for c in ".eE") else int(text)
    if isinstance(value, float) and not math.isfinite(value):
        raise parser.error(f"{text!r} is not a finite number")
    return value


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    end = len(text.rstrip())
    while pos < end:
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise RuleSyntaxError(f"{text.strip()!r}: unexpected {text[pos:].strip()[:10]!r}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


__all__ = ["COMPARISONS", "Bound", "Factor", "Number", "RuleSyntaxError", "parse_bound"]
