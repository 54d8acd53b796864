"""The worker's start-up heap is kept out of full garbage collections (issue 14: the latency tail)."""
from __future__ import annotations

import gc
from typing import Any

import pytest

from streams.core.config import Settings
from streams.pipeline.heap import freeze_startup_heap


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
