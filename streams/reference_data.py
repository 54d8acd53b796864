"""Reference data every worker needs whole: CRLs and the registrant directory.

Both arrive on compacted topics (``pki.crl`` keyed by issuer, ``registrants``
keyed by DEA number) that each worker reads completely, from the beginning,
without a consumer group: a CRL must reach every worker, not one of them.
A background thread reads them with confluent-kafka and queues the records;
the agent applies the queue between batches on its own thread, so the
verifier's caches are never changed under a running verification.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from connectors.kafka_security import client_config

from . import topic_names as t
from .avro_codec import AvroCodec, DecodeError, default_codec

log = logging.getLogger(__name__)

REGISTRANT_UNKNOWN = "REGISTRANT_UNKNOWN"
REGISTRATION_INACTIVE = "REGISTRATION_INACTIVE"


@dataclass(frozen=True)
class RegistrationFinding:
    code: str | None  # None = active
    detail: str


class RegistrantDirectory:
    """The distributor's view of DEA registrations, from the ``registrants`` topic."""

    def __init__(self) -> None:
        self._by_dea: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._by_dea)

    def apply(self, dea: str, record: dict[str, Any] | None) -> None:
        if record is None:  # tombstone: the distributor no longer knows the registrant
            self._by_dea.pop(dea, None)
        else:
            self._by_dea[dea] = record

    def get(self, dea: str) -> dict[str, Any] | None:
        return self._by_dea.get(dea)

    def check(self, dea: str, at: datetime) -> RegistrationFinding:
        """Is the purchaser's registration active at receipt? Unknown is not the same as inactive."""
        rec = self._by_dea.get(dea)
        if rec is None:
            return RegistrationFinding(REGISTRANT_UNKNOWN, f"{dea} is not in the registrant directory")
        if rec["status"].upper() != "ACTIVE":
            return RegistrationFinding(REGISTRATION_INACTIVE, f"registration {dea} is {rec['status']}")
        expires: date | None = rec.get("expires_on")
        if expires is not None and at.date() > expires:
            return RegistrationFinding(REGISTRATION_INACTIVE, f"registration {dea} expired on {expires:%Y-%m-%d}")
        return RegistrationFinding(None, f"registration {dea} active ({rec['name']})")


class ReferenceFeed(threading.Thread):
    """Reads ``pki.crl`` and ``registrants`` whole, forever, into a queue of updates."""

    TOPICS = (t.CRL, t.REGISTRANTS)

    def __init__(self, bootstrap: str, codec: AvroCodec | None = None) -> None:
        super().__init__(name="reference-feed", daemon=True)
        self.bootstrap = bootstrap
        self.codec = codec or default_codec()
        self.updates: queue.Queue[tuple[str, str, dict[str, Any] | None]] = queue.Queue()
        self.caught_up = threading.Event()
        self.stopping = threading.Event()
        self.errors = 0

    def _consumer(self) -> tuple[Consumer, dict[tuple[str, int], int]]:
        consumer = Consumer({
            "bootstrap.servers": self.bootstrap,
            "group.id": f"reference-feed-{uuid.uuid4()}",  # required by librdkafka; never committed
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            **client_config(),
        }, logger=logging.getLogger("streams.reference_data.librdkafka"))
        metadata = consumer.list_topics(timeout=30)
        partitions, ends = [], {}
        for topic in self.TOPICS:
            if topic not in metadata.topics:
                raise RuntimeError(f"topic {topic} is missing; run `csos topics`")
            for p in metadata.topics[topic].partitions:
                partitions.append(TopicPartition(topic, p, OFFSET_BEGINNING))
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
                if high > low:
                    ends[(topic, p)] = high
        consumer.assign(partitions)
        return consumer, ends

    def run(self) -> None:
        consumer, behind = self._consumer()
        if not behind:
            self.caught_up.set()
        try:
            while not self.stopping.is_set():
                msg = consumer.poll(0.5)
                if msg is None:
                    continue
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        behind.pop((msg.topic(), msg.partition()), None)
                        if not behind:
                            self.caught_up.set()
                    else:
                        log.warning("reference feed: %s", msg.error())
                    continue
                self._queue(msg)
                if behind.get((msg.topic(), msg.partition()), -1) <= msg.offset() + 1:
                    behind.pop((msg.topic(), msg.partition()), None)
                    if not behind:
                        self.caught_up.set()
        finally:
            consumer.close()

    def _queue(self, msg: Any) -> None:
        key = (msg.key() or b"").decode("utf-8", errors="replace")
        if msg.value() is None:
            self.updates.put((msg.topic(), key, None))
            return
        expect = "pki.CrlPublished" if msg.topic() == t.CRL else "csos.registry.Registrant"
        try:
            _, record = self.codec.decode(msg.value(), expect=expect)
        except DecodeError as exc:
            self.errors += 1
            log.error("unreadable %s record %r at offset %d: %s", msg.topic(), key, msg.offset(), exc)
            return
        self.updates.put((msg.topic(), key, record))

    def drain(self) -> list[tuple[str, str, dict[str, Any] | None]]:
        out = []
        while True:
            try:
                out.append(self.updates.get_nowait())
            except queue.Empty:
                return out

    def wait_caught_up(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.is_alive():
            if self.caught_up.wait(0.2):
                return True
        return self.caught_up.is_set()
