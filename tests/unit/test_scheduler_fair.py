"""The scheduler's pure core: fair order, weights, ``front``, pull-back, estimates."""

from __future__ import annotations

from collections import defaultdict

import pytest

from proxy.scheduler.estimates import Estimates, shape_of
from proxy.scheduler.fair import (
    Held,
    InFlight,
    expected_wait,
    jain_index,
    pick,
    run_order,
    should_pull_back,
    virtual_time,
)


class Sim:
    """One instance running one prompt at a time, fed by :func:`pick` (a discrete simulation)."""

    def __init__(self) -> None:
        self.queues: dict[str, list[Held]] = defaultdict(list)
        self.finish: dict[str, float] = {}
        self.last_start = 0.0
        self.seq = 0
        self.ran: list[str] = []
        self.service: dict[str, float] = defaultdict(float)

    def submit(
        self, owner: str, *, cost: float = 1.0, weight: float = 1.0, front: bool = False
    ) -> None:
        self.seq += 1
        item = Held(f"p{self.seq}", owner, "user", self.seq, cost, weight, front, 0.0)
        self.queues[owner] = run_order([*self.queues[owner], item])

    def step(self, running: list[InFlight] | None = None) -> Held | None:
        backlog = {u: q for u, q in self.queues.items() if q}
        choice = pick(backlog, self.finish, virtual_time(running or [], self.last_start), "gpu")
        if choice is None:
            return None
        item = choice.item
        self.queues[item.owner].remove(item)
        self.finish[item.owner] = choice.finish
        self.last_start = choice.start
        self.ran.append(item.owner)
        self.service[item.owner] += item.cost
        return item


def test_a_flood_does_not_delay_b() -> None:
    sim = Sim()
    for _ in range(50):
        sim.submit("a")
    first = sim.step()
    assert first is not None
    assert first.owner == "a"
    # B submits while A's first prompt runs: B's is the next one released.
    running = [InFlight(first.prompt_id, "a", "gpu", 0.0, 1.0, False)]
    sim.submit("b")
    second = sim.step(running)
    assert second is not None
    assert second.owner == "b"


def test_equal_users_get_equal_service() -> None:
    sim = Sim()
    for owner in "abcd":
        for _ in range(20):
            sim.submit(owner, cost=1.0 + "abcd".index(owner) * 0.5)
    while sim.step() is not None and sum(sim.service.values()) < 40:
        pass
    assert jain_index(sim.service.values()) >= 0.95


def test_weights_split_service() -> None:
    sim = Sim()
    for _ in range(60):
        sim.submit("heavy", weight=2.0)
        sim.submit("light", weight=1.0)
    for _ in range(60):
        sim.step()
    ratio = sim.service["heavy"] / sim.service["light"]
    assert ratio == pytest.approx(2.0, rel=0.1)


def test_front_jumps_every_queue_and_is_charged() -> None:
    sim = Sim()
    for _ in range(5):
        sim.submit("a")
    sim.submit("boss", front=True)
    item = sim.step()
    assert item is not None
    assert item.owner == "boss"
    assert sim.finish["boss"] == pytest.approx(1.0)


def test_user_order_is_front_then_arrival() -> None:
    items = [
        Held("x", "u", "r", 3, 1, 1, False, 0),
        Held("y", "u", "r", 1, 1, 1, False, 0),
        Held("z", "u", "r", 5, 1, 1, True, 0),
    ]
    assert [h.prompt_id for h in run_order(items)] == ["z", "y", "x"]


def test_capability_aware_pick_skips_what_the_instance_cannot_run() -> None:
    queues = {
        "a": [
            Held("a1", "a", "r", 1, 1, 1, False, 0, ("big",)),
            Held("a2", "a", "r", 2, 1, 1, False, 0),
        ],
        "b": [Held("b1", "b", "r", 3, 1, 1, False, 0, ("big",))],
    }
    choice = pick(queues, {}, 0.0, "small")
    assert choice is not None
    assert choice.item.prompt_id == "a2"
    assert pick({"b": queues["b"]}, {}, 0.0, "small") is None


def test_pull_back_only_for_an_earlier_prompt() -> None:
    pending = InFlight("a2", "a", "gpu", start=1.0, credit=1.0, front=False)
    earlier = pick({"b": [Held("b1", "b", "r", 9, 1, 1, False, 0)]}, {}, 0.0, "gpu")
    later = pick({"a": [Held("a3", "a", "r", 3, 1, 1, False, 0)]}, {"a": 2.0}, 0.0, "gpu")
    assert earlier is not None
    assert should_pull_back(pending, earlier)
    assert later is not None
    assert not should_pull_back(pending, later)
    boss = pick({"c": [Held("c1", "c", "r", 9, 1, 1, True, 0)]}, {"c": 50.0}, 0.0, "gpu")
    assert boss is not None
    assert should_pull_back(pending, boss)
    assert not should_pull_back(InFlight("f", "c", "gpu", 5.0, 1.0, True), boss)


def test_jain_index_bounds() -> None:
    assert jain_index([1, 1, 1, 1]) == pytest.approx(1.0)
    assert jain_index([1, 0, 0, 0]) == pytest.approx(0.25)
    assert jain_index([]) == 1.0


def test_estimates_fall_back_and_average() -> None:
    est = Estimates(default_seconds=10.0)
    shape = shape_of(["KSampler", "SaveImage", "KSampler"])
    assert shape == shape_of(["SaveImage", "KSampler"])
    assert est.seconds(shape, "gpu0") == 10.0
    est.observe("gpu0", shape, 4.0)
    assert est.seconds(shape, "gpu0") == 4.0
    assert est.seconds(shape, "gpu1") == 4.0  # any instance's runs, until gpu1's own
    est.observe("gpu0", shape, 14.0)
    assert est.seconds(shape, "gpu0") == pytest.approx(7.0)


def test_expected_wait_scales_with_share() -> None:
    alone = expected_wait([2.0, 2.0], weight=1, active_weights=1, in_flight_seconds=2, instances=1)
    shared = expected_wait([2.0, 2.0], weight=1, active_weights=4, in_flight_seconds=2, instances=1)
    assert alone == pytest.approx(6.0)
    assert shared == pytest.approx(18.0)
