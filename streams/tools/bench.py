"""End-to-end benchmark: simulated orders through a running worker on the local broker.

Not a test: it prints figures. Throughput is order lines per second from the
first produce to the last outcome visible in ClickHouse; latency is from the
moment an order reached the received topic (its Kafka timestamp) to the
monitor's decision (verdict ``decided_at``) or the verifier's rejection.
Certificate issuance and signing happen before the clock starts: they are the
purchasers' cost, not the distributor's.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

import click

from streams.tools.broker import LocalBroker
from streams.tools.feed import prepare_feed, publish, publish_reference_data, replay_settings
from connectors.kafka.io import Publisher, consume_all
from connectors.kafka.topics import ensure_topics

from connectors.kafka import catalogue as t
from streams.core.avro_codec import default_codec
from streams.core.config import Settings
from connectors.clickhouse.query import run_query
from streams.tools.processes import Pipeline


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc), to normalise for a shared machine."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class BenchResult:
    orders: int
    lines: int
    publish_seconds: float
    end_to_end_seconds: float
    latencies_ms: list[float]
    worker_cpu_seconds: float = float("nan")
    sink_cpu_seconds: float = float("nan")

    def pct(self, p: float) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")

    def render(self) -> str:
        return "\n".join([
            f"orders: {self.orders}   order lines: {self.lines}",
            f"produce: {self.publish_seconds:.2f}s ({self.orders / self.publish_seconds:,.0f} orders/s)",
            f"end to end (first produce -> last outcome in ClickHouse): {self.end_to_end_seconds:.2f}s",
            f"throughput: {self.lines / self.end_to_end_seconds:,.0f} order lines/s, "
            f"{self.orders / self.end_to_end_seconds:,.0f} orders/s (one worker process, one sink process)",
            f"received -> verdict latency: p50 {self.pct(50):,.0f} ms, p95 {self.pct(95):,.0f} ms, "
            f"p99 {self.pct(99):,.0f} ms (n={len(self.latencies_ms)})",
            f"worker CPU: {self.worker_cpu_seconds:.1f}s = {self.lines / self.worker_cpu_seconds:,.0f} order lines "
            f"per worker CPU-second ({self.worker_cpu_seconds / self.end_to_end_seconds:.0%} of a core busy)",
            f"sink CPU: {self.sink_cpu_seconds:.1f}s = {self.lines / self.sink_cpu_seconds:,.0f} order lines "
            f"per sink CPU-second",
        ])


def _count_decided(settings: Settings) -> int:
    return int(run_query(settings, "SELECT (SELECT count() FROM rejections) + (SELECT count() FROM verdicts)"
                                   " + (SELECT count() FROM dead_letters WHERE stage = 'verify')")[1][0][0])


def paced_publish(messages: list, publisher: Publisher, rate: float) -> None:
    """Publish at ``rate`` orders/s (in 20 ms slices), so latency is measured below saturation."""
    slice_s = 0.02
    per_slice = max(1, int(rate * slice_s))
    start = time.monotonic()
    for i in range(0, len(messages), per_slice):
        due = start + (i // per_slice) * slice_s
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        publish(messages[i:i + per_slice], publisher)


def run_bench(settings: Settings, *, registrants: int, days: int, seed: int, rate: float | None = None,
              timeout: float = 1800) -> BenchResult:
    echo = click.echo
    for sub in ("kafka", "clickhouse", "pki", "faust"):
        shutil.rmtree(settings.data_dir / sub, ignore_errors=True)
    port = int(settings.kafka_bootstrap.rsplit(":", 1)[1])
    broker = LocalBroker(port=port, data_dir=settings.data_dir / "kafka")
    broker.start()
    pipeline = Pipeline(settings)
    try:
        ensure_topics(broker.bootstrap, settings.partitions)
        echo("preparing and signing the feed (not timed) ...")
        feed = prepare_feed(settings, registrants=registrants, seed=seed, days=days)
        settings = replay_settings(settings, feed)
        pipeline = Pipeline(settings)
        publish_reference_data(settings, Publisher(broker.bootstrap))
        pipeline.start()
        # Warm-up (not timed): the consumer group forms, partitions are assigned,
        # certificate paths are validated and cached, ClickHouse tables are touched.
        n_warm = max(1, len(feed.messages) // 20)
        warm, timed = feed.messages[:n_warm], feed.messages[n_warm:]
        publisher = Publisher(broker.bootstrap)
        publish(warm, publisher)
        deadline = time.monotonic() + 300
        while _count_decided(settings) < n_warm and time.monotonic() < deadline:
            time.sleep(0.2)
        total = len(timed)
        lines = sum(len(m.sim.order.lines) for m in timed if not m.malformed)
        echo(f"warmed up with {n_warm} orders; streaming {total} orders ({lines} lines) ...")
        cpu0 = cpu_seconds(pipeline.worker.proc.pid), cpu_seconds(pipeline.sink.proc.pid)
        t0 = time.monotonic()
        if rate:
            paced_publish(timed, publisher, rate)
        else:
            publish(timed, publisher)
        t_pub = time.monotonic() - t0
        total_all = n_warm + total
        with click.progressbar(length=total, label="decided", show_pos=True) as bar:
            done = 0
            deadline = time.monotonic() + timeout
            while done < total and time.monotonic() < deadline:
                now_done = _count_decided(settings) - n_warm
                bar.update(now_done - done)
                done = now_done
                if done < total:
                    time.sleep(0.2)
        elapsed = time.monotonic() - t0
        cpu1 = cpu_seconds(pipeline.worker.proc.pid), cpu_seconds(pipeline.sink.proc.pid)
        echo(f"worker counts: {pipeline.worker.health()}")
        if done < total:
            raise click.ClickException(f"only {done} of {total} orders decided within {timeout:.0f}s")
        # Latency: Kafka timestamp of the received message -> decision time.
        codec = default_codec()
        received_ts = {}
        timed_ids = {m.sim.sim_id for m in timed}
        for m in consume_all(broker.bootstrap, [t.RECEIVED], until=lambda ms: len(ms) >= total_all):
            try:
                received_ts[codec.decode(m.value())[1]["order_id"]] = m.timestamp()[1] / 1000.0
            except Exception:  # noqa: BLE001 - the malformed ones in the feed
                continue
        decided = run_query(settings, "SELECT order_id, toUnixTimestamp64Milli(decided_at) FROM verdicts "
                                      "UNION ALL SELECT order_id, toUnixTimestamp64Milli(rejected_at) FROM rejections")[1]
        lat = [int(ms) - received_ts[oid] * 1000.0 for oid, ms in decided if oid in received_ts and oid in timed_ids]
        return BenchResult(total, lines, t_pub, elapsed, lat, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])
    finally:
        pipeline.stop()
        broker.stop()
