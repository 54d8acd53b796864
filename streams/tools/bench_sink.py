"""What the ClickHouse sink costs per order line: its decode -> rows -> insert path, without a broker.

Not a test. ``csos bench`` measures the sink inside a whole pipeline, where
its CPU share is mixed with waiting for the broker. This drives exactly the
sink process's work (``SinkService.decode`` then ``SinkService.write``) on
the messages a real run produces, so a change to the sink shows in one number:
order lines per sink CPU-second (issue 14 asks for at least 20,000).

The messages are made as ``streams.tools.demo_core`` makes them: a simulated,
signed feed through the verify and monitor processors in process, every
message they publish kept as the Avro bytes Kafka would carry (received
orders, verified orders, verdicts and holds/releases, rejections, pending
orders, audit events, dead letters). The sink's topics are interleaved
evenly, as a consumer reading all of them sees them, and cut into batches of
``CSOS_SINK_BATCH_SIZE`` messages. Each batch goes through ``SinkService.handle_batch``
(skip what is stored, decode, map, insert; ``decode`` then ``write`` on builds
without it). CPU is ``time.process_time`` of this process, which includes the
embedded engine's threads, as the sink process's CPU does.
"""
from __future__ import annotations

import cProfile
import io
import pickle
import pstats
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from connectors.kafka import catalogue as t
from connectors.kafka.emit import Emitter
from streams.core.config import Settings
from connectors.kafka.testing import MemoryMessage, MemoryPublisher
from streams.tools.demo_core import END

#: Partitions the messages are spread over (by key), as the catalogue's topics have several.
PARTITIONS = 3


def pipeline_messages(data_dir: Path, *, registrants: int, days: int, seed: int,
                      end: datetime = END) -> list[tuple[str, bytes | None, bytes]]:
    """(topic, key, value) of every message a run publishes on the sink's topics, in publication order."""
    from streams.tools.demo_core import decide_feed

    _feed, received, out = decide_feed(data_dir, seed=seed, registrants=registrants, days=days, end=end)
    sunk = t.sunk_topics()
    return [(m.topic(), m.key(), m.value()) for m in received.messages + out.messages if m.topic() in sunk]


def interleave(messages: list[tuple[str, bytes | None, bytes]]) -> list[MemoryMessage]:
    """Kafka messages (partition by key, offsets per partition), each topic spread evenly over the sequence."""
    per_topic: dict[str, list[tuple[bytes | None, bytes]]] = {}
    for topic, key, value in messages:
        per_topic.setdefault(topic, []).append((key, value))
    placed: list[tuple[float, MemoryMessage]] = []
    offsets: dict[tuple[str, int], int] = {}
    for topic, items in per_topic.items():
        for i, (key, value) in enumerate(items):
            partition = hash(key) % PARTITIONS if key else 0
            offset = offsets.get((topic, partition), 0)
            offsets[(topic, partition)] = offset + 1
            placed.append(((i + 0.5) / len(items), MemoryMessage(topic, partition, offset, key, value)))
    placed.sort(key=lambda p: p[0])
    return [m for _, m in placed]


@dataclass
class SinkBench:
    messages: int
    lines: int
    batches: int
    batch_size: int
    cpu_seconds: float
    wall_seconds: float
    rows: dict[str, int] = field(default_factory=dict)
    profile: str = ""

    @property
    def lines_per_cpu_second(self) -> float:
        return self.lines / self.cpu_seconds

    def render(self) -> str:
        out = [f"{self.messages:,} messages ({self.lines:,} order lines) in {self.batches} batches of up to "
               f"{self.batch_size:,}",
               f"sink CPU: {self.cpu_seconds:.2f}s, wall {self.wall_seconds:.2f}s",
               f"= {self.lines_per_cpu_second:,.0f} order lines per sink CPU-second "
               f"({self.messages / self.cpu_seconds:,.0f} messages per CPU-second)",
               "rows: " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.rows.items()))]
        if self.profile:
            out += ["", self.profile]
        return "\n".join(out)


def offline_service(settings: Settings) -> Any:
    """A ``SinkService`` whose ``decode`` and ``write`` run as in the sink process, without a broker: dead letters
    go to memory. Built field by field (as the sink's unit tests do) so that the same benchmark runs against
    earlier versions of the sink too (a before/after comparison on the same messages)."""
    import threading

    from connectors.clickhouse.client import apply_ddl, open_client
    from connectors.clickhouse.sink import ClickHouseSink
    from streams.core.avro_codec import default_codec
    from streams.pipeline.sink_service import SinkService

    client = open_client(settings)
    apply_ddl(client)
    service = object.__new__(SinkService)
    service.settings, service.codec, service.dead_lettered, service.batches = settings, default_codec(), 0, 0
    service.lock, service.stopping = threading.Lock(), threading.Event()
    service.emitter = Emitter(MemoryPublisher(), "clickhouse-sink")  # type: ignore[arg-type]
    service.sink = ClickHouseSink(client)
    return service


def measure(messages: list[MemoryMessage], store: Path, *, batch_size: int, profile: bool = False) -> SinkBench:
    """Feed ``messages`` through a fresh sink on an embedded engine at ``store``; time its CPU."""
    from streams.core.avro_codec import default_codec

    shutil.rmtree(store, ignore_errors=True)
    service = offline_service(Settings().with_(data_dir=store, clickhouse_url=f"chdb://{store / 'clickhouse'}"))
    codec = default_codec()
    # Warm-up, not timed: imports, the engine's first queries, caches (a running sink is past them).
    warm = len(messages) // 20
    handle = getattr(service, "handle_batch", None) or (lambda batch: service.write(service.decode(batch)))
    handle(messages[:warm])
    messages = messages[warm:]
    lines = sum(len(codec.decode(m.value())[1]["lines"]) for m in messages if m.topic() == t.VERIFIED)
    batches = [messages[i:i + batch_size] for i in range(0, len(messages), batch_size)]
    profiler = cProfile.Profile() if profile else None
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    for batch in batches:
        handle(batch)
    if profiler:
        profiler.disable()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    rows = dict(service.sink.rows_written)
    service.sink.client.close()
    text = ""
    if profiler:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
        text = buf.getvalue()
    return SinkBench(len(messages), lines, len(batches), batch_size, cpu, wall, rows, text)


def run(*, registrants: int = 40, days: int = 120, seed: int = 3, batch_size: int | None = None,
        profile: bool = False, messages_file: Path | None = None) -> SinkBench:
    """Generate the messages (not timed; or load them from ``messages_file``, saved there if absent), then
    measure the sink on them."""
    batch_size = batch_size or Settings.from_env().sink_batch_size
    with tempfile.TemporaryDirectory(prefix="csos-bench-sink-") as tmp:
        if messages_file is not None and messages_file.exists():
            raw = pickle.loads(messages_file.read_bytes())
        else:
            raw = pipeline_messages(Path(tmp) / "feed", registrants=registrants, days=days, seed=seed)
            if messages_file is not None:
                messages_file.write_bytes(pickle.dumps(raw))
        return measure(interleave(raw), Path(tmp) / "store", batch_size=batch_size, profile=profile)
