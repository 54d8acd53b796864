"""The worker's start-up heap is kept out of full garbage collections (issue 14: the latency tail)."""
from __future__ import annotations

import gc
from typing import Any

import pytest

from streams.core.config import Settings
from streams.pipeline.heap import PauseWatch, freeze_startup_heap, tune_collector, watch_collector


def test_the_start_up_heap_is_left_out_of_later_collections() -> None:
    kept: list[Any] = [{"loaded": i} for i in range(1000)]  # stands for the PKI, product master, modules
    try:
        frozen = freeze_startup_heap("test")
        assert frozen >= 1000 and gc.get_freeze_count() == frozen
        assert not any(obj is kept for obj in gc.get_objects(generation=2))  # a full collection skips it
    finally:
        gc.unfreeze()


def test_the_freeze_is_on_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CSOS_GC_FREEZE", raising=False)
    assert Settings.from_env().gc_freeze is True
    monkeypatch.setenv("CSOS_GC_FREEZE", "0")
    assert Settings.from_env().gc_freeze is False


def test_the_young_threshold_is_raised_and_the_older_ones_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        tune_collector(10_000)
        assert gc.get_threshold() == (10_000, 10, 10)
        tune_collector(0)  # 0: left as it is
        assert gc.get_threshold() == (10_000, 10, 10)
    finally:
        gc.set_threshold(*before)
    monkeypatch.delenv("CSOS_GC_YOUNG", raising=False)
    assert Settings.from_env().gc_young == 10_000
    monkeypatch.setenv("CSOS_GC_YOUNG", "0")
    assert Settings.from_env().gc_young == 0


def test_every_collection_is_timed_and_a_long_one_logged(caplog: pytest.LogCaptureFixture) -> None:
    from connectors.kafka.metrics import GC_PAUSE

    def count(generation: str) -> float:
        return next(s.value for m in GC_PAUSE.collect() for s in m.samples
                    if s.name.endswith("_count") and s.labels["generation"] == generation)

    watch = watch_collector()
    try:
        assert watch_collector() is watch and sum(isinstance(cb, PauseWatch) for cb in gc.callbacks) == 1
        before = count("2")
        gc.collect()
        assert count("2") == before + 1
        watch.log_over = 0.0  # every pause is "long" now
        with caplog.at_level("INFO", logger="streams.pipeline.heap"):
            gc.collect(0)
        assert any("garbage collection of generation 0" in r.getMessage() for r in caplog.records)
    finally:
        gc.callbacks.remove(watch)
