"""Session-wide real infrastructure: one Kafka broker (KRaft, from Maven Central) per test session.

The broker runs on free ports with a temporary data directory, so the suite
neither needs nor disturbs a developer's broker on 9092.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streams.tools.broker import LocalBroker, free_port, running_broker  # noqa: F401 - tests import it from here


#: The worker's runtimes (``CSOS_RUNTIME``): the crash, two-worker and hostile-input tests run against each.
RUNTIMES = ("faust", "kafka")

#: Test folders by kind, in the order they run: fast and self-contained first.
KIND_ORDER = {"unit": 0, "integration": 1, "e2e": 2, "browser": 2}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Unit, then integration, then the tests that share the session pipeline (e2e and browser) in order of
    their file names, whatever their folder: each of those leaves orders, cases and baselines in the one
    pipeline, and the later ones were written against what the earlier ones leave (as when the tests
    were one folder)."""
    def rank(item: pytest.Item) -> tuple[int, str]:
        path = Path(str(item.fspath))
        return KIND_ORDER.get(path.parent.name, 1), path.name
    items.sort(key=rank)  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    with running_broker(tmp_path_factory.mktemp("kafka")) as b:
        yield b


# --------------------------------------------------------------------------- the running pipeline
import uuid  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from streams.tools.feed import PreparedFeed, prepare_feed, publish, publish_reference_data, replay_settings  # noqa: E402
from connectors.kafka.io import Publisher, consume_all  # noqa: E402
from streams.core.config import Settings  # noqa: E402
from connectors.clickhouse.query import run_query  # noqa: E402
from streams.tools.processes import Pipeline as Processes  # noqa: E402

#: Exact counts of every bad kind, so the suite always exercises each one.
E2E_BAD_COUNTS = {"tampered": 6, "wrong_key": 6, "expired_cert": 6, "revoked_cert": 6, "dea_mismatch": 6,
                  "schedule_not_authorized": 6, "untrusted_cert": 6, "malformed_order": 6, "malformed_bytes": 6}
DUE_DILIGENCE_SECONDS = 45.0
#: The session pipeline's CSOS_AUDIT_KEY (fixed, test only): its audit trail is a keyed (HMAC) chain.
TEST_AUDIT_KEY = "7e57a0d1" * 8
E2E_SUSPICIOUS_COUNTS = {"size_spike": 10, "frequency_burst": 12, "family_shift": 6}


@dataclass
class Pipeline:
    """A worker running against the session broker, fed with a simulated feed."""

    settings: Settings
    processes: Processes
    feed: PreparedFeed
    extra_raw: list[bytes] = field(default_factory=list)  # hostile messages put on the received topic
    extra_received: dict[str, str] = field(default_factory=dict)  # order_id -> expected reason code

    def sql(self, query: str) -> list[list[Any]]:
        return run_query(self.settings, query)[1]

    def eventually(self, query: str, want: Callable[[list], bool] = bool, timeout: float = 90) -> list[list[Any]]:
        """Rows of ``query`` once ``want(rows)`` holds (the sink writes in batches); fails with the logs if never."""
        deadline = time.monotonic() + timeout
        rows = self.sql(query)
        while not want(rows) and time.monotonic() < deadline:
            time.sleep(0.5)
            rows = self.sql(query)
        assert want(rows), f"timed out waiting for: {query} -> {rows}\n{self.processes.tail()}"
        return rows

    def topic(self, name: str, expected: int) -> list[Any]:
        return consume_all(self.settings.kafka_bootstrap, [name], until=lambda m: len(m) >= expected,
                           timeout=60)


@pytest.fixture(scope="session")
def pipeline(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    data = Path(tmp_path_factory.mktemp("pipeline"))
    settings = Settings.from_env().with_(
        kafka_bootstrap=broker.bootstrap, data_dir=data, pki_dir=data / "pki", clickhouse_url="",
        web_port=free_port(), sink_port=free_port(), app_id=f"csos-test-{uuid.uuid4().hex[:6]}",
        # Held orders' due-diligence clocks lapse within the session (tests/e2e/test_cases_e2e.py).
        due_diligence_days=DUE_DILIGENCE_SECONDS / 86400, case_clock_seconds=1.0,
        audit_key=TEST_AUDIT_KEY,  # the sink seals the audit chain with HMAC (tests/unit/test_audit_chain.py)
    )
    feed = prepare_feed(settings, registrants=40, seed=11, days=120, bad_counts=E2E_BAD_COUNTS,
                        suspicious_counts=E2E_SUSPICIOUS_COUNTS)
    settings = replay_settings(settings, feed)  # its supplier; a receipt skew admitting its 120 days of history
    publish_reference_data(settings, Publisher(settings.kafka_bootstrap))
    processes = Processes(settings)
    processes.start()
    try:
        yield Pipeline(settings, processes, feed)
    finally:
        processes.stop()


@pytest.fixture(scope="session")
def streamed(pipeline: Pipeline) -> Pipeline:
    """The feed plus hostile extras, published once, with every outcome in ClickHouse."""
    from streams.core.avro_codec import default_codec
    from connectors.sources.intake import OrderIntake

    publisher = Publisher(pipeline.settings.kafka_bootstrap)
    publish(pipeline.feed.messages, publisher)
    intake = OrderIntake(publisher, "hostile-test")
    codec = default_codec()
    # A well-formed Avro message of the wrong type on the orders topic: dead-lettered, not processed.
    wrong_type = codec.encode("audit.AuditEvent", {
        "event_id": "x", "occurred_at": pipeline.feed.result.end, "stage": "x", "action": "x", "order_id": None,
        "purchaser_dea": None, "outcome": "x", "detail": "{}", "actor": "x"})
    truncated = codec.encode("csos.orders.ReceivedOrder", {
        "order_id": "t", "received_at": pipeline.feed.result.end, "source": "x", "format": "csos-order/1",
        "document": None, "signature": b"\x30" * 64})[:-20]
    for raw in (wrong_type, truncated, b""):
        intake.submit_raw(raw, key="hostile")
        pipeline.extra_raw.append(raw)
    # A readable envelope whose signature is garbage: a rejection, not a crash.
    oid = intake.submit(b"\x30\x82\xff\xff garbage", document=b'{"format":"csos-order/1"}', purchaser_dea="BX0000000")
    pipeline.extra_received[oid] = "MALFORMED_SIGNATURE"
    intake.flush()

    total = len(pipeline.feed.messages) + len(pipeline.extra_raw) + len(pipeline.extra_received)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        decided = pipeline.sql(
            "SELECT (SELECT count() FROM rejections FINAL) + (SELECT count() FROM verdicts FINAL)"
            " + (SELECT uniqExact(source_topic, source_partition, source_offset) FROM dead_letters"
            " WHERE stage = 'verify')")[0][0]
        if int(decided) >= total:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"only {decided} of {total} orders decided; logs:\n{pipeline.processes.tail()}")
    from streams.tools.chaos import wait_sink_caught_up

    wait_sink_caught_up(pipeline.settings)  # the audit trail's last batch follows the outcomes
    return pipeline
