"""Reference data every worker needs whole: CRLs and the registrant directory.

Both arrive on compacted topics (``pki.crl`` keyed per distinct CRL, see
``crl_record_key``; ``registrants`` keyed by DEA number) that each worker reads completely, from the beginning,
without a consumer group: a CRL must reach every worker, not one of them.
A background thread reads them with confluent-kafka and queues the records;
the agent applies the queue between batches on its own thread, so the
verifier's caches are never changed under a running verification. The
reader also tells how far it has read each partition, so that the agent can
wait, before judging a batch, until it has everything published before the
batch arrived (the freshness barrier, ``end_offsets``/``wait_until``).

Unusable records leave exactly one trace. Every worker re-reads both topics
whole at every start, so a worker that dead-lettered what it read would trace
the same bad record once per worker per restart. Instead the feed has a second
consumer, in one consumer group shared by all workers (``<app id>-reference-trace``),
with committed offsets: Kafka gives each partition of the two topics to exactly
one worker, and after a restart that worker resumes after the records it
already traced. Only that consumer dead-letters (undecodable or invalid
records) and hands CRLs to the verify agent marked ``trace`` so that a refused
CRL is audited (``crl.refused``) once, not by every worker. The dead letter's
id and ``failed_at`` derive from (topic, partition, offset) and the record's
timestamp, so the rare repeat after a crash between publishing and committing
collapses in ``dead_letters FINAL``.
"""
from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from confluent_kafka import (OFFSET_BEGINNING, Consumer, IsolationLevel, KafkaError, KafkaException,
                             TopicPartition)
from confluent_kafka.admin import AdminClient, OffsetSpec

from connectors.kafka.security import client_config

from connectors.kafka import catalogue as t
from connectors.kafka.emit import dead_letter_id
from streams.core.avro_codec import AvroCodec, DecodeError, default_codec
from streams.domain.identifiers import is_valid_dea_number
from streams.core.errors import CsosError

if TYPE_CHECKING:  # pragma: no cover
    from connectors.kafka.emit import Emitter

log = logging.getLogger(__name__)

REGISTRANT_UNKNOWN = "REGISTRANT_UNKNOWN"
REGISTRATION_INACTIVE = "REGISTRATION_INACTIVE"
#: Stage of the feed's dead letters and audit events.
STAGE = "reference"
#: The Avro record each reference topic carries.
SCHEMAS = {t.CRL: "pki.CrlPublished", t.REGISTRANTS: "csos.registry.Registrant"}


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


class UnreadableReference(CsosError, ValueError):
    """A reference record no worker can use; the message says why (it becomes the dead letter's reason)."""
    code = "REFERENCE_UNREADABLE"


class Trace(NamedTuple):
    """Where a record was read by the tracing consumer: this worker is the one to audit it."""

    partition: int
    offset: int


class Update(NamedTuple):
    """One record for the verify agent; ``trace`` is set on the tracing consumer's copy of a CRL."""

    topic: str
    key: str
    record: dict[str, Any] | None
    trace: Trace | None = None


def read_reference(codec: AvroCodec, topic: str, key: bytes | None,
                   value: bytes | None) -> tuple[str, dict[str, Any] | None]:
    """The key and record of one reference message (None: a tombstone), or ``UnreadableReference``.

    Checks what every worker would otherwise trip over later, so that garbage is
    refused once at the door with a reason: the key, the Avro record of the
    topic's schema, the registrant's identity, the CRL's DER.
    """
    if topic not in SCHEMAS:
        raise UnreadableReference(f"{topic} is not a reference topic")
    try:
        text = (key or b"").decode("utf-8")
    except UnicodeDecodeError:
        raise UnreadableReference("key is not UTF-8") from None
    if not text:
        raise UnreadableReference("no key (pki.crl is keyed by issuer, registrants by DEA number)")
    if value is None:
        return text, None
    expect = SCHEMAS[topic]
    try:
        _, record = codec.decode(value, expect=expect)
    except DecodeError as exc:
        raise UnreadableReference(f"undecodable {expect.rsplit('.', 1)[-1]}: {exc}") from None
    (_check_registrant if topic == t.REGISTRANTS else _check_crl)(text, record)
    return text, record


def _check_registrant(key: str, rec: dict[str, Any]) -> None:
    dea = rec["dea_number"]
    if not is_valid_dea_number(dea):
        raise UnreadableReference(f"registrant {dea!r} is not a valid DEA number")
    if key != dea:
        raise UnreadableReference(f"registrant {dea} is keyed {key!r}; the key must be its DEA number")
    if not rec["name"].strip() or not rec["status"].strip():
        raise UnreadableReference(f"registrant {dea} has no name or no status")


def _check_crl(key: str, rec: dict[str, Any]) -> None:
    from streams.domain.crl import load_crl  # DER or PEM, as the verifier reads it

    try:
        load_crl(rec["crl_der"])
    except ValueError as exc:
        raise UnreadableReference(f"CRL of {key} is not a CRL: {exc}") from None


def trace_group_config(settings: Any) -> dict[str, Any]:
    """The tracing consumer's group settings (issue 10): static member id and short session, as the worker's.

    Without them a restarted worker's tracer waits for the killed one's session
    (librdkafka's default 45 s) before its reference partitions are traced again.
    """
    instance_id = settings.group_instance_id(settings.web_port)
    return {**({"group.instance.id": instance_id} if instance_id else {}),
            "session.timeout.ms": int(settings.session_timeout_seconds * 1000),
            "heartbeat.interval.ms": int(settings.heartbeat_seconds * 1000)}


# ------------------------------------------------------------------ CRL history: never rolled back
class CrlRank(NamedTuple):
    """Where a CRL stands in its issuer's history: its scope, and how new it is within that scope."""

    scope: tuple[bytes, bytes, bytes, bool]  # issuer name, signing key id, issuingDistributionPoint, delta
    number: int | None  # cRLNumber
    this_update: datetime
    digest: str  # SHA-256 of the DER: the CRL's identity

    def newer_than(self, other: CrlRank) -> bool:
        """A higher CRL number; without numbers on both, a later thisUpdate (RFC 5280 5.2.3)."""
        if self.number is not None and other.number is not None:
            return self.number > other.number
        return self.this_update > other.this_update


def crl_rank(crl: x509.CertificateRevocationList) -> CrlRank:
    """The scope and rank of ``crl``.

    The scope tells which CRLs replace each other: the same issuer name, the
    same signing key (a CA's CRLs under its old and its new key are two
    series, each numbered on its own), the same issuingDistributionPoint
    (partition, reasons, indirect) and complete vs. delta.
    """
    def ext(cls: type) -> Any:
        try:
            return crl.extensions.get_extension_for_class(cls).value
        except x509.ExtensionNotFound:
            return None

    aki = ext(x509.AuthorityKeyIdentifier)
    idp = ext(x509.IssuingDistributionPoint)
    number = ext(x509.CRLNumber)
    scope = (crl.issuer.public_bytes(), (aki.key_identifier or b"") if aki is not None else b"",
             idp.public_bytes() if idp is not None else b"", ext(x509.DeltaCRLIndicator) is not None)
    der = crl.public_bytes(Encoding.DER)
    return CrlRank(scope, number.crl_number if number is not None else None, crl.last_update_utc,
                   hashlib.sha256(der).hexdigest())


def crl_record_key(crl: x509.CertificateRevocationList) -> str:
    """The ``pki.crl`` key of one CRL: issuer, CRL number (or thisUpdate) and SHA-256 of its DER.

    One key per distinct CRL, so compaction only collapses re-publications of
    the same CRL and can never drop the CRL in force for a later record of
    the same issuer (a forged or an older one) that the workers refuse.
    """
    rank = crl_rank(crl)
    at = f"number {rank.number}" if rank.number is not None else f"thisUpdate {rank.this_update:%Y-%m-%dT%H:%M:%SZ}"
    return f"{crl.issuer.rfc4514_string()} | {at} | sha256 {rank.digest}"


class CrlHistory:
    """The CRL in force per scope, and what was decided about every CRL seen, whatever order they come in.

    A CRL is offered to the verifier only if it is newer than the one in
    force for its scope (:meth:`CrlRank.newer_than`), and becomes the one in
    force only if the verifier installs it. So an older or a refused record,
    read before or after the current one, after compaction or at a restart
    (every worker reads the whole topic), never displaces it.
    """

    def __init__(self) -> None:
        self._in_force: dict[tuple[bytes, bytes, bytes, bool], CrlRank] = {}
        self._decided: dict[str, str] = {}  # digest -> "installed" | "superseded" | "refused: <why>"

    def decided(self, rank: CrlRank) -> str | None:
        """What became of this CRL when it was first seen (None: not seen yet)."""
        return self._decided.get(rank.digest)

    def supersedes(self, rank: CrlRank) -> bool:
        current = self._in_force.get(rank.scope)
        return current is None or rank.newer_than(current)

    def in_force(self, rank: CrlRank) -> CrlRank | None:
        return self._in_force.get(rank.scope)

    def decide(self, rank: CrlRank, verdict: str) -> None:
        self._decided[rank.digest] = verdict
        if verdict == "installed":
            self._in_force[rank.scope] = rank


class ReferenceFeed(threading.Thread):
    """Reads ``pki.crl`` and ``registrants`` whole, forever, into a queue of updates.

    With an ``emitter`` it also traces unusable records, once across all workers
    (see the module docstring); ``trace_group`` is the consumer group that
    shares that duty and must be the same for every worker of the application.
    """

    TOPICS = (t.CRL, t.REGISTRANTS)

    def __init__(self, bootstrap: str, codec: AvroCodec | None = None, *, emitter: Emitter | None = None,
                 trace_group: str = "csos-som-reference-trace",
                 trace_config: Mapping[str, Any] | None = None) -> None:
        super().__init__(name="reference-feed", daemon=True)
        self.bootstrap = bootstrap
        self.codec = codec or default_codec()
        self.emitter = emitter
        self.trace_group = trace_group
        #: Extra librdkafka settings of the tracing group consumer, e.g. ``trace_group_config(settings)``.
        self.trace_config = dict(trace_config or {})
        self.updates: queue.Queue[Update] = queue.Queue()
        self.caught_up = threading.Event()
        self.stopping = threading.Event()
        self.errors = 0
        self.dead_lettered = 0
        # Freshness barrier: the next offset this worker's copy has read (and queued) per partition.
        self._position: dict[tuple[str, int], int] = {}
        self._progress = threading.Condition()
        self._admin: AdminClient | None = None

    def _consumer(self) -> tuple[Consumer, dict[tuple[str, int], int]]:
        consumer = Consumer({
            "bootstrap.servers": self.bootstrap,
            "group.id": f"reference-feed-{uuid.uuid4()}",  # required by librdkafka; never committed
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            **client_config(),
        }, logger=logging.getLogger("connectors.sources.reference_data.librdkafka"))
        metadata = consumer.list_topics(timeout=30)
        partitions, ends = [], {}
        for topic in self.TOPICS:
            if topic not in metadata.topics:
                raise RuntimeError(f"topic {topic} is missing; run `csos topics`")
            for p in metadata.topics[topic].partitions:
                partitions.append(TopicPartition(topic, p, OFFSET_BEGINNING))
                low, high = _watermarks(consumer, TopicPartition(topic, p))
                self._advance(topic, p, low)
                if high > low:
                    ends[(topic, p)] = high
        consumer.assign(partitions)
        return consumer, ends

    def _tracer(self) -> Consumer | None:
        """The group consumer that traces unusable records, or None without an emitter."""
        if self.emitter is None:
            return None
        consumer = Consumer({
            "bootstrap.servers": self.bootstrap,
            "group.id": self.trace_group,
            "auto.offset.reset": "earliest",  # a group's first member traces what is already there
            "enable.auto.commit": False,
            **client_config(),
            **self.trace_config,
        }, logger=logging.getLogger("connectors.sources.reference_data.librdkafka"))
        consumer.subscribe(list(self.TOPICS))
        return consumer

    def run(self) -> None:
        consumer, behind = self._consumer()
        tracer = self._tracer()
        if not behind:
            self.caught_up.set()
        try:
            while not self.stopping.is_set():
                # Batches from both consumers, and no waiting on the tracer while the worker's own copy is
                # still behind: catching up must cost the records' reading, not a wait per record.
                if tracer is not None:
                    self._trace_batch(tracer, timeout=0.0 if behind else 0.25)
                for msg in consumer.consume(num_messages=500, timeout=0.5 if tracer is None else 0.25):
                    self._read(msg, behind)
        finally:
            consumer.close()
            if tracer is not None:
                tracer.close()

    def _read(self, msg: Any, behind: dict[tuple[str, int], int]) -> None:
        """Apply one message of the worker's own copy and note when every partition has been read."""
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:
                self._advance(msg.topic(), msg.partition(), msg.offset())  # the offset the partition ends at
                behind.pop((msg.topic(), msg.partition()), None)
                if not behind:
                    self.caught_up.set()
            else:
                log.warning("reference feed: %s", msg.error())
            return
        self._queue(msg)
        self._advance(msg.topic(), msg.partition(), msg.offset() + 1)  # after queueing: drained with it
        if behind.get((msg.topic(), msg.partition()), -1) <= msg.offset() + 1:
            behind.pop((msg.topic(), msg.partition()), None)
            if not behind:
                self.caught_up.set()

    def _queue(self, msg: Any) -> None:
        """Every worker's copy: usable records are applied, unusable ones only logged (the tracer traces them)."""
        try:
            key, record = read_reference(self.codec, msg.topic(), msg.key(), msg.value())
        except UnreadableReference as exc:
            self.errors += 1
            log.error("unusable %s record at %d/%d, not applied: %s", msg.topic(), msg.partition(),
                      msg.offset(), exc)
            return
        self.updates.put(Update(msg.topic(), key, record))

    def _trace_batch(self, tracer: Consumer, timeout: float = 0.25) -> None:
        """Trace what this worker's share of the partitions holds, then commit so it is never traced again."""
        messages = []
        for m in tracer.consume(num_messages=500, timeout=timeout):
            if m.error():
                log.warning("reference trace: %s", m.error())
            else:
                messages.append(m)
        if not messages:
            return
        first: dict[tuple[str, int], int] = {}
        last: dict[tuple[str, int], int] = {}
        for msg in messages:
            tp = (msg.topic(), msg.partition())
            first.setdefault(tp, msg.offset())
            last[tp] = msg.offset()
            self.trace(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), _timestamp(msg))
        try:
            self.emitter.publisher.flush()  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - read the batch again; its dead letters' ids repeat
            log.error("reference dead letters not delivered, retrying: %s", exc)
            for (topic, p), offset in first.items():
                tracer.seek(TopicPartition(topic, p, offset))
            return
        try:
            tracer.commit(offsets=[TopicPartition(topic, p, o + 1) for (topic, p), o in last.items()],
                          asynchronous=False)
        except KafkaException as exc:  # e.g. a rebalance: the partition's next owner looks again (same ids)
            log.warning("reference trace offsets not committed: %s", exc)

    def trace(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
              at: datetime | None = None) -> bool:
        """Dead-letter one message of this worker's share if it is unusable; hand a CRL on for judgement.

        Returns whether the message was dead-lettered. Called for each message of
        the tracing consumer only, so each record is traced by one worker.
        """
        try:
            text, record = read_reference(self.codec, topic, key, value)
        except UnreadableReference as exc:
            assert self.emitter is not None
            self.emitter.dead_letter(STAGE, topic, partition, offset, key, value or b"", str(exc),
                                     dead_letter_id=dead_letter_id(topic, partition, offset), failed_at=at)
            self.dead_lettered += 1
            return True
        if topic == t.CRL and record is not None:  # only the verifier can judge a CRL: its copy, marked
            self.updates.put(Update(topic, text, record, Trace(partition, offset)))
        return False

    # ------------------------------------------------------------------ freshness barrier
    def _advance(self, topic: str, partition: int, next_offset: int) -> None:
        """Note that everything before ``next_offset`` of the partition is read and queued."""
        with self._progress:
            if next_offset > self._position.get((topic, partition), -1):
                self._position[(topic, partition)] = next_offset
                self._progress.notify_all()

    def end_offsets(self, timeout: float) -> dict[tuple[str, int], int]:
        """Where each partition of both topics ends now (read-committed): one ListOffsets request per broker.

        Asked after a batch of orders was appended, the answer covers every
        reference record published before any of them.
        """
        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self.bootstrap, **client_config()},
                                      logger=logging.getLogger("connectors.sources.reference_data.librdkafka"))
        with self._progress:
            known = list(self._position)
        if not known:  # the reader has not started: ask the cluster which partitions there are
            metadata = self._admin.list_topics(timeout=timeout)
            known = [(topic, p) for topic in self.TOPICS if topic in metadata.topics
                     for p in metadata.topics[topic].partitions]
        futures = self._admin.list_offsets({TopicPartition(topic, p): OffsetSpec.latest() for topic, p in known},
                                           isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=timeout)
        return {(tp.topic, tp.partition): f.result(timeout).offset for tp, f in futures.items()}

    def behind(self, ends: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """The partitions this worker's copy has not read up to ``ends`` yet, with its position."""
        with self._progress:
            return {tp: self._position.get(tp, -1) for tp, end in ends.items() if self._position.get(tp, -1) < end}

    def wait_until(self, ends: dict[tuple[str, int], int], timeout: float) -> bool:
        """Wait until every partition is read (and queued) up to ``ends``; False on timeout or a dead reader."""
        deadline = time.monotonic() + timeout
        with self._progress:
            while True:
                if all(self._position.get(tp, -1) >= end for tp, end in ends.items()):
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or not self.is_alive():
                    return False
                self._progress.wait(min(left, 0.5))

    def drain(self) -> list[Update]:
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


def _watermarks(consumer: Consumer, tp: TopicPartition, timeout: float = 30.0) -> tuple[int, int]:
    """A partition's (low, high) offsets, asked again while its leader is still being elected (new topics)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=timeout)
        except KafkaException as exc:
            err = exc.args[0]
            transient = err.retriable() or err.code() in (KafkaError.NOT_LEADER_FOR_PARTITION,
                                                          KafkaError.LEADER_NOT_AVAILABLE)
            if not transient or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _timestamp(msg: Any) -> datetime | None:
    """When the message was written (the broker's or producer's time), None if Kafka has none."""
    kind, ms = msg.timestamp()
    return datetime.fromtimestamp(ms / 1000, timezone.utc) if ms and ms > 0 else None
