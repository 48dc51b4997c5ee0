"""GCRA arithmetic and the in-memory limiter, on an injected clock (no sleeping)."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from proxy.limits.gcra import MICROS, Decision, emission_micros, gcra, whole_seconds
from proxy.limits.limiter import MemoryLimiter, warn_if_process_local

T = 100_000  # 10 per second
B = 5


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def run(steps: int, now: int, tat: int | None = None) -> tuple[int | None, list[Decision]]:
    out = []
    for _ in range(steps):
        new_tat, decision = gcra(tat, now, T, B)
        tat = new_tat if new_tat is not None else tat
        out.append(decision)
    return tat, out


def test_exactly_burst_pass_at_once_then_refused_until_the_next_emission() -> None:
    now = 1_700_000_000 * MICROS
    tat, decisions = run(B + 1, now)
    assert [d.allowed for d in decisions] == [True] * B + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    assert [d.reset for d in decisions[:B]] == [0.1, 0.2, 0.3, 0.4, 0.5]
    refused = decisions[-1]
    assert refused.retry_after == pytest.approx(0.1)  # one emission interval
    assert refused.reset == pytest.approx(0.5)  # the stored TAT: full again after 5 * T
    assert tat == now + B * T  # a refusal does not move the TAT


def test_allowance_returns_one_per_emission_interval() -> None:
    now = 1_700_000_000 * MICROS
    tat, _ = run(B, now)
    # One microsecond early: still refused, with the exact wait.
    early = gcra(tat, now + T - 1, T, B)
    assert early[0] is None
    assert early[1].retry_after == pytest.approx(1 / MICROS)
    # On schedule: exactly one more, then refused again.
    tat2, on_time = gcra(tat, now + T, T, B)
    assert on_time.allowed
    assert on_time.remaining == 0
    assert gcra(tat2, now + T, T, B)[1].allowed is False
    # After a full refill (B * T), a whole burst again.
    _, after = run(B + 1, now + B * T + T, tat2)
    assert [d.allowed for d in after] == [True] * B + [False]


def test_idle_key_never_accumulates_more_than_burst() -> None:
    now = 1_700_000_000 * MICROS
    tat, _ = run(1, now)
    _, later = run(B + 1, now + 3600 * MICROS, tat)
    assert [d.allowed for d in later] == [True] * B + [False]


def test_burst_of_one_is_a_plain_rate() -> None:
    now = 0
    tat, first = gcra(None, now, T, 1)
    assert first == Decision(True, 0, 0.0, 0.1)
    assert gcra(tat, now + T // 2, T, 1)[1] == Decision(False, 0, 0.05, 0.05)


def test_emission_and_whole_seconds() -> None:
    assert emission_micros(2.0) == 2_000_000
    assert emission_micros(1 / 7) == 142_857
    assert emission_micros(0.0) == 1
    assert whole_seconds(0.0) == 0
    assert whole_seconds(0.000001) == 1  # rounded up: waiting that long is enough
    assert whole_seconds(2.0) == 2
    assert whole_seconds(2.000001) == 3


async def test_memory_limiter_on_an_injected_clock() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock)
    results = [await limiter.check("k", T, B) for _ in range(B + 1)]
    assert [d.allowed for d in results] == [True] * B + [False]
    assert results[-1].retry_after == pytest.approx(0.1)
    assert (await limiter.check("other", T, B)).allowed  # keys are independent
    clock.now += 0.1
    assert (await limiter.check("k", T, B)).allowed
    assert not (await limiter.check("k", T, B)).allowed


async def test_memory_limiter_sweeps_only_expired_keys() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock, sweep_above=10)
    for i in range(10):
        await limiter.check(f"old{i}", T, B)
    clock.now += 1.0  # every old key is full again: equivalent to absent
    for i in range(3):
        await limiter.check(f"new{i}", T, B)
    assert set(limiter._tats) == {"new0", "new1", "new2"}
    # A live key survives a sweep with its state.
    for _ in range(B - 1):
        await limiter.check("new0", T, B)
    assert not (await limiter.check("new0", T, B)).allowed


def test_warns_when_workers_would_each_count_alone() -> None:
    with capture_logs() as logs:
        assert warn_if_process_local(redis_configured=False, enabled=True, workers=4)
        assert not warn_if_process_local(redis_configured=True, enabled=True, workers=4)
        assert not warn_if_process_local(redis_configured=False, enabled=False, workers=4)
        assert not warn_if_process_local(redis_configured=False, enabled=True, workers=1)
    assert [(e["event"], e["log_level"], e["workers"]) for e in logs] == [
        ("ratelimit_not_shared", "warning", 4)
    ]
