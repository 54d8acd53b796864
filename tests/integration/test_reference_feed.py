"""Reference data (connectors/sources/reference_data.py): unusable CRL and registrant records leave one trace each.

Unit tests drive the feed's per-message functions with a recording publisher; the
broker test publishes garbage on the real topics and finds one dead letter per
record although two feeds (two workers) read both topics whole, and again after a restart.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from streams.tools.pki import TestPKI, generate_key
from connectors.kafka import catalogue as t
from streams.pipeline.agents.verify import VerifyProcessor
from streams.pipeline.processor import InputMessage
from streams.core.avro_codec import default_codec
from connectors.kafka.emit import Emitter
from connectors.sources.reference_data import (ReferenceFeed, Trace, UnreadableReference, Update, dead_letter_id,
                                    read_reference)
from streams.verification import Verifier
from connectors.kafka.testing import MemoryPublisher
from tests.unit.test_verification import NOW, PRODUCTS

codec = default_codec()
DEA = "AP5836727"


def registrant(dea: str = DEA, **kw: Any) -> dict[str, Any]:
    return {"dea_number": dea, "name": "Acme Pharmacy", "business_activity": None, "state": "IL",
            "schedules": ["2"], "status": "ACTIVE", "expires_on": None,
            "updated_at": datetime(2026, 1, 1, tzinfo=timezone.utc), **kw}


def crl_message(crl_der: bytes, source: str = "test.crl") -> bytes:
    return codec.encode("pki.CrlPublished", {
        "issuer": "CN=x", "crl_der": crl_der, "this_update": NOW, "next_update": None,
        "published_at": NOW, "source": source})


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return TestPKI.create(now=NOW, reuse_keys=True)


def feed_with(publisher: MemoryPublisher) -> ReferenceFeed:
    return ReferenceFeed("unused:9092", emitter=Emitter(publisher, "reference-feed"))  # type: ignore[arg-type]


# ------------------------------------------------------------------ what is unusable, and why
@pytest.mark.parametrize("topic,key,value,why", [
    (t.REGISTRANTS, DEA.encode(), b"\x00garbage", "undecodable Registrant"),
    (t.CRL, b"CN=x", codec.encode("csos.registry.Registrant", registrant()), "undecodable CrlPublished"),
    (t.REGISTRANTS, b"AP5836720", codec.encode("csos.registry.Registrant", registrant("AP5836720")),
     "not a valid DEA number"),
    (t.REGISTRANTS, b"BR1234563", codec.encode("csos.registry.Registrant", registrant()), "keyed 'BR1234563'"),
    (t.REGISTRANTS, DEA.encode(), codec.encode("csos.registry.Registrant", registrant(status=" ")), "no status"),
    (t.REGISTRANTS, b"\xff\xfe", None, "not UTF-8"),
    (t.REGISTRANTS, None, codec.encode("csos.registry.Registrant", registrant()), "no key"),
    (t.CRL, b"CN=x", crl_message(b"\x30\x03\x02\x01\x00"), "is not a CRL"),
])
def test_unusable_reference_records_are_refused_with_a_reason(topic, key, value, why):
    with pytest.raises(UnreadableReference, match=why):
        read_reference(codec, topic, key, value)


def test_usable_records_and_tombstones_are_read(pki):
    assert read_reference(codec, t.REGISTRANTS, DEA.encode(), codec.encode("csos.registry.Registrant",
                                                                           registrant()))[1]["name"] == "Acme Pharmacy"
    assert read_reference(codec, t.REGISTRANTS, DEA.encode(), None) == (DEA, None)
    der = pki.build_crl(NOW - timedelta(hours=1), NOW + timedelta(days=7)).public_bytes(Encoding.DER)
    assert read_reference(codec, t.CRL, b"CN=x", crl_message(der))[1]["crl_der"] == der


# ------------------------------------------------------------------ the feed's two readers
def test_the_tracing_reader_dead_letters_with_an_id_that_repeats_collapse_on():
    pub = MemoryPublisher()
    feed = feed_with(pub)
    at = datetime(2026, 2, 1, tzinfo=timezone.utc)
    assert feed.trace(t.REGISTRANTS, 2, 7, DEA.encode(), b"\x00garbage", at)
    assert feed.trace(t.REGISTRANTS, 2, 7, DEA.encode(), b"\x00garbage", at)  # e.g. redelivered after a crash
    dead = pub.records(t.DLQ)
    assert len(dead) == 2 and dead[0] == dead[1]  # identical rows: one in dead_letters FINAL
    assert dead[0]["dead_letter_id"] == dead_letter_id(t.REGISTRANTS, 2, 7)
    assert dead[0]["stage"] == "reference" and dead[0]["source_offset"] == 7 and dead[0]["failed_at"] == at
    assert "undecodable Registrant" in dead[0]["reason"] and dead[0]["payload"] == b"\x00garbage"
    assert [a["detail"] for a in pub.audits("message.dead_lettered")][0].count(dead[0]["dead_letter_id"]) == 1
    assert feed.drain() == []  # nothing unusable reaches the verifier


def test_every_workers_reader_skips_unusable_records_without_a_trace():
    class Msg:
        def __init__(self, value: bytes) -> None:
            self._value = value

        def topic(self) -> str: return t.REGISTRANTS
        def partition(self) -> int: return 0
        def offset(self) -> int: return 3
        def key(self) -> bytes: return DEA.encode()
        def value(self) -> bytes: return self._value

    pub = MemoryPublisher()
    feed = feed_with(pub)
    feed._queue(Msg(b"\x00garbage"))
    feed._queue(Msg(codec.encode("csos.registry.Registrant", registrant())))
    assert feed.errors == 1 and not pub.messages
    assert [(u.key, u.trace) for u in feed.drain()] == [(DEA, None)]


def test_a_refused_crl_is_audited_only_from_the_traced_copy(pki):
    """Every worker refuses a forged CRL; only the worker tracing its partition audits it (crl.refused)."""
    forged = pki.build_crl(NOW - timedelta(hours=1), NOW + timedelta(days=7), signer=generate_key())
    der = forged.public_bytes(Encoding.DER)
    pub = MemoryPublisher()
    feed = feed_with(pub)
    proc = VerifyProcessor(Verifier(pki.trust_anchors, pki.intermediates, [], PRODUCTS),
                           PRODUCTS, Emitter(pub, "verify-agent"), {}, feed=feed)  # type: ignore[arg-type]
    _, record = read_reference(codec, t.CRL, b"CN=x", crl_message(der, "forged.crl"))
    feed.updates.put(Update(t.CRL, "CN=x", record))  # a worker's own copy: logged only
    proc.apply_reference_updates()
    assert not pub.audits("crl.refused")
    assert not feed.trace(t.CRL, 0, 11, b"CN=x", crl_message(der, "forged.crl"))  # readable: to the verifier
    assert feed.updates.queue[0].trace == Trace(0, 11)
    proc.apply_reference_updates()
    refused = pub.audits("crl.refused")
    assert len(refused) == 1 and '"offset": 11' in refused[0]["detail"] and "key" in refused[0]["detail"]


# ------------------------------------------------------------------ on a broker: two workers, a restart
@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A broker of its own: garbage on the shared reference topics would reach other tests' workers."""
    from tests.conftest import running_broker

    with running_broker(tmp_path_factory.mktemp("kafka-reference")) as b:
        yield b


def test_garbage_on_both_topics_is_dead_lettered_once_by_two_workers_and_after_a_restart(own_broker):
    from connectors.kafka.io import Publisher, consume_all

    publisher = Publisher(own_broker.bootstrap)
    marker = uuid.uuid4().hex
    publisher.publish(t.CRL, "CN=garbage", f"not avro {marker}".encode())
    publisher.publish(t.REGISTRANTS, "BR1234563", codec.encode("csos.registry.Registrant", registrant()))
    publisher.publish(t.REGISTRANTS, DEA, codec.encode("csos.registry.Registrant", registrant()))  # usable
    publisher.flush()
    group = f"test-{marker}-reference-trace"

    def run_workers(n: int) -> list[ReferenceFeed]:
        feeds = [ReferenceFeed(own_broker.bootstrap, emitter=Emitter(Publisher(own_broker.bootstrap), "ref"),
                               trace_group=group) for _ in range(n)]
        for f in feeds:
            f.start()
        assert all(f.wait_caught_up(60) for f in feeds)
        return feeds

    def dead_letters(at_least: int) -> list[dict[str, Any]]:
        found = consume_all(own_broker.bootstrap, [t.DLQ], until=lambda ms: len(ms) >= at_least, timeout=60)
        return [codec.decode(m.value(), expect="dlq.DeadLetter")[1] for m in found]

    first = run_workers(2)
    dead = dead_letters(2)
    assert sorted(d["source_topic"] for d in dead) == [t.CRL, t.REGISTRANTS]
    assert any("keyed 'BR1234563'" in d["reason"] for d in dead)
    assert all(f.errors == 2 for f in first)  # each worker read (and skipped) both
    assert all(DEA in {u.key for u in f.drain()} for f in first)  # the usable record still applies
    for f in first:
        f.stopping.set()
        f.join(10)
    restarted = run_workers(2)
    # A new bad record after the restart: once its dead letter is out, the group has resumed where it
    # committed, in order, so a re-trace of the first two would already be there too.
    publisher.publish(t.REGISTRANTS, DEA, b"\x00after the restart")
    publisher.flush()
    dead_letters(3)
    dead = [codec.decode(m.value(), expect="dlq.DeadLetter")[1]  # everything, once the topic is quiet
            for m in consume_all(own_broker.bootstrap, [t.DLQ], idle_seconds=3.0, timeout=60)]
    assert len(dead) == 3 and len({d["dead_letter_id"] for d in dead}) == 3
    assert sum(f.dead_lettered for f in first) == 2 and sum(f.dead_lettered for f in restarted) == 1
    for f in restarted:
        f.stopping.set()


# ------------------------------------------------------------------ the freshness barrier (no broker)
def test_a_batch_behind_the_published_reference_data_is_parked_then_judged_once_caught_up(pki, monkeypatch):
    """Fail closed: a batch is never judged on a view known to be behind; its orders wait, then are judged."""
    from tests.unit.test_agents_hostile import message
    from tests.unit.test_verification import ALL_SCHEDULES, SUPPLIER, signed

    cred = pki.issue_registrant(DEA, "Acme Pharmacy", ALL_SCHEDULES, NOW - timedelta(days=30),
                                NOW + timedelta(days=300))
    pub = MemoryPublisher()
    feed = feed_with(pub)
    ends = {(t.CRL, 0): 5, (t.REGISTRANTS, 0): 2}
    monkeypatch.setattr(feed, "end_offsets", lambda timeout: ends)
    feed._advance(t.CRL, 0, 3)  # the reader has not yet read the CRL published at offset 4
    feed._advance(t.REGISTRANTS, 0, 2)
    feed.caught_up.set()
    verifier = Verifier(pki.trust_anchors, pki.intermediates,
                        [pki.build_crl(NOW - timedelta(hours=3), NOW + timedelta(days=7), revoked={}), pki.root_crl],
                        PRODUCTS)
    proc = VerifyProcessor(verifier, PRODUCTS, Emitter(pub, "verify-agent"), {}, feed=feed,  # type: ignore[arg-type]
                           suppliers={SUPPLIER.dea_number}, barrier_seconds=0.2)
    assert not proc.reference_barrier()
    proc.begin_batch()
    proc.handle(InputMessage(t.RECEIVED, 0, 0, DEA.encode(),
                             message(signed(cred)[1], received_at=NOW - timedelta(minutes=59))))
    proc.end_batch()
    pending = pub.records(t.PENDING)
    assert [p["reason_code"] for p in pending] == ["REVOCATION_UNKNOWN"] and "caught up" in pending[0]["reason"]
    assert not pub.records(t.VERIFIED) + pub.records(t.REJECTED)

    # The revoking CRL arrives (offset 4) but the reader is not at 5 yet: still parked.
    pki.revoke(cred.serial, NOW - timedelta(hours=2))
    der = pki.build_crl(NOW - timedelta(minutes=30), NOW + timedelta(days=7)).public_bytes(Encoding.DER)
    feed.updates.put(Update(t.CRL, "k", read_reference(codec, t.CRL, b"k", crl_message(der))[1]))
    feed._advance(t.CRL, 0, 4)
    proc.tick()
    assert not pub.records(t.VERIFIED) + pub.records(t.REJECTED)
    feed._advance(t.CRL, 0, 5)
    proc.tick()  # now judged, on the view that includes the revocation
    rejected = pub.records(t.REJECTED)
    assert [r["reason_code"] for r in rejected] == ["CERT_REVOKED"]
    assert proc.reference_barrier()  # and the next batch is judged at once
