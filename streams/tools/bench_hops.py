"""Where received -> verdict latency goes, hop by hop, from the records' own timestamps.

Not a test: ``csos bench`` prints it beside the end-to-end percentiles. Four
clocks are on the records, all on this machine:

* the received order's Kafka timestamp (``LogAppendTime``: the broker's append);
* the verified order's ``verified_at`` (the verify agent's clock when it decided the order);
* the verified order's Kafka timestamp (``CreateTime``: when the verify agent handed it to its
  producer, after the batch's state was on the broker);
* the verdict's ``decided_at`` (the monitor's clock when it decided) and its Kafka ``CreateTime``
  (when the monitor handed it to its producer, after its state write).

So the hops are: the verify agent's fetch and queue (append -> verified_at), its state write
(verified_at -> verified produced), delivery of the verified order plus the monitor's fetch and queue
(verified produced -> decided_at), and the monitor's state write (decided_at -> verdict produced).
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable

from connectors.kafka import catalogue as t
from connectors.kafka.io import consume_all
from streams.core.avro_codec import default_codec

#: The hops, in order, as printed.
HOPS = ("verify fetch+queue", "verify state write", "deliver+monitor fetch+queue", "monitor state write")


def _ms(value: Any) -> float:
    return value.timestamp() * 1000.0 if isinstance(value, datetime) else float(value)


def hop_times(received: Iterable[Any], verified: Iterable[Any], verdicts: Iterable[Any],
              order_ids: set[str]) -> dict[str, list[float]]:
    """Per hop, the milliseconds each order of ``order_ids`` spent in it (orders seen on all three topics).

    The arguments are confluent-kafka messages of the received, verified and verdict topics.
    """
    codec = default_codec()

    def by_order(messages: Iterable[Any]) -> dict[str, tuple[float, dict[str, Any]]]:
        out: dict[str, tuple[float, dict[str, Any]]] = {}
        for m in messages:
            try:
                record = codec.decode(m.value())[1]
            except Exception:  # noqa: BLE001 - the feed's malformed orders
                continue
            oid = record.get("order_id")
            if oid in order_ids and oid not in out:  # the first one: a redelivered duplicate is not the latency
                out[oid] = (float(m.timestamp()[1]), record)
        return out

    rec, ver, dec = by_order(received), by_order(verified), by_order(verdicts)
    hops: dict[str, list[float]] = {name: [] for name in HOPS}
    for oid, (appended, _) in rec.items():
        if oid not in ver or oid not in dec:
            continue
        produced_v, v = ver[oid]
        produced_d, d = dec[oid]
        marks = (appended, _ms(v["verified_at"]), produced_v, _ms(d["decided_at"]), produced_d)
        for name, a, b in zip(HOPS, marks, marks[1:]):
            hops[name].append(b - a)
    return hops


def read_hops(bootstrap: str, order_ids: set[str] | None = None) -> dict[str, list[float]]:
    """Read the three topics (the pipeline is done) from ``bootstrap`` and split each order's latency into hops.

    ``order_ids``: the timed orders; by default every order but the first 5 % received (the bench's warm-up).
    """
    received = consume_all(bootstrap, [t.RECEIVED])
    if order_ids is None:
        codec = default_codec()
        ids = []
        for m in sorted(received, key=lambda m: m.timestamp()[1]):
            try:
                ids.append(codec.decode(m.value())[1]["order_id"])
            except Exception:  # noqa: BLE001 - the feed's malformed orders
                continue
        order_ids = set(ids[len(ids) // 20:])
    return hop_times(received, consume_all(bootstrap, [t.VERIFIED]), consume_all(bootstrap, [t.VERDICTS]), order_ids)


def main() -> None:
    """``python -m streams.tools.bench_hops DATA_DIR PORT``: the hops of a finished bench run, its broker restarted."""
    import sys
    from pathlib import Path

    from streams.tools.broker import LocalBroker

    data_dir, port = Path(sys.argv[1]), int(sys.argv[2])
    with LocalBroker(port=port, data_dir=data_dir / "kafka") as broker:
        print(render_hops(read_hops(broker.bootstrap)))


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def render_hops(hops: dict[str, list[float]]) -> str:
    """One line per hop: p50 / p95 / p99 in ms."""
    return "\n".join(f"  {name}: p50 {_pct(xs, 50):,.0f} ms, p95 {_pct(xs, 95):,.0f} ms, p99 {_pct(xs, 99):,.0f} ms"
                     for name, xs in hops.items())


if __name__ == "__main__":
    main()
