"""Keep the start-up heap out of the garbage collector's full collections.

Why: CPython's cyclic collector walks every tracked object of the oldest
generation on a full (generation 2) collection. A worker's heap after start-up
is ~150,000 such objects (imported modules and functions, the PKI, the product
master, Faust's and aiokafka's machinery), none of which ever becomes garbage,
yet each full collection walked them all: measured with ``csos bench --rate 30``
on the 2-core machine, five full collections in the run, 74-320 ms each, the
event loop (every agent) stopped meanwhile. Those pauses were the tail of
received -> verdict latency (p99 ~470 ms against a p50 of ~100 ms).

``gc.freeze()`` moves every object tracked now to a permanent generation that
collections skip; objects created later (per-order work, the agents' caches)
are collected as before, and reference counting frees frozen objects as usual
(only a *cycle* among frozen objects would never be reclaimed: the start-up
heap holds no such garbage, as a collection runs just before the freeze).

``tune_collector`` raises the young generation's threshold: CPython starts a
young collection every 700 net allocations of tracked objects, and a worker
allocates ~2,000 per order (decoded records, findings, outputs), nearly all
freed by reference counting within the order. At 10,000 most of them are gone
before a collection would walk them: in process (``bench_worker --freeze``,
300 registrants) the collector's CPU fell by a third, 0.78 -> 0.52 s of a
~15 s run, the same outputs (BENCHMARKS.md, issue 14, third round).
"""
from __future__ import annotations

import gc
import logging
import time
from typing import Any

from connectors.kafka.metrics import GC_PAUSE

log = logging.getLogger(__name__)


def tune_collector(young: int) -> None:
    """Start a young collection every ``young`` net allocations (0: keep CPython's thresholds).

    The older generations keep their thresholds (each collected after ten
    collections of the one below): garbage cycles are still reclaimed, only
    less often, and at most ``young`` tracked objects wait for it.
    """
    if young > 0:
        _, middle, old = gc.get_threshold()
        gc.set_threshold(young, middle, old)


class PauseWatch:
    """Times every garbage collection: ``csos_gc_pause_seconds`` by generation, and a log line for a long one.

    Why: a collection stops every agent of the worker; a received -> verdict
    tail that lines up with these pauses is the collector's, not the broker's.
    """

    def __init__(self, log_over_seconds: float) -> None:
        self.log_over = log_over_seconds
        self._started = 0.0
        self._hist = [GC_PAUSE.labels(str(g)) for g in range(3)]

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        generation = info.get("generation", 2)
        self._hist[min(max(generation, 0), 2)].observe(took)
        if took > self.log_over:
            log.info("garbage collection of generation %d: %.1f ms (%d objects collected)", generation,
                     took * 1000, info.get("collected", 0))


def watch_collector(log_over_seconds: float = 0.02) -> PauseWatch:
    """Install one ``PauseWatch`` (once per process); returns it."""
    for cb in gc.callbacks:
        if isinstance(cb, PauseWatch):
            return cb
    watch = PauseWatch(log_over_seconds)
    gc.callbacks.append(watch)
    return watch


def freeze_startup_heap(what: str) -> int:
    """Collect once, then freeze what survives; returns how many objects are frozen in all.

    Called by each agent once its components are loaded and its state
    recovered, before its first batch: the pause of this one collection
    falls on start-up, not on an order.
    """
    started = time.monotonic()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("%s: %d objects kept out of garbage collection (collected and frozen in %.3f s)", what, frozen,
             time.monotonic() - started)
    return frozen
