"""proxy.gc_tuning: what startup built is frozen, young objects are collected less often."""

from __future__ import annotations

import gc

from proxy.gc_tuning import MIDDLE_THRESHOLD, OLD_THRESHOLD, YOUNG_THRESHOLD, tune_collector


def test_tuning_freezes_the_heap_and_raises_the_thresholds() -> None:
    before = gc.get_threshold()
    try:
        tune_collector()
        assert gc.get_threshold() == (YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLD_THRESHOLD)
        assert gc.get_freeze_count() > 0
        cycle: list[object] = []
        cycle.append(cycle)  # cycles are still collected
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
