"""Weighted fair queueing across users (pure: no I/O, no clock).

Start-time fair queueing (SFQ) over *estimated execution time*, with one FIFO per user:

- each user ``u`` has a finish tag ``F[u]``; the head of their queue gets the start tag
  ``S = max(V, F[u])``, and when it is released ``F[u] = S + cost / weight``;
- the next prompt for an instance is the eligible head (an item the instance can run, the first
  such of each user's queue) with the smallest start tag, ties broken by arrival;
- the virtual time ``V`` is the smallest start tag of the prompts released and not yet ended
  (the ones "in service"), or the start tag of the last prompt released when none is (the
  moment between one prompt ending and the next being chosen is not idleness).

A user who floods advances only their own ``F``: someone arriving later starts at ``V``, ahead
of the flood's backlog; users with equal demand get equal GPU time, weights ``2:1`` get a
``2:1`` split. Tags are only given to heads when they are released, so cancelling a held prompt
or revising an estimate needs no bookkeeping.

A prompt sent with ``front`` by a role that may prioritise (``roles.<r>.priority``) jumps every
user's queue (arrival order among such prompts); it is still charged to its user's ``F``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Held:
    """One prompt in the gateway queue (what the scheduler decides on; the body is kept apart)."""

    prompt_id: str
    owner: str
    role: str
    seq: int
    """Arrival order, unique and increasing across every replica."""
    cost: float
    """Estimated execution seconds when it was queued."""
    weight: float
    front: bool
    created: float
    """Wall-clock time it was queued."""
    candidates: tuple[str, ...] = ()
    """The instances able to run it (capability-aware placement); empty: any."""
    shape: str = ""
    """A key of the workflow's shape (its node types), for execution-time estimates."""
    client_id: str = ""
    """The client id the client sent (shown back in its views; ComfyUI gets a namespaced one)."""

    def runs_on(self, instance: str) -> bool:
        return not self.candidates or instance in self.candidates


@dataclass(frozen=True, slots=True)
class InFlight:
    """A prompt released to an instance and not yet seen ending."""

    prompt_id: str
    owner: str
    instance: str
    start: float
    """Its start tag."""
    credit: float
    """``cost / weight``: what its release added to its user's finish tag."""
    front: bool


@dataclass(frozen=True, slots=True)
class Choice:
    item: Held
    start: float
    finish: float


def run_order(items: Iterable[Held]) -> list[Held]:
    """One user's queue in the order it runs: ``front`` prompts first, then by arrival."""
    return sorted(items, key=lambda h: (not h.front, h.seq))


def virtual_time(in_flight: Iterable[InFlight], last_start: float) -> float:
    """``V``: the smallest start tag in service, else the last released one's."""
    return min((f.start for f in in_flight), default=last_start)


def pick(
    queues: Mapping[str, Sequence[Held]],
    finish: Mapping[str, float],
    vtime: float,
    instance: str,
) -> Choice | None:
    """The next prompt for ``instance``; None when no held prompt can run there.

    ``queues``: each backlogged user's held prompts in :func:`run_order` (the first few are
    enough: only the first one ``instance`` can run is a candidate).
    """
    best: tuple[tuple[bool, float, int], Choice] | None = None
    for user, items in queues.items():
        head = next((h for h in items if h.runs_on(instance)), None)
        if head is None:
            continue
        start = max(vtime, finish.get(user, 0.0))
        key = (not head.front, start if not head.front else 0.0, head.seq)
        if best is None or key < best[0]:
            best = (key, Choice(head, start, start + head.cost / head.weight))
    return None if best is None else best[1]


def should_pull_back(pending: InFlight, best: Choice) -> bool:
    """Whether a prompt released but still pending on its instance should give its place to
    ``best`` (strictly earlier in fair order); a ``front`` prompt is never pulled back for a
    plain one."""
    if pending.front:
        return False
    return best.item.front or best.start < pending.start


def jain_index(shares: Iterable[float]) -> float:
    """Jain's fairness index of per-user service: 1 when equal, ``1/n`` when one user has all."""
    values = [max(0.0, s) for s in shares]
    total = sum(values)
    squares = sum(v * v for v in values)
    if not values or squares == 0:
        return 1.0
    return total * total / (len(values) * squares)


def expected_wait(
    ahead_costs: Sequence[float],
    *,
    weight: float,
    active_weights: float,
    in_flight_seconds: float,
    instances: int,
) -> float:
    """Seconds until a held prompt starts, roughly: the work in flight shared by the instances,
    then the owner's own prompts ahead of it (``ahead_costs``, itself excluded) served at the
    owner's share ``weight / active_weights`` of the instances."""
    n = max(1, instances)
    share = min(1.0, weight / active_weights) if active_weights > 0 else 1.0
    return in_flight_seconds / n + sum(ahead_costs) / (share * n)


__all__ = [
    "Choice",
    "Held",
    "InFlight",
    "expected_wait",
    "jain_index",
    "pick",
    "run_order",
    "should_pull_back",
    "virtual_time",
]
