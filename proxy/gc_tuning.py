"""The cyclic garbage collector tuned for a request server (issue 17).

CPython collects its youngest generation every 700 new container objects (dicts, lists...).
One 20 KB ``POST /prompt`` parses into some 2,300 of them, and with a few dozen requests in
flight their parse trees are alive when the collector runs: they are scanned, promoted to the
older generations and counted towards the next full collection, which scans the whole heap
(the proxy's modules and app state: hundreds of thousands of objects). py-spy (``--native``)
put a third of a regular user's ``POST /prompt`` CPU in ``gc_collect_main``.

Request objects die by reference counting, not by the collector; what it is for - reference
cycles - is rare on the hot path. So, once the app has started: everything alive is moved out
of the collector's sight (``gc.freeze``: modules, settings, the route table never become
garbage) and the young generation is collected every :data:`YOUNG_THRESHOLD` allocations
instead of 700, so that a request's objects are usually freed before a collection ever sees
them. Cycles are still collected, later (at most some megabytes of them wait).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

YOUNG_THRESHOLD: Final = 50_000
"""New container objects between two collections of the youngest generation (CPython: 700)."""
MIDDLE_THRESHOLD: Final = 20
"""Young collections between two of the middle generation (CPython: 10)."""
OLD_THRESHOLD: Final = 100
"""Middle collections before a full one is considered (CPython: 10); CPython still waits
until the survivors since the last full one are a quarter of what it holds (the frozen heap
apart). A request's cycles die young and are collected in the two younger generations; only
long-lived ones wait for a full collection. Measured: 10 here cost ~7 % more CPU per
``POST /prompt`` (three alternated pairs: 1,444 / 1,476 / 1,416 µs against 1,563 / 1,589 /
1,506 µs)."""


def tune_collector() -> None:
    """Freeze what startup built and collect young objects less often (module doc)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLD_THRESHOLD)


@contextmanager
def collector_paused() -> Iterator[None]:
    """No collection inside: for a large parse whose tree is dropped before the block ends
    (the proxy's own reads of ComfyUI's queue and history, megabytes of graphs for a few ids).

    Collecting while such a tree is being built only scans it and promotes it towards a full
    collection, though reference counting frees it when the block ends. Synchronous code only
    (no ``await`` inside: nothing else may run while the collector is off).
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


__all__ = [
    "MIDDLE_THRESHOLD",
    "OLD_THRESHOLD",
    "YOUNG_THRESHOLD",
    "collector_paused",
    "tune_collector",
]
