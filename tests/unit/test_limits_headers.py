"""Rate-limit headers: IETF structured fields and the legacy trio, each switchable."""

from __future__ import annotations

from proxy.limits.gcra import Decision
from proxy.limits.headers import LimitHeaders
from proxy.settings.limits import Limit

SUBMIT = Limit(rate="30/minute", burst=10)  # T = 2 s: full in 20 s


def build(*, ietf: bool = True, legacy: bool = True) -> LimitHeaders:
    return LimitHeaders.build("submit", SUBMIT, ietf=ietf, legacy=legacy)


def test_allowed_response_headers() -> None:
    headers = build().headers(Decision(True, 3, 0.0, 13.2))
    assert headers == [
        ("RateLimit-Policy", '"submit";q=10;w=20'),
        ("RateLimit", '"submit";r=3;t=14'),
        ("X-RateLimit-Limit", "10"),
        ("X-RateLimit-Remaining", "3"),
        ("X-RateLimit-Reset", "14"),
    ]


def test_refused_response_headers_point_t_at_the_next_admission() -> None:
    # Retry-After (1.5 s -> 2) must not be earlier than the end of the effective window t.
    headers = dict(build().headers(Decision(False, 0, 1.5, 19.5)))
    assert headers["RateLimit"] == '"submit";r=0;t=2'
    assert headers["X-RateLimit-Remaining"] == "0"
    assert headers["X-RateLimit-Reset"] == "20"  # until the allowance is full again


def test_families_switch_off_independently() -> None:
    decision = Decision(True, 9, 0.0, 2.0)
    assert [n for n, _ in build(ietf=False).headers(decision)] == [
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
    ]
    assert [n for n, _ in build(legacy=False).headers(decision)] == [
        "RateLimit-Policy",
        "RateLimit",
    ]
    assert build(ietf=False, legacy=False).headers(decision) == []


def test_window_is_at_least_one_second() -> None:
    fast = LimitHeaders.build("read", Limit(rate="100/second", burst=1), ietf=True, legacy=False)
    assert fast.headers(Decision(True, 0, 0.0, 0.01))[0] == ("RateLimit-Policy", '"read";q=1;w=1')
