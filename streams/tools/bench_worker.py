"""What the worker's hot path costs besides the monitor: the verify and monitor processors, batched, no broker.

Not a test. ``csos bench`` measures the worker inside a whole pipeline, where
its CPU is mixed with Faust, the broker's round trips and the machine's other
load. This drives the part of the worker's work that is ours and runs in
process: per batch, ``begin_batch``, ``handle`` for every message,
``end_batch`` (the state encoded into the table) and ``publish_pending`` (the
buffered outputs handed to a publisher), for the verify processor over a
signed feed and then for the monitor processor over what it verified, as the
agents do (``streams.pipeline.app.decide_batch``), with an in-memory publisher
and dicts as tables.

It prints process CPU per order for each stage and, inside it, the time spent
in what another area owns (``Verifier.verify`` and the monitor's scoring,
learning and state conversion), so that what is left, the hot path's own
overhead (Avro, outcome records, audit events, outputs, state writes), shows as
one number. ``--profile`` adds cProfile's costliest functions; ``--digest``
runs with a fixed clock and counter-made UUIDs and prints a SHA-256 of every
output message and every state written, so two builds can be shown to publish
the same bytes.

    python -m streams.tools.bench_worker --registrants 40 --days 120 [--profile] [--digest] [--freeze]

``--freeze`` collects and freezes the heap before each stage, as each agent does once started: without it,
full collections walk the feed and every output this harness keeps in memory, which a worker does not. It
also sets the collector's young threshold as ``csos worker`` does (``CSOS_GC_YOUNG``; 0: CPython's).

The signed feed is kept in ``DIR`` (``--dir``, default ``var/bench-worker``) and reused, so two
builds see the same messages.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import io
import pickle
import pstats
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

from connectors.kafka import catalogue as t
from connectors.kafka.emit import Emitter
from connectors.kafka.testing import MemoryPublisher
from streams.core.config import Settings
from streams.core import native

#: A fixed "now" for ``--digest`` (after the demo feed's end, inside every certificate's validity).
FIXED_NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)


@dataclass
class Timed:
    """CPU seconds spent inside wrapped callables (another area's code), by name."""

    seconds: dict[str, float] = field(default_factory=dict)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, with its process CPU time added to ``seconds[name]``."""
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.process_time() - start
        return timed

    def total(self) -> float:
        return sum(self.seconds.values())


def load_feed(data_dir: Path, registrants: int, days: int, seed: int) -> dict[str, Any]:
    """The signed feed's received messages and what the processors need, made once per ``data_dir``
    (a feed's own directory: its PKI and registrant file go with it)."""
    cached = data_dir / "feed.pkl"
    if cached.exists():
        with open(cached, "rb") as fh:
            return pickle.load(fh)  # noqa: S301 - our own scratch file
    data_dir.mkdir(parents=True, exist_ok=True)
    from streams.tools.demo_core import END
    from streams.tools.feed import prepare_feed, publish

    settings = Settings().with_(data_dir=data_dir, pki_dir=data_dir / "pki")
    feed = prepare_feed(settings, registrants=registrants, seed=seed, days=days, end=END)
    received = MemoryPublisher()
    publish(feed.messages, received)  # type: ignore[arg-type]
    data = {"supplier": feed.result.population.supplier.dea_number,
            "received": [(m.partition(), m.offset(), m.key(), m.value()) for m in received.on(t.RECEIVED)]}
    with open(cached, "wb") as fh:
        pickle.dump(data, fh)
    return data


@contextmanager
def fixed_clock() -> Iterator[None]:
    """A constant clock and UUIDs from a counter, so that a run's output bytes depend on its input only."""
    counter = iter(range(1, 1 << 62))

    class _Fixed(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return FIXED_NOW if tz is not None else FIXED_NOW.replace(tzinfo=None)

    with ExitStack() as stack:
        stack.enter_context(mock.patch("streams.core.clock.utcnow", lambda: FIXED_NOW))
        stack.enter_context(mock.patch("streams.monitoring.monitor.datetime", _Fixed))
        stack.enter_context(mock.patch("uuid.uuid4", lambda: uuid.UUID(int=next(counter))))
        yield


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def run_stage(proc: Any, messages: list[Any], batch: int, loop: asyncio.AbstractEventLoop) -> float:
    """Every message through ``proc`` as ``decide_batch`` takes a batch; returns the process CPU seconds.

    After each batch its inputs count as committed, as the worker's offset refresh reports them (every 2 s,
    about a batch later on a busy worker), so outcome records drop their kept outputs as they do there.
    """
    start = time.process_time()
    committed: dict[tuple[str, int], int] = {}
    for chunk in _batches(messages, batch):
        proc.outcomes.set_committed(committed)
        proc.begin_batch()
        for message in chunk:
            proc.handle(message)
        proc.end_batch()
        loop.run_until_complete(proc.emitter.publish_pending())
        for message in chunk:
            committed[(message.topic, message.partition)] = message.offset + 1
    return time.process_time() - start


def build(data_dir: Path, supplier: str, timed: Timed | None) -> tuple[Any, Any, MemoryPublisher, dict[bytes, bytes],
                                                                    dict[bytes, bytes]]:
    """The two processors (buffered emitters over one in-memory publisher), with another area's calls timed
    when ``timed`` is given."""
    from streams.domain.products import ProductMaster
    from streams.monitoring.detectors import MonitorConfig
    from streams.monitoring.monitor import Monitor
    from streams.pipeline.agents.monitor import MonitorProcessor
    from streams.pipeline.agents.verify import VerifyProcessor
    from streams.tools.demo_core import _directory
    from streams.verification import Verifier

    settings = Settings().with_(data_dir=data_dir, pki_dir=data_dir / "pki")
    products = ProductMaster.load(settings.products_path)
    verifier = Verifier.from_pki_dir(settings.pki_dir, products)
    if timed is not None:
        verifier.verify = timed.wrap("verifier.verify", verifier.verify)  # type: ignore[method-assign]
    out = MemoryPublisher()
    verify_table: dict[bytes, bytes] = {}
    monitor_table: dict[bytes, bytes] = {}
    verify = VerifyProcessor(verifier, products, Emitter(out, "verify-agent", buffered=True), verify_table,
                             _directory(data_dir), suppliers={supplier})
    monitor = Monitor(MonitorConfig())
    for name in ("score", "learn_into", "note_verdict", "baselines") if timed is not None else ():
        setattr(monitor, name, timed.wrap(f"monitor.{name}", getattr(monitor, name)))
    proc = MonitorProcessor(monitor, monitor_table, Emitter(out, "monitor-agent", buffered=True))
    return verify, proc, out, verify_table, monitor_table


def _state_time(timed: Timed) -> Callable[[Any], Any]:
    """Wrap ``RegistrantBaselines.to_state`` (the monitor's state, converted for encoding) in ``timed``."""
    from streams.monitoring.baselines import RegistrantBaselines

    return timed.wrap("monitor.to_state", RegistrantBaselines.to_state)


def run(data_dir: Path, *, registrants: int, days: int, seed: int, batch: int, profile: bool,
        digest: bool, split: bool, setup_only: bool = False, freeze: bool = False) -> str:
    """Run both stages once and return the report (``freeze``: see ``--freeze``)."""
    from streams.monitoring.baselines import RegistrantBaselines
    from streams.core.config import Settings
    from streams.pipeline.heap import freeze_startup_heap, tune_collector
    from streams.pipeline.processor import InputMessage

    data_dir = data_dir / f"feed-{registrants}-{days}-{seed}"
    feed = load_feed(data_dir, registrants, days, seed)
    received = [InputMessage(t.RECEIVED, p, o, k, v) for p, o, k, v in feed["received"]]
    timed = Timed() if split else None
    loop = asyncio.new_event_loop()
    prof = cProfile.Profile() if profile else None
    with ExitStack() as stack:
        if digest:
            stack.enter_context(fixed_clock())
        if timed is not None:
            stack.enter_context(mock.patch.object(RegistrantBaselines, "to_state", _state_time(timed)))
        verify, monitor, out, verify_table, monitor_table = build(data_dir, feed["supplier"], timed)
        if setup_only:  # what a run costs before its first order (valgrind: a run's count minus this one's)
            return f"{len(received)} received orders, set up only"
        if prof:
            prof.enable()
        if freeze:
            tune_collector(Settings.from_env().gc_young)  # as `csos worker` does (CSOS_GC_YOUNG)
            freeze_startup_heap("bench_worker: verify stage")
        verify_cpu = run_stage(verify, received, batch, loop)
        inside_verify = timed.total() if timed else 0.0
        verified = [InputMessage(t.VERIFIED, m.partition(), m.offset(), m.key(), m.value()) for m in out.on(t.VERIFIED)]
        if freeze:
            freeze_startup_heap("bench_worker: monitor stage")
        monitor_cpu = run_stage(monitor, verified, batch, loop)
        if prof:
            prof.disable()
    loop.close()
    inside_monitor = timed.total() - inside_verify if timed else 0.0
    lines = sum(len(monitor.codec.decode(m.value)[1]["lines"]) for m in verified)
    n, v = len(received), len(verified)
    report = [f"{n} received orders, {v} verified ({lines} lines), batches of {batch}, "
              f"compiled modules: {native.MODE} (CSOS_PURE_PYTHON=1: source)",
              f"verify stage : {verify_cpu / n * 1e6:8.1f} us per received order",
              f"monitor stage: {monitor_cpu / v * 1e6:8.1f} us per verified order",
              f"both stages  : {(verify_cpu + monitor_cpu) / v * 1e6:8.1f} us per verified order, "
              f"{(verify_cpu + monitor_cpu) / lines * 1e6:.1f} us per line "
              f"({lines / (verify_cpu + monitor_cpu):,.0f} lines per CPU-second)"]
    if timed is not None:
        inside = ", ".join(f"{k} {s / v * 1e6:.0f}" for k, s in sorted(timed.seconds.items()))
        report.append(f"inside another area's code, us per verified order: {inside}; outside them "
                      f"{(verify_cpu - inside_verify + monitor_cpu - inside_monitor) / v * 1e6:.1f}")
    if digest:
        report.append(f"output digest: {output_digest(out, verify_table, monitor_table)}")
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(120)
        report.append(buf.getvalue())
    return "\n".join(report)


def output_digest(out: MemoryPublisher, *tables: dict[bytes, bytes]) -> str:
    """SHA-256 over every published message (topic, key, value, in order) and every table's final bytes."""
    h = hashlib.sha256()
    for m in out.messages:
        for part in (m.topic().encode(), m.key() or b"-", m.value()):
            h.update(len(part).to_bytes(8, "big") + part)
    for table in tables:
        for key in sorted(table):
            h.update(len(key).to_bytes(8, "big") + key + len(table[key]).to_bytes(8, "big") + table[key])
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m streams.tools.bench_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registrants", type=int, default=40)
    parser.add_argument("--days", type=int, default=120)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=500, help="messages per batch (the worker: up to CSOS_BATCH_SIZE)")
    parser.add_argument("--dir", type=Path, default=Path("var/bench-worker"))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--digest", action="store_true")
    parser.add_argument("--setup-only", action="store_true",
                        help="load the feed and build the processors, decide nothing (the baseline of an "
                             "instruction count: valgrind --tool=callgrind, a run minus this one)")
    parser.add_argument("--freeze", action="store_true",
                        help="before each stage, collect and freeze the heap (gc.freeze), as each agent does "
                             "once started (streams.pipeline.heap): here the heap also holds the feed, the "
                             "verified messages and every output, which a worker does not keep, and whose "
                             "walk by full collections otherwise counts in the stage's CPU")
    parser.add_argument("--split", action="store_true",
                        help="time the verifier's and the monitor's calls apart (adds ~15 us per call: two "
                             "process-CPU clock reads)")
    args = parser.parse_args(argv)
    print(run(args.dir.resolve(), registrants=args.registrants, days=args.days, seed=args.seed, batch=args.batch,
              profile=args.profile, digest=args.digest, split=args.split,
              setup_only=args.setup_only, freeze=args.freeze))


if __name__ == "__main__":
    main()
