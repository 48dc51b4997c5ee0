"""proxy.gc_tuning: what startup built is frozen, young objects are collected less often."""

from __future__ import annotations

import gc

from proxy.gc_tuning import (
    MIDDLE_THRESHOLD,
    OLD_THRESHOLD,
    YOUNG_THRESHOLD,
    collector_paused,
    tune_collector,
)


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


def test_the_collector_is_paused_inside_the_block_only() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    try:
        with collector_paused():
            raise ValueError("boom")
    except ValueError:
        pass
    assert gc.isenabled()  # back on after an error too


def test_a_collector_turned_off_elsewhere_stays_off() -> None:
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
