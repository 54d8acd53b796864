"""The topic catalogue: every topic's name, Avro record, key, partitions and config, in one place.

The topics are the pipeline's public interface to upstream and downstream systems, so their contract is
written once, here: ``csos topics`` creates them from it (``connectors.kafka.topics``), the agents name
them by its constants (``catalogue.RECEIVED``, ...), ``Emitter.send`` refuses a record of another schema
than the catalogue's for the topic, the ClickHouse sink subscribes to the topics marked ``sunk`` and
decodes each with its schema, and README "Topics and schemas" lists the same table. Pure data: no Kafka
client is imported here, so every layer above may read it.

Partition counts matter beyond throughput: Faust tables are co-partitioned with the stream that updates
them, and Faust creates changelog topics with ``topic_partitions`` partitions, so ``partitions`` ``None``
(the default for every topic) means ``CSOS_PARTITIONS``, the Faust app's ``topic_partitions`` too.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

RECEIVED = "csos.orders.received"
VERIFIED = "csos.orders.verified"
REJECTED = "csos.orders.rejected"
PENDING = "csos.orders.pending"
VERDICTS = "som.verdicts"
HOLD = "som.hold"
RELEASE = "som.release"
AUDIT = "audit.events"
DLQ = "dlq"
CRL = "pki.crl"
REGISTRANTS = "registrants"
DECISIONS = "som.decisions"
CASES = "som.cases"
CLEARED = "som.cleared"
REPORTS = "som.reports"
SHIPMENTS = "warehouse.shipments"

DEFAULT_PARTITIONS = 4
_DAY_MS = 24 * 60 * 60 * 1000
# Kafka is the transport, ClickHouse the long-term store: 30 days on the topic
# is enough to replay or re-derive anything the sink has not yet persisted.
_RETENTION_30D = str(30 * _DAY_MS)
_RETENTION_2Y = str(2 * 366 * _DAY_MS)


@dataclass(frozen=True)
class TopicSpec:
    """How one topic looks on the cluster and what flows through it.

    ``partitions`` ``None`` means "the catalogue default" (``CSOS_PARTITIONS``, 4); ``config`` holds
    topic-level overrides (string values, as Kafka expects them); ``schema`` is the full name of the Avro
    record every message carries (``schemas/avro``); ``key`` says what the message key is; ``sunk``: the
    ClickHouse sink stores the topic.
    """

    name: str
    partitions: int | None = None
    config: Mapping[str, str] = field(default_factory=dict)
    doc: str = ""
    schema: str = ""
    key: str = ""
    sunk: bool = False


def _delete(retention_ms: str = _RETENTION_30D) -> dict[str, str]:
    return {"cleanup.policy": "delete", "retention.ms": retention_ms}


def _compact() -> dict[str, str]:
    # Compacted topics keep the latest value per key forever (until a null
    # tombstone); every record on them must have a key.
    return {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1"}


TOPICS: list[TopicSpec] = [
    TopicSpec(
        RECEIVED, schema="csos.orders.ReceivedOrder", key="purchaser DEA number, as claimed by the sender",
        # The broker stamps each record with its append time: the one receipt time a sender cannot
        # write (the verifier overrules a stated received_at far from it, streams.pipeline.agents.verify).
        config={**_delete(), "message.timestamp.type": "LogAppendTime"}, sunk=True,  # -> order_archive
        doc="Signed CSOS orders (electronic DEA Form 222) as received, before any check.",
    ),
    TopicSpec(
        VERIFIED, schema="csos.orders.VerifiedOrder", key="purchaser DEA number, as signed", config=_delete(), sunk=True,
        doc="Orders whose signature, certificate chain, revocation and registrant checks passed.",
    ),
    TopicSpec(
        REJECTED, schema="csos.orders.Rejection", key="order id", config=_delete(), sunk=True,
        doc="Orders that failed verification, with the reasons.",
    ),
    TopicSpec(
        PENDING, schema="csos.orders.PendingOrder", key="order id", config=_delete(), sunk=True,
        doc="Orders parked until reference data (CRL, registrant, product) arrives; re-verified then.",
    ),
    TopicSpec(
        VERDICTS, schema="som.Verdict", key="order id", config=_delete(), sunk=True,
        doc="Suspicious-order-monitoring verdict for every verified order (score, rules hit).",
    ),
    TopicSpec(
        HOLD, schema="som.Hold", key="order id", config=_delete(),
        doc="Orders held as suspicious; they must not ship until reviewed.",
    ),
    TopicSpec(
        RELEASE, schema="som.Release", key="order id", config=_delete(),
        doc="Orders cleared to ship: not suspicious, or released by a reviewer.",
    ),
    TopicSpec(
        AUDIT, schema="audit.AuditEvent", key="order id (or event id)", config=_delete(), sunk=True,
        doc="Append-only audit trail of every decision, sunk to ClickHouse.",
    ),
    TopicSpec(
        DLQ, schema="dlq.DeadLetter", key="the original message's key", config=_delete(), sunk=True,
        doc="Records no stage could process (undecodable, schema errors), for investigation.",
    ),
    TopicSpec(
        DECISIONS, schema="som.Decision", key="order id", config=_delete(_RETENTION_2Y),
        doc="Analysts' due-diligence decisions on held orders (release, report, cancel), with actor and rationale.",
    ),
    TopicSpec(
        CASES, schema="som.CaseEvent", key="order id", config=_delete(_RETENTION_2Y), sunk=True,
        doc="Case lifecycle per held order: opened, escalated when the due-diligence clock lapses, closed, refused.",
    ),
    TopicSpec(
        CLEARED, schema="som.ClearedOrder", key="purchaser DEA number", config=_delete(),
        doc="Held orders released after due diligence, keyed by purchaser DEA, for the monitor to learn.",
    ),
    TopicSpec(
        REPORTS, schema="som.SuspiciousOrderReport", key="order id", config=_delete(_RETENTION_2Y), sunk=True,
        doc="Suspicious order reports for DEA, one per reported case.",
    ),
    TopicSpec(
        SHIPMENTS, schema="warehouse.ShipmentConfirmation", key="order id", config=_delete(), sunk=True,
        doc="Shipment confirmations from the warehouse: the source of the CSOS fill report (1305.29).",
    ),
    TopicSpec(
        CRL, schema="pki.CrlPublished", key="one per distinct CRL (issuer, number, digest)", config=_compact(),
        sunk=True,  # -> crl_archive: the revocation evidence behind each decision
        doc="Every certificate revocation list published, one key per distinct CRL (issuer, number, digest).",
    ),
    TopicSpec(
        REGISTRANTS, schema="csos.registry.Registrant", key="DEA registration number", config=_compact(),
        doc="Latest DEA registrant record per registration number, compacted state.",
    ),
]

BY_NAME: Mapping[str, TopicSpec] = {spec.name: spec for spec in TOPICS}


def schema_of(topic: str) -> str | None:
    """The Avro record a catalogue topic carries; None for a topic the catalogue does not know (a test's)."""
    spec = BY_NAME.get(topic)
    return spec.schema if spec else None


def sunk_topics() -> dict[str, str]:
    """Topic -> schema of every topic the ClickHouse sink stores."""
    return {spec.name: spec.schema for spec in TOPICS if spec.sunk}
