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
from pathlib import Path
from typing import Callable

import click

from streams.tools.broker import LocalBroker, free_port
from streams.tools.feed import prepare_feed, publish, publish_reference_data, replay_settings
from connectors.kafka.io import Publisher, consume_all
from connectors.kafka.topics import ensure_topics

from connectors.kafka import catalogue as t
from streams.core.avro_codec import default_codec
from streams.core.config import Settings
from connectors.clickhouse.query import run_query
from streams.tools.bench_hops import read_hops, render_hops
from streams.tools.processes import Pipeline, worker_process


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
    broker_cpu_seconds: float = float("nan")
    bench_cpu_seconds: float = float("nan")
    bare: "BareResult | None" = None
    workers: int = 1
    runtime: str = "faust"  # the workers' CSOS_RUNTIME
    hops: dict[str, list[float]] | None = None  # streams.tools.bench_hops: where each order's latency went
    #: Each worker process's CPU-seconds (one entry per worker), for the scale-out capacity.
    worker_cpu_each: list[float] | None = None

    def pct(self, p: float) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")

    @property
    def lines_per_worker_cpu(self) -> float:
        return self.lines / self.worker_cpu_seconds

    @property
    def capacity(self) -> float:
        """Order lines per second the workers would do if each had a core of its own: lines / the busiest's CPU.

        The scale-out figure. On a machine whose two cores also run the
        broker, the sink and the producer, wall time cannot show what a
        second worker adds, and the summed CPU (``lines_per_worker_cpu``)
        only shows what a second worker costs. A group of workers that each
        had their own core would be done when the busiest one is, so its rate
        is the lines over that worker's CPU-seconds: an uneven split of the
        partitions counts against it, and for one worker it is
        ``lines_per_worker_cpu``.
        """
        each = self.worker_cpu_each or [self.worker_cpu_seconds]
        return self.lines / max(each)

    def render(self) -> str:
        wall = self.end_to_end_seconds
        out = [
            f"orders: {self.orders}   order lines: {self.lines}",
            f"produce: {self.publish_seconds:.2f}s ({self.orders / self.publish_seconds:,.0f} orders/s)",
            f"end to end (first produce -> last outcome in ClickHouse): {wall:.2f}s",
            f"throughput: {self.lines / wall:,.0f} order lines/s, "
            f"{self.orders / wall:,.0f} orders/s ({self.workers} worker process(es) on the {self.runtime} runtime, one "
            f"sink process)",
            f"received -> verdict latency: p50 {self.pct(50):,.0f} ms, p95 {self.pct(95):,.0f} ms, "
            f"p99 {self.pct(99):,.0f} ms (n={len(self.latencies_ms)})",
            *([f"per hop (released or held orders):\n{render_hops(self.hops)}"] if self.hops else []),
            f"worker CPU (all workers): {self.worker_cpu_seconds:.1f}s = {self.lines_per_worker_cpu:,.0f} order lines "
            f"per worker CPU-second ({self.worker_cpu_seconds / wall:.0%} of a core busy)",
            *([f"each worker's CPU: {', '.join(f'{c:.1f}s' for c in self.worker_cpu_each)}; scale-out capacity (each "
               f"worker on a core of its own, lines / the busiest worker's CPU-seconds): {self.capacity:,.0f} order "
               f"lines per second"] if self.worker_cpu_each and len(self.worker_cpu_each) > 1 else []),
            f"sink CPU: {self.sink_cpu_seconds:.1f}s = {self.lines / self.sink_cpu_seconds:,.0f} order lines "
            f"per sink CPU-second",
            "where the cores went (CPU-seconds, share of the run's wall time): "
            + ", ".join(f"{name} {cpu:.1f}s ({cpu / wall:.0%})" for name, cpu in (
                ("worker", self.worker_cpu_seconds), ("sink", self.sink_cpu_seconds),
                ("broker", self.broker_cpu_seconds), ("producer + bench", self.bench_cpu_seconds))),
        ]
        if self.bare is not None:
            b = self.bare
            out += [
                f"kafka runtime alone (CSOS_RUNTIME=kafka: same processors, tables and batch order, no Faust): "
                f"{b.lines} lines in "
                f"{b.seconds:.2f}s = {b.lines / b.seconds:,.0f} lines/s; CPU {b.cpu_seconds:.1f}s = "
                f"{b.lines_per_cpu:,.0f} order lines per CPU-second",
                f"this run's worker / kafka runtime alone, order lines per CPU-second: "
                f"{self.lines_per_worker_cpu / b.lines_per_cpu:.2f}",
            ]
        return "\n".join(out)


@dataclass
class BareResult:
    """The worker on the confluent-kafka runtime, alone (no sink), on the same feed (``run_bare``)."""

    lines: int
    seconds: float
    cpu_seconds: float

    @property
    def lines_per_cpu(self) -> float:
        return self.lines / self.cpu_seconds


def scale_out_summary(one: BenchResult, many: BenchResult) -> str:
    """The scale-out of one run: N workers against one on the same feed, as the ratios the issue asks for."""
    return (f"scale-out, {many.workers} workers against one: capacity {many.capacity:,.0f} against "
            f"{one.capacity:,.0f} order lines per second = {many.capacity / one.capacity:.2f}x (each worker on a core "
            f"of its own: lines / the busiest worker's CPU-seconds); summed worker CPU per line "
            f"{many.lines_per_worker_cpu:,.0f} against {one.lines_per_worker_cpu:,.0f} lines per CPU-second = "
            f"{many.lines_per_worker_cpu / one.lines_per_worker_cpu:.2f} (what the extra worker costs)")


def _count_decided(settings: Settings) -> int:
    return int(run_query(settings, "SELECT (SELECT count() FROM rejections) + (SELECT count() FROM verdicts)"
                                   " + (SELECT count() FROM dead_letters WHERE stage = 'verify')")[1][0][0])


def paced_publish(messages: list, publisher: Publisher, rate: float) -> None:
    """Publish at ``rate`` orders/s, so latency is measured below saturation.

    Message ``i`` is due ``i / rate`` seconds after the start and goes out
    then, with any others already due (the loop wakes at least every 20 ms).
    (It used to send at least one per 20 ms slice, so any rate below 50/s ran
    at 50/s.)
    """
    slice_s = 0.02
    start = time.monotonic()
    sent = 0
    while sent < len(messages):
        due = min(len(messages), int((time.monotonic() - start) * rate) + 1)
        if due > sent:
            publish(messages[sent:due], publisher)
            sent = due
        time.sleep(max(0.0, min(slice_s, start + sent / rate - time.monotonic())))


def _fresh_broker(settings: Settings) -> LocalBroker:
    """A new, empty broker on KAFKA_BOOTSTRAP's port with the catalogue's topics."""
    shutil.rmtree(settings.data_dir / "kafka", ignore_errors=True)
    port = int(settings.kafka_bootstrap.rsplit(":", 1)[1])
    broker = LocalBroker(port=port, data_dir=settings.data_dir / "kafka")
    broker.start()
    ensure_topics(broker.bootstrap, settings.partitions)
    return broker


def _broker_pid(settings: Settings) -> int | None:
    try:
        return int((settings.data_dir / "kafka" / "kafka.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _wait_decided(count: Callable[[], int], total: int, timeout: float, label: str) -> None:
    with click.progressbar(length=total, label=label, show_pos=True) as bar:
        done = 0
        deadline = time.monotonic() + timeout
        while done < total and time.monotonic() < deadline:
            now_done = count()
            bar.update(now_done - done)
            done = now_done
            if done < total:
                time.sleep(0.2)
    if done < total:
        raise click.ClickException(f"only {done} of {total} orders decided within {timeout:.0f}s")


#: A paced run first streams this long at its rate, untimed. Why: right after the load stepped up from idle (the
#: warm-up sent at once, then a wait), the first ~2 s of a paced feed held most of its orders over 100 ms on
#: this machine (p99 123-156 ms, against 66-90 ms after this warm-up; BENCHMARKS.md, issue 14, third round).
PACED_WARM_UP_SECONDS = 3.0


def split_warm_up(messages: list, at_least: int = 0) -> tuple[list, list]:
    """(warm-up, timed): the feed's first twentieth (or ``at_least`` orders), then the first order of every
    signing certificate not in it.

    Why every certificate: a certificate's first order makes the verifier build and validate its path
    (RFC 5280) and judge its revocation, once per certificate per worker, cached after: in process,
    3.4 ms (median of 402 certificates) against 0.5 ms for a later order of the same certificate. A
    running worker pays it once per certificate, so the timed feed measures orders of known
    certificates (in a 300-registrant feed of 10,000 orders, one order in 25 was a certificate's
    first). Each certificate's orders keep their order; a message whose signature cannot be read has
    no certificate to learn and stays where it is.
    """
    n_warm = min(len(messages) // 2, max(1, len(messages) // 20, at_least))
    warm, rest = list(messages[:n_warm]), messages[n_warm:]
    seen = {_signer(m) for m in warm}
    timed = []
    for m in rest:
        signer = _signer(m)
        if signer is None or signer in seen:
            timed.append(m)
        else:
            seen.add(signer)
            warm.append(m)
    return warm, timed


def _signer(message: object) -> bytes | None:
    """The signing certificate of a feed message (its DER), None when its signature cannot be read."""
    from streams.domain.cms import parse_signed_data

    try:
        signed = parse_signed_data(bytes(message.signature), message.document)  # type: ignore[attr-defined]
        return signed.signer_cert_der
    except Exception:  # noqa: BLE001 - the feed's malformed and hostile orders
        return None


def _timed_stream(warm: list, timed: list, publisher: Publisher, rate: float | None, decided: Callable[[], int],
                  pids: dict[str, int | None], timeout: float) -> tuple[float, float, dict[str, float]]:
    """Warm up (not timed), then stream ``timed`` until every order is decided.

    Returns (publish seconds, end-to-end seconds, CPU-seconds used per named process; "bench" is this one).
    """
    if rate:  # at the timed feed's pace (``PACED_WARM_UP_SECONDS``)
        paced_publish(warm, publisher, rate)
    else:
        publish(warm, publisher)
    deadline = time.monotonic() + 300
    while decided() < len(warm) and time.monotonic() < deadline:
        time.sleep(0.2)

    def cpu() -> dict[str, float]:
        out = {name: cpu_seconds(pid) if pid else float("nan") for name, pid in pids.items()}
        out["bench"] = time.process_time()
        return out

    cpu0 = cpu()
    t0 = time.monotonic()
    if rate:
        paced_publish(timed, publisher, rate)
    else:
        publish(timed, publisher)
    t_pub = time.monotonic() - t0
    n_warm = len(warm)
    _wait_decided(lambda: decided() - n_warm, len(timed), timeout, "decided")
    elapsed = time.monotonic() - t0
    cpu1 = cpu()
    return t_pub, elapsed, {name: cpu1[name] - cpu0[name] for name in cpu1}


def run_bench(settings: Settings, *, registrants: int, days: int, seed: int, rate: float | None = None,
              timeout: float = 1800, compare_bare: bool = False, workers: int = 1,
              latency_csv: Path | None = None) -> BenchResult:
    """``workers``: worker processes in the group (their CPU-seconds are summed: lines per worker CPU-second
    compares scale-out on a machine whose cores are shared)."""
    echo = click.echo
    extra_workers: list = []
    for sub in ("kafka", "clickhouse", "pki", "faust"):
        shutil.rmtree(settings.data_dir / sub, ignore_errors=True)
    broker = _fresh_broker(settings)
    pipeline = Pipeline(settings)
    try:
        echo("preparing and signing the feed (not timed) ...")
        feed = prepare_feed(settings, registrants=registrants, seed=seed, days=days)
        settings = replay_settings(settings, feed)
        pipeline = Pipeline(settings)
        publish_reference_data(settings, Publisher(broker.bootstrap))
        pipeline.start()
        for i in range(1, workers):  # more workers in the same group: each its own port and member id
            extra = worker_process(settings.with_(web_port=free_port(), worker_id=f"bench-worker-{i + 1}"))
            extra.log_path = settings.data_dir / f"worker-{i + 1}.log"
            extra.start()
            extra_workers.append(extra)
        # Warm-up (not timed): the consumer group forms, partitions are assigned,
        # certificate paths are validated and cached, ClickHouse tables are touched.
        warm, timed = split_warm_up(feed.messages, int(PACED_WARM_UP_SECONDS * rate) if rate else 0)
        n_warm = len(warm)
        total = len(timed)
        lines = sum(len(m.sim.order.lines) for m in timed if not m.malformed)
        echo(f"streaming {total} orders ({lines} lines) after {n_warm} warm-up orders ...")
        pids = {"worker": pipeline.worker.proc.pid, "sink": pipeline.sink.proc.pid, "broker": _broker_pid(settings),
                **{f"worker-{i + 2}": w.proc.pid for i, w in enumerate(extra_workers)}}
        t_pub, elapsed, used = _timed_stream(warm, timed, Publisher(broker.bootstrap), rate,
                                             lambda: _count_decided(settings), pids, timeout)
        each = [cpu for name, cpu in used.items() if name.startswith("worker")]
        used["worker"] = sum(each)
        echo(f"worker counts: {pipeline.worker.health()}")
        # Latency: Kafka timestamp of the received message -> decision time.
        codec = default_codec()
        received_ts = {}
        timed_ids = {m.sim.sim_id for m in timed}
        for m in consume_all(broker.bootstrap, [t.RECEIVED], until=lambda ms: len(ms) >= n_warm + total):
            try:
                received_ts[codec.decode(m.value())[1]["order_id"]] = m.timestamp()[1] / 1000.0
            except Exception:  # noqa: BLE001 - the malformed ones in the feed
                continue
        decided = run_query(settings, "SELECT order_id, toUnixTimestamp64Milli(decided_at) FROM verdicts "
                                      "UNION ALL SELECT order_id, toUnixTimestamp64Milli(rejected_at) FROM rejections")[1]
        # Each timed order: when the broker took it in, and how long to its decision (ms).
        timed_latency = [(received_ts[oid], int(ms) - received_ts[oid] * 1000.0) for oid, ms in decided
                         if oid in received_ts and oid in timed_ids]
        lat = [ms for _, ms in timed_latency]
        if latency_csv is not None:
            with open(latency_csv, "w", encoding="utf-8") as fh:
                fh.write("received_unix_s,latency_ms\n")
                fh.writelines(f"{at:.3f},{ms:.1f}\n" for at, ms in sorted(timed_latency))
        result = BenchResult(total, lines, t_pub, elapsed, lat, used["worker"], used["sink"], used["broker"],
                             used["bench"], workers=workers, runtime=settings.runtime,
                             hops=read_hops(broker.bootstrap, timed_ids),
                             worker_cpu_each=each)
        if compare_bare:
            pipeline.stop()
            broker.stop()
            echo("the same feed through the bare confluent-kafka loop (fresh broker) ...")
            broker = _fresh_broker(settings)
            result.bare = run_bare(settings, broker, warm, timed, lines, timeout)
        return result
    finally:
        for w in extra_workers:
            w.stop()
        pipeline.stop()
        broker.stop()


def run_bare(settings: Settings, broker: LocalBroker, warm: list, timed: list, lines: int,
             timeout: float) -> BareResult:
    """The timed part of the feed through a worker on the confluent-kafka runtime, alone (no sink), as the
    worker had it: the same processors, tables and batch order without Faust (``streams.pipeline.kafka_worker``)."""
    publish_reference_data(settings, Publisher(broker.bootstrap))
    bare = settings.with_(runtime="kafka", web_port=free_port(), data_dir=settings.data_dir / "bare",
                          worker_id="bench-bare")
    proc = worker_process(bare)

    def decided() -> int:
        if proc.proc is not None and proc.proc.poll() is not None:
            raise click.ClickException(f"the kafka-runtime worker exited with {proc.proc.returncode}; "
                                       f"see {proc.log_path}")
        counts = (proc.health() or {}).get("counts") or {}
        v, m = counts.get("verify", {}), counts.get("monitor", {})
        return v.get("rejected", 0) + v.get("dead_lettered", 0) + m.get("released", 0) + m.get("held", 0)
    proc.start()
    try:
        _, elapsed, used = _timed_stream(warm, timed, Publisher(broker.bootstrap), None, decided,
                                         {"bare": proc.proc.pid if proc.proc else None}, timeout)
        return BareResult(lines, elapsed, used["bare"])
    finally:
        proc.stop()
