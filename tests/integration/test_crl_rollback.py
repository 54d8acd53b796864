"""CRL history cannot roll back (issue 12, outcome 4).

A CRL is replaced only by a valid CRL of the same issuer and scope with a
higher CRL number: a refused (forged) record or an older CRL, read before or
after the current one, never displaces it. On a broker: the current CRL, then a
forged and an older CRL of the same issuer, the topic compacted, a worker's
reference reader started afresh: the certificate stays revoked.
"""
from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from connectors.kafka.io import Publisher
from streams.tools.pki import Credential, TestPKI, generate_key
from connectors.sources.reference_publish import publish_crls
from connectors.kafka import catalogue as t
from streams.pipeline.agents.verify import VerifyProcessor
from streams.core.avro_codec import default_codec
from connectors.kafka.emit import Emitter
from connectors.sources.reference_data import ReferenceFeed, Trace, Update, crl_rank, crl_record_key, read_reference
from streams.verification import Verifier
from connectors.kafka.testing import MemoryPublisher
from tests.unit.test_verification import ALL_SCHEDULES, DEA, NOW, PRODUCTS, YEAR, signed

codec = default_codec()


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return TestPKI.create(now=NOW, reuse_keys=True)


@pytest.fixture(scope="module")
def cred(pki: TestPKI) -> Credential:
    return pki.issue_registrant(DEA, "Acme Pharmacy", ALL_SCHEDULES, NOW - YEAR, NOW + YEAR)


@pytest.fixture(scope="module")
def history(pki: TestPKI, cred: Credential) -> dict[str, x509.CertificateRevocationList]:
    """The sub-CA's CRLs: an older one (not listing the certificate), the current one (revoking it, a higher
    number) and a forged one (the sub-CA's name, another key, the highest number)."""
    older = pki.build_crl(NOW - timedelta(hours=3), NOW + timedelta(days=7), revoked={})
    current = pki.build_crl(NOW - timedelta(hours=1), NOW + timedelta(days=7),
                            revoked={cred.serial: NOW - timedelta(hours=2)})
    forged = pki.build_crl(NOW - timedelta(minutes=30), NOW + timedelta(days=7), revoked={}, signer=generate_key())
    return {"current": current, "forged": forged, "older": older}


def processor(pki: TestPKI, publisher: MemoryPublisher, feed: ReferenceFeed | None = None) -> VerifyProcessor:
    """A worker's verify agent as it starts: only the root's CRL (for the sub-CA), none of the sub-CA's yet."""
    verifier = Verifier(pki.trust_anchors, pki.intermediates, [pki.root_crl], PRODUCTS)  # the root speaks for the sub-CA
    return VerifyProcessor(verifier, PRODUCTS, Emitter(publisher, "verify-agent"), {},
                           feed=feed or ReferenceFeed("unused:9092"))  # type: ignore[arg-type]


def revocation(proc: VerifyProcessor, cred: Credential) -> str | None:
    """The reason code an order signed by ``cred``, received at NOW, gets from this worker."""
    doc, sig = signed(cred, detached=True)
    return proc.verifier.verify(doc, sig, NOW).reason_code


def record(crl: x509.CertificateRevocationList, source: str) -> dict[str, Any]:
    return read_reference(codec, t.CRL, crl_record_key(crl).encode(), codec.encode("pki.CrlPublished", {
        "issuer": crl.issuer.rfc4514_string(), "crl_der": crl.public_bytes(Encoding.DER),
        "this_update": crl.last_update_utc, "next_update": crl.next_update_utc, "published_at": NOW,
        "source": source}))[1]


# ------------------------------------------------------------------ the rule, in every arrival order
@pytest.mark.parametrize("order", list(itertools.permutations(["current", "forged", "older"])))
def test_the_newest_valid_crl_stays_in_force_whatever_the_arrival_order(pki, cred, history, order):
    pub = MemoryPublisher()
    proc = processor(pki, pub)
    for i, name in enumerate(order):
        proc.feed.updates.put(Update(t.CRL, "k", record(history[name], f"{name}.crl")))  # the worker's copy
        proc.feed.updates.put(Update(t.CRL, "k", record(history[name], f"{name}.crl"), Trace(0, i)))  # traced
        proc.apply_reference_updates()
    assert revocation(proc, cred) == "CERT_REVOKED"
    assert proc.crls.in_force(crl_rank(history["current"])) == crl_rank(history["current"])
    # One trace for each record not in force: the forged one refused, the older one superseded (if it came
    # after the current one; before it, it was in force for a while and loaded).
    assert len(pub.audits("crl.refused")) == 1 and "forged.crl" in pub.audits("crl.refused")[0]["detail"]
    superseded = pub.audits("crl.superseded")
    assert len(superseded) == (order.index("older") > order.index("current"))
    loaded = [a["detail"] for a in pub.audits("crl.loaded")]
    assert sum("current.crl" in d for d in loaded) == 1 and not any("forged.crl" in d for d in loaded)


def test_a_crl_with_the_same_number_does_not_replace_the_one_in_force(pki, cred, history):
    """Not newer is not newer: the same CRL number under another thisUpdate is ignored."""
    current = history["current"]
    number = crl_rank(current).number
    pki.crl_number = number - 1  # the next CRL the test PKI builds reuses the number
    same_number = pki.build_crl(NOW - timedelta(minutes=10), NOW + timedelta(days=7), revoked={})
    pki.crl_number = max(pki.crl_number, number + 10)
    proc = processor(pki, MemoryPublisher())
    for crl in (current, same_number):
        proc.feed.updates.put(Update(t.CRL, "k", record(crl, "x.crl")))
    proc.apply_reference_updates()
    assert revocation(proc, cred) == "CERT_REVOKED"


def test_each_distinct_crl_has_its_own_key(history):
    keys = {name: crl_record_key(crl) for name, crl in history.items()}
    assert len(set(keys.values())) == 3
    assert all(k.startswith(history["current"].issuer.rfc4514_string()) for k in keys.values())
    assert f"number {crl_rank(history['current']).number}" in keys["current"]
    assert crl_record_key(history["current"]) == keys["current"]  # a re-publication: the same key


# ------------------------------------------------------------------ on a broker: compaction and a restart
@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A broker of its own: this test compacts pki.crl, which the session's workers read."""
    from tests.conftest import running_broker

    with running_broker(tmp_path_factory.mktemp("kafka-rollback")) as b:
        yield b


def _read_partition(bootstrap: str, partition: int) -> list[Any]:
    """Every record left on one partition of pki.crl, read to its end."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4()}",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        consumer.assign([TopicPartition(t.CRL, partition, OFFSET_BEGINNING)])
        out = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    return out
                raise AssertionError(msg.error())
            out.append(msg)
        raise AssertionError(f"{t.CRL}[{partition}] not read to its end within 30 s")
    finally:
        consumer.close()


def _compact(bootstrap: str) -> list[int]:
    """Make the broker compact every partition of pki.crl, and wait until it has.

    Small segments and a low dirty ratio make each partition's closed segments
    cleanable; a probe key written again and again on every partition (the
    harmless record: a tombstone, which no worker applies) rolls the segments, and
    compaction has run on a partition once the probe's first record is gone.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    resource = ConfigResource("topic", t.CRL, incremental_configs=[
        ConfigEntry("segment.ms", "100", incremental_operation=AlterConfigOpType.SET),
        ConfigEntry("min.cleanable.dirty.ratio", "0.01", incremental_operation=AlterConfigOpType.SET),
    ])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)
    partitions = sorted(admin.list_topics(t.CRL, timeout=30).topics[t.CRL].partitions)
    producer = Producer({"bootstrap.servers": bootstrap})
    first: dict[int, int] = {}

    def on_delivery(err: Any, msg: Any) -> None:
        assert err is None, err
        first.setdefault(msg.partition(), msg.offset())

    deadline = time.monotonic() + 120
    pending = set(partitions)
    while pending and time.monotonic() < deadline:
        for p in partitions:
            producer.produce(t.CRL, key=b"compaction probe", value=None, partition=p, on_delivery=on_delivery)
        producer.flush(30)
        pending = {p for p in pending if any(m.offset() == first[p] for m in _read_partition(bootstrap, p))}
    assert not pending, f"the broker did not compact {t.CRL} partitions {sorted(pending)} within 120 s"
    return partitions


def test_after_compaction_and_a_restart_the_revoked_certificate_stays_revoked(own_broker, pki, cred, history,
                                                                              tmp_path: Path):
    publisher = Publisher(own_broker.bootstrap)
    for name in ("current", "forged", "older"):  # the current CRL first; a refused and an older one after it
        path = tmp_path / f"{name}.crl"
        path.write_bytes(history[name].public_bytes(Encoding.DER))
        publish_crls(publisher, [path])

    def start_worker() -> tuple[VerifyProcessor, ReferenceFeed]:
        feed = ReferenceFeed(own_broker.bootstrap)
        feed.start()
        assert feed.wait_caught_up(60)
        proc = processor(pki, MemoryPublisher(), feed)
        proc.apply_reference_updates()
        return proc, feed

    proc, feed = start_worker()
    assert revocation(proc, cred) == "CERT_REVOKED"
    feed.stopping.set()
    feed.join(10)

    partitions = _compact(own_broker.bootstrap)
    proc, feed = start_worker()  # a restarted worker reads the compacted topic whole
    try:
        assert revocation(proc, cred) == "CERT_REVOKED"
        assert proc.crls.in_force(crl_rank(history["current"])) == crl_rank(history["current"])
    finally:
        feed.stopping.set()
        feed.join(10)
    left = [m for p in partitions for m in _read_partition(own_broker.bootstrap, p)]
    assert len({m.key() for m in left if m.key() != b"compaction probe"}) == 3  # every distinct CRL kept
