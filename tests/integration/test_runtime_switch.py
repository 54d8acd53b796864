"""A worker group moves from the Faust runtime to the confluent-kafka one and every outcome is as if it had not.

Both runtimes keep their state in the same changelog topics and commit in
the same consumer group (``streams.pipeline.kafka_worker``). Here a Faust
worker decides the first part of a feed and stops; a kafka-runtime worker
under the same member id takes the rest. Were the registrants' baselines,
the verify agent's replay and dedup records or the open cases not carried
over, the second part would be judged without them: orders held against a
new-customer ceiling instead of their history, or released past an open case.
``streams.tools.chaos.check_outcomes`` compares every order with the feed and
with the monitor replayed offline over the verified orders (an unbroken run):
one outcome each, the same holds, ClickHouse equal to the topics, the audit
chain intact. Its own broker, as the crash tests: a second group on the
session broker would re-decide the session's orders.
"""
from __future__ import annotations

import uuid
from pathlib import Path

from connectors.kafka.io import Publisher
from streams.core.config import Settings
from streams.tools.broker import free_port
from streams.tools.chaos import check_outcomes, problems, render, wait_decided, wait_sink_caught_up, worker_settings
from streams.tools.feed import prepare_feed, publish, publish_reference_data, replay_settings
from streams.tools.processes import sink_process, worker_process
from tests.conftest import running_broker


def test_faust_then_kafka_runtime_changes_no_outcome(tmp_path_factory) -> None:
    data = Path(tmp_path_factory.mktemp("switch"))
    with running_broker(data / "kafka") as broker:
        settings = Settings.from_env().with_(
            kafka_bootstrap=broker.bootstrap, data_dir=data, pki_dir=data / "pki", clickhouse_url="",
            web_port=free_port(), sink_port=free_port(), app_id=f"csos-switch-{uuid.uuid4().hex[:6]}")
        feed = prepare_feed(settings, registrants=24, seed=37, days=150, bad_counts={"tampered": 3},
                            suspicious_counts={"size_spike": 8, "frequency_burst": 6, "family_shift": 3})
        settings = replay_settings(settings, feed)
        publish_reference_data(settings, Publisher(settings.kafka_bootstrap))
        one = worker_settings(settings, "a")
        sink = sink_process(settings)
        faust = worker_process(one.with_(runtime="faust"))
        kafka = worker_process(one.with_(runtime="kafka"))
        kafka.log_path = one.data_dir / "worker-kafka.log"
        sink.start()
        try:
            faust.start()
            first = len(feed.messages) * 6 // 10
            publish(feed.messages[:first], Publisher(settings.kafka_bootstrap))
            wait_decided(settings, first, 240, faust.tail)
            assert (faust.health() or {}).get("runtime") == "faust"
            faust.stop()
            kafka.start()
            assert (kafka.health() or {}).get("runtime") == "kafka"
            publish(feed.messages[first:], Publisher(settings.kafka_bootstrap))
            wait_decided(settings, len(feed.messages), 240, kafka.tail)
            wait_sink_caught_up(settings)
            counts = check_outcomes(settings, feed, [m.sim.sim_id for m in feed.messages])
            report = render(counts, [], [])
            assert problems(counts) == {}, f"{report}\n--- faust\n{faust.tail()}\n--- kafka\n{kafka.tail()}"
            assert counts["held_total"] > 0
            restored = [line for line in kafka.log_path.read_text(errors="replace").splitlines()
                        if "restored from" in line and "(0 keys" not in line]
            assert restored, "the kafka-runtime worker restored no table from the changelogs"
        finally:
            for proc in (kafka, faust, sink):
                proc.stop()
