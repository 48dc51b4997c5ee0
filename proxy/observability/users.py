"""The opt-in per-user request counter: ``comfygate_user_requests_total{user}`` for the N
busiest users (``metrics.per_user_top_n``; off by default: user ids as labels are both
personal data and unbounded cardinality).

Each process counts every user in a bounded dict (a dict increment on the request path). The
exposition picks the top N at scrape time, so at most N series exist at once. With several
workers, each one writes its counts to a small JSON file next to prometheus-client's
multiprocess files every :data:`FLUSH_SECONDS`; the metrics listener sums the files.

A user's series can vanish when others overtake them and come back later with a higher
value; Prometheus treats the gap as staleness, so ``rate()`` stays meaningful.
"""

from __future__ import annotations

import asyncio
import heapq
import os
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import orjson
import structlog
from prometheus_client import Counter
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.periodic import Periodic

log = structlog.get_logger("comfygate.metrics")

MAX_TRACKED_USERS = 10_000
"""Users counted per process; later newcomers are not counted (bounded memory)."""
FLUSH_SECONDS = 5.0
FILE_PREFIX = "users_"
NAME = "comfygate_user_requests"
HELP = "Requests of the busiest users (opt-in, metrics.per_user_top_n), by user."


class UserCounter:
    """Per-process request counts by user subject."""

    def __init__(self, top_n: int) -> None:
        self.top_n = top_n
        self.counts: dict[str, int] = {}
        self._dirty = False

    def add(self, user: str) -> None:
        counts = self.counts
        if user in counts:
            counts[user] += 1
        elif len(counts) < MAX_TRACKED_USERS:
            counts[user] = 1
        else:
            return
        self._dirty = True

    def snapshot(self) -> bytes | None:
        """This process's counts as JSON if they changed since the last snapshot (taken on the
        event loop: the request path mutates the dict)."""
        if not self._dirty:
            return None
        self._dirty = False
        return orjson.dumps(self.counts)

    @staticmethod
    def write(directory: Path, data: bytes) -> None:
        """Publish a snapshot for the metrics listener (atomically: write, then rename)."""
        target = directory / f"{FILE_PREFIX}{os.getpid()}.json"
        scratch = target.with_suffix(".tmp")
        scratch.write_bytes(data)
        scratch.replace(target)

    async def flusher(
        self, directory: Path, failures: Counter | None = None
    ) -> AsyncIterator[None]:
        """Publish :meth:`snapshot` every :data:`FLUSH_SECONDS` while the app runs, and once at the
        end (an async generator for ``cleanup_ctx``). A failed write is logged and counted in
        ``failures`` (``Metrics.task_failures``), and tried again the next round."""

        async def flush() -> None:
            if (data := self.snapshot()) is not None:
                try:
                    await asyncio.to_thread(self.write, directory, data)
                except BaseException:
                    self._dirty = True  # not published: the next round writes it again
                    raise

        loop = Periodic(
            flush,
            FLUSH_SECONDS,
            name="user-counts-flush",
            log=log,
            event="user_counts_flush_failed",
            failures=failures,
        )
        loop.start()
        yield
        await loop.stop()
        if (data := self.snapshot()) is not None:
            self.write(directory, data)


def top(counts: dict[str, int], n: int) -> list[tuple[str, int]]:
    return heapq.nlargest(n, counts.items(), key=lambda item: item[1])


def merged_counts(directory: Path) -> dict[str, int]:
    """The sum of every worker's file (dead workers' included: counters never go down)."""
    total: dict[str, int] = {}
    for path in directory.glob(f"{FILE_PREFIX}*.json"):
        try:
            counts = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue  # a file being replaced; the next scrape reads it
        if isinstance(counts, dict):
            for user, count in counts.items():
                if isinstance(count, int):
                    total[user] = total.get(user, 0) + count
    return total


class UserCollector(Collector):
    """Exposes the top N users, from one process's counter or from the workers' files."""

    def __init__(
        self, top_n: int, *, counter: UserCounter | None = None, directory: Path | None = None
    ) -> None:
        self._top_n = top_n
        self._counter = counter
        self._directory = directory

    def collect(self) -> Iterator[Metric]:
        if self._counter is not None:
            counts = self._counter.counts
        elif self._directory is not None:
            counts = merged_counts(self._directory)
        else:  # pragma: no cover - constructed with one of the two
            counts = {}
        family = CounterMetricFamily(NAME, HELP, labels=("user",))
        for user, count in top(counts, self._top_n):
            family.add_metric((user,), count)
        yield family

    def describe(self) -> Iterable[Metric]:
        return ()  # collected at scrape time only; nothing to validate at registration
