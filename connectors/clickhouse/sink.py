"""Write verdicts, rejections, order lines, audit events, dead letters and the order archive to ClickHouse.

All access goes through clickhouse-connect, so the same code talks to the
embedded engine (``chdb:///dir``, zero setup) and to a ClickHouse server
(``http(s)://...``) with the same DDL from ``schemas/clickhouse/``.

Delivery from Kafka is at-least-once, so every write must be idempotent:
  * an exact retry of a batch carries the same ``insert_deduplication_token``
    (table + topic-partition + offset range) and is dropped by the server;
  * a batch re-formed differently after a restart collapses on each table's
    ReplacingMergeTree sorting key (order id, event id), so queries that need
    exact counts use ``FINAL`` (the ``csos sql`` docs say so).
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import struct
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Iterable

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError, DataError, OperationalError
from cryptography.hazmat.primitives import serialization

from streams.domain.cms import SignatureError, parse_signed_data
from streams.domain.order_document import FORMAT as CANONICAL_FORMAT
from streams.domain.x12_850 import FORMAT as X12_850_FORMAT, claimed_identifiers

from connectors.clickhouse.audit_chain import AUDIT_FIELDS, CHAIN_COLUMNS, AuditKey, ChainSealer, clickhouse_head_loader
from connectors.clickhouse.column_types import check_rows, partition_key

log = logging.getLogger(__name__)
_DER = serialization.Encoding.DER


@dataclass(frozen=True)
class SourceRecord:
    """A decoded message and where it came from (for dedup tokens).

    ``rows``: its rows per table when the caller already mapped it (the sink
    service does, to dead-letter what cannot be mapped); else mapped on write.
    ``key``, ``payload``: the message as received, kept to dead-letter it whole
    if ClickHouse refuses its rows.
    """

    topic: str
    partition: int
    offset: int
    schema: str
    record: dict[str, Any]
    rows: dict[str, list[list[Any]]] | None = None
    key: bytes | None = None
    payload: bytes = b""


TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "order_lines": (
        "order_id", "order_number", "purchaser_dea", "purchaser_name", "supplier_dea", "signed_at",
        "received_at", "verified_at", "signer_serial", "line_no", "ndc", "product_name", "strength",
        "package_quantity", "packages", "dosage_units", "schedule", "drug_family", "base_weight_g", "mme",
        "business_activity", "purchaser_state",  # the peer group, for the dashboards (017_dashboard_aggregates.sql)
    ),
    "verdicts": (
        "order_id", "order_number", "purchaser_dea", "verdict", "decided_at", "received_at", "signed_at",
        "model_version", "total_dosage_units", "fired_detectors", "summary",
    ),
    "verdict_reasons": (
        "order_id", "purchaser_dea", "decided_at", "verdict", "detector", "dimension", "drug_family",
        "value", "baseline", "threshold", "window", "fired", "explanation", "enforced",
    ),
    "rejections": (
        "order_id", "received_at", "rejected_at", "reason_code", "reason", "order_number",
        "purchaser_dea", "signer_subject", "checks",
    ),
    "pending_orders": (
        "order_id", "received_at", "parked_at", "reason_code", "reason", "order_number", "purchaser_dea",
    ),
    "audit_events": AUDIT_FIELDS + CHAIN_COLUMNS,  # chain columns appended by ChainSealer (audit_chain.py)
    "dead_letters": (
        "dead_letter_id", "failed_at", "stage", "source_topic", "source_partition", "source_offset",
        "reason", "payload_base64",
    ),
    "case_events": (
        "event_id", "order_id", "order_number", "purchaser_dea", "kind", "status", "version", "at", "held_at",
        "due_at", "escalated_at", "actor", "decision_id", "rationale", "evidence_notes", "error", "summary",
        "drug_families", "total_dosage_units",
    ),
    "cases": (
        "order_id", "order_number", "purchaser_dea", "status", "version", "updated_at", "held_at", "due_at",
        "escalated_at", "decided_by", "decision_id", "rationale", "evidence_notes", "summary", "drug_families",
        "total_dosage_units",
    ),
    "suspicious_order_reports": (
        "report_id", "order_id", "transaction_id", "order_form_number", "ordering_registrant_dea",
        "ordering_registrant_name", "reporting_registrant_dea", "date_received", "reported_at", "reported_by",
        "circumstances", "line_no", "ndc", "product_name", "strength", "unit", "package_quantity", "quantity",
        "dosage_units", "drug_family", "schedule",
    ),
    "shipments": (
        "shipment_id", "order_id", "order_number", "purchaser_dea", "supplier_dea", "shipped_at", "line_no", "ndc",
        "packages_shipped",
    ),
    "order_archive": (
        "order_id", "received_at", "source", "format", "document", "signature", "certificates",
        "signer_fingerprint", "order_number", "purchaser_dea",
    ),
}


def verdict_summary(verdict: dict[str, Any]) -> str:
    """One sentence an analyst or a warehouse clerk can read (deciding findings; others are in verdict_reasons)."""
    fired = [r for r in verdict["reasons"] if r["fired"] and r.get("enforced", True)]
    if not fired:
        return "Released: no detector fired." if verdict["verdict"] == "RELEASE" else "Held."
    return ("Held: " if verdict["verdict"] == "HOLD" else "Released: ") + " ".join(r["explanation"] for r in fired)


def rows_for(schema: str, rec: dict[str, Any]) -> dict[str, list[list[Any]]]:
    """Map one decoded message to rows per table."""
    if schema == "csos.orders.VerifiedOrder":
        head = [rec["order_id"], rec["order_number"], rec["purchaser_dea"], rec["purchaser_name"],
                rec["supplier_dea"], rec["signed_at"], rec["received_at"], rec["verified_at"], rec["signer_serial"]]
        return {"order_lines": [
            head + [ln["line_no"], ln["ndc"], ln["product_name"], ln["strength"], ln["package_quantity"],
                    ln["packages"], ln["dosage_units"], ln["schedule"], ln["drug_family"], ln["base_weight_g"], ln["mme"],
                    rec.get("business_activity") or "", rec.get("purchaser_state") or ""]
            for ln in rec["lines"]
        ]}
    if schema == "som.Verdict":
        # Only the detectors that decide; findings of the others are in verdict_reasons (enforced = false).
        fired = [r["detector"] for r in rec["reasons"] if r["fired"] and r.get("enforced", True)]
        return {
            "verdicts": [[rec["order_id"], rec["order_number"], rec["purchaser_dea"], rec["verdict"], rec["decided_at"],
                          rec["received_at"], rec["signed_at"], rec["model_version"], rec["total_dosage_units"],
                          sorted(set(fired)), verdict_summary(rec)]],
            "verdict_reasons": [
                [rec["order_id"], rec["purchaser_dea"], rec["decided_at"], rec["verdict"], r["detector"], r["dimension"],
                 r["drug_family"], r["value"], r["baseline"], r["threshold"], r["window"], r["fired"], r["explanation"],
                 r.get("enforced", True)]
                for r in rec["reasons"]
            ],
        }
    if schema == "csos.orders.Rejection":
        return {"rejections": [[
            rec["order_id"], rec["received_at"], rec["rejected_at"], rec["reason_code"], rec["reason"],
            rec["order_number"], rec["purchaser_dea"], rec["signer_subject"],
            [(c["check"], c["passed"], c["detail"]) for c in rec["checks"]],
        ]]}
    if schema == "csos.orders.PendingOrder":
        return {"pending_orders": [[rec[c] for c in TABLE_COLUMNS["pending_orders"]]]}
    if schema == "audit.AuditEvent":
        return {"audit_events": [[rec[c] for c in AUDIT_FIELDS]]}
    if schema == "dlq.DeadLetter":
        return {"dead_letters": [[
            rec["dead_letter_id"], rec["failed_at"], rec["stage"], rec["source_topic"], rec["source_partition"],
            rec["source_offset"], rec["reason"], base64.b64encode(rec["payload"]).decode("ascii"),
        ]]}
    if schema == "csos.orders.ReceivedOrder":
        return {"order_archive": [archive_row(rec)]}
    if schema == "som.CaseEvent":
        return case_rows(rec)
    if schema == "som.SuspiciousOrderReport":
        return {"suspicious_order_reports": [
            [ln[c] if c in ln else rec[c] for c in TABLE_COLUMNS["suspicious_order_reports"]] for ln in rec["lines"]]}
    if schema == "warehouse.ShipmentConfirmation":
        head = [rec[c] for c in TABLE_COLUMNS["shipments"][:6]]
        return {"shipments": [head + [ln["line_no"], ln["ndc"], ln["packages_shipped"]] for ln in rec["lines"]]}
    return {}


def checked_rows(schema: str, rec: dict[str, Any]) -> dict[str, list[list[Any]]]:
    """:func:`rows_for`, each value checked against its column's type in the DDL.

    Raises :class:`connectors.clickhouse.column_types.RowRejected` naming the table,
    column and value that the column cannot hold (a line number of 70,000 in a
    ``UInt16``, a negative count in a ``UInt32``): ClickHouse would refuse the
    whole insert for it, so the message is dead-lettered instead.
    """
    rows = rows_for(schema, rec)
    for table, table_rows in rows.items():
        check_rows(table, TABLE_COLUMNS[table], table_rows)
    return rows


#: Case events that decide a case: the actor is who decided.
CLOSING_KINDS = frozenset({"RELEASED", "REPORTED", "CANCELLED"})
#: Case events that do not change the case: a refused decision, and decisions about the registrant made from it.
UNCHANGED_KINDS = frozenset({"REFUSED", "LIMIT_SET", "TERMINATED", "ONBOARDED"})


def case_rows(rec: dict[str, Any]) -> dict[str, list[list[Any]]]:
    """A ``case_events`` row, and unless the case is unchanged (:data:`UNCHANGED_KINDS`) a new ``cases`` version."""
    rows: dict[str, list[list[Any]]] = {"case_events": [[rec[c] for c in TABLE_COLUMNS["case_events"]]]}
    if rec["kind"] not in UNCHANGED_KINDS:
        closing = rec["kind"] in CLOSING_KINDS
        rows["cases"] = [[
            rec["order_id"], rec["order_number"], rec["purchaser_dea"], rec["status"], rec["version"], rec["at"],
            rec["held_at"], rec["due_at"], rec["escalated_at"], rec["actor"] if closing else "",
            rec["decision_id"] if closing else None, rec["rationale"] if closing else "",
            rec["evidence_notes"] if closing else "", rec["summary"], rec["drug_families"], rec["total_dosage_units"],
        ]]
    return rows


# ---------------------------------------------------------------------------- the order archive
def archive_row(rec: dict[str, Any]) -> list[Any]:
    """An ``order_archive`` row (1311.55(c)(11)) for a ``csos.orders.ReceivedOrder``. Never raises.

    The document and signature are stored exactly as received. The certificates
    and the lookup fields (order number, purchaser DEA number) are read from
    the CMS and the signed content on a best-effort basis: an unreadable
    signature is archived with no certificates, an unreadable document with
    NULL lookup fields. This is not verification; the verdict is in the
    ``rejections``/``verdicts`` tables.
    """
    document = rec.get("document")
    signature = rec.get("signature") or b""
    certs: list[bytes] = []
    fingerprint = ""
    content: bytes | None = None
    try:
        certs, fingerprint, content = extract_certificates(document, signature)
    except Exception:  # noqa: BLE001 - hostile input: archive the bytes whatever happens
        log.warning("order %s: certificates not extracted from its signature", rec.get("order_id"), exc_info=True)
    order_number, purchaser_dea = lookup_fields(document if document is not None else content,
                                                rec.get("format") or CANONICAL_FORMAT)
    return [rec["order_id"], rec["received_at"], rec.get("source") or "", rec.get("format") or "",
            None if document is None else bytes(document), bytes(signature), certs, fingerprint,
            order_number, purchaser_dea]


def extract_certificates(document: bytes | None, signature: bytes) -> tuple[list[bytes], str, bytes | None]:
    """(DER of every certificate in the CMS, signer's first; SHA-256 hex of the signer's; attached content).

    The signer is identified with :func:`streams.domain.cms.parse_signed_data` (no
    signature check). When the CMS cannot be parsed that way (e.g. several
    signers, a detached signature received without its document), the
    certificates are read with asn1crypto in CMS order and the fingerprint is
    empty; when nothing can be read the list is empty.
    """
    # The received document first (what the verifier saw); then without it, which still reads an attached
    # signature whose embedded content differs; then with an empty one, which reads a detached signature
    # that arrived without its document.
    for detached in dict.fromkeys((document, None, b"")):
        try:
            parsed = parse_signed_data(signature, detached)
        except SignatureError:
            continue
        signer = parsed.signer_cert_der
        # cryptography only loads strict DER, so re-encoding a loaded certificate gives its exact bytes.
        others = [c.public_bytes(_DER) for c in parsed.other_certs]
        attached = None if parsed.detached else parsed.content
        return [signer] + [d for d in others if d != signer], hashlib.sha256(signer).hexdigest(), attached
    try:
        from asn1crypto import cms as asn1_cms

        sd = asn1_cms.ContentInfo.load(bytes(signature))["content"]
        return [c.chosen.dump() for c in (sd["certificates"] or ()) if c.name == "certificate"], "", None
    except Exception:  # noqa: BLE001 - not CMS at all
        return [], "", None


def lookup_fields(content: bytes | None, fmt: str = CANONICAL_FORMAT) -> tuple[str | None, str | None]:
    """(order number, purchaser DEA number) from the signed content, best effort; NULLs if unreadable.

    Not validated (the verdict is in ``rejections``/``verdicts``): read directly, since a full parse of every
    order was the largest part of the sink's work per order.
    """
    if not content:
        return None, None
    if fmt == X12_850_FORMAT:  # the two elements, not a full parse (valid: the same values; defective: as claimed)
        number, dea = claimed_identifiers(content)
        return (number if number is not None and len(number) <= 64 else None,
                dea if dea is not None and len(dea) <= 64 else None)
    # The canonical JSON: a valid document's number and DEA number are its fields exactly as written (the parser
    # validates, never rewrites them), and a defective one is filed under the fields it claims; so no full parse.
    try:
        doc = json.loads(bytes(content).decode("utf-8"))
        number = doc.get("order_number") if isinstance(doc, dict) else None
        purchaser = doc.get("purchaser") if isinstance(doc, dict) else None
        dea = purchaser.get("dea_number") if isinstance(purchaser, dict) else None
        return (number if isinstance(number, str) and len(number) <= 64 else None,
                dea if isinstance(dea, str) and len(dea) <= 64 else None)
    except Exception:  # noqa: BLE001
        return None, None


#: ClickHouse refuses an insert block spanning more partitions than ``max_partitions_per_insert_block``
#: (100 by default): the sink splits a batch so that no insert spans more than this many.
MAX_PARTITIONS_PER_INSERT = 90
#: ClickHouse error codes meaning the rows themselves cannot be inserted, so a retry can never succeed:
#: parse and type errors (6, 26, 27, 32, 38, 41, 53, 70, 72, 117), sizes (19, 128, 131, 190), out of range
#: (69, 321, 407), NULL in a plain column (349), a violated constraint (469), too many partitions (252, only
#: with "partitions" in the message: the same code also means "merges are behind", which passes).
DATA_ERROR_CODES = frozenset({6, 19, 26, 27, 32, 38, 41, 53, 69, 70, 72, 117, 128, 131, 190, 321, 349, 407, 469})
TOO_MANY_PARTS = 252
#: What clickhouse-connect raises while serializing a value its column type cannot take (e.g. -1 for UInt32).
CLIENT_DATA_ERRORS = (DataError, TypeError, ValueError, OverflowError, AttributeError, KeyError, IndexError,
                      struct.error)
Reject = Callable[[SourceRecord, Exception], None]


def is_data_error(exc: BaseException) -> bool:
    """True when ``exc`` is about the rows being written (retrying them fails forever); False for an outage.

    Connection refused, timeouts, an unavailable or overloaded server, and
    any server error not known to be about the data are not data errors: the
    caller keeps retrying those, since dead-lettering good messages during an
    outage would be worse than waiting.
    """
    if isinstance(exc, OperationalError):  # network, or a server error that survived the driver's retries
        return False
    code = getattr(exc, "code", None)
    if isinstance(exc, DatabaseError) and code is not None:
        if code == TOO_MANY_PARTS:
            return "partitions" in str(exc).lower()
        return code in DATA_ERROR_CODES
    if isinstance(exc, DatabaseError) and not isinstance(exc, DataError):
        return False  # e.g. a closed client: not the rows' fault
    return isinstance(exc, CLIENT_DATA_ERRORS)


_EVENT_ID = AUDIT_FIELDS.index("event_id")
_OCCURRED_AT = AUDIT_FIELDS.index("occurred_at")
#: Event ids per look-up query: about 50 bytes each, far below the 256 KiB a query may have.
LOOKUP_SLICE = 2000


def _quoted(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _day(value: Any) -> str:
    """The UTC date of a DateTime64 value (a datetime, naive = UTC, or epoch milliseconds), as ClickHouse's toDate."""
    if isinstance(value, datetime):
        value = value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc).date().isoformat()
    return datetime.fromtimestamp(int(value) / 1000, timezone.utc).date().isoformat()
#: How many sealed audit event ids the sink remembers between runs (older copies are looked up).
RECENT_EVENT_IDS = 200_000


class BoundedSet:
    """A set that forgets its oldest members beyond ``limit`` (insertion order)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: dict[str, None] = {}

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def update(self, items: Iterable[str]) -> None:
        for i in items:
            self._items[i] = None
        while len(self._items) > self.limit:
            del self._items[next(iter(self._items))]


#: (topic, partition) -> (first offset, last offset): the messages a batch was read from.
Extent = dict[tuple[str, int], tuple[int, int]]


def extent_of(offsets: Iterable[tuple[str, int, int]]) -> Extent:
    """Each partition's first and last offset among ``(topic, partition, offset)``."""
    extent: Extent = {}
    for topic, partition, offset in offsets:
        lo, hi = extent.get((topic, partition), (offset, offset))
        extent[(topic, partition)] = (min(lo, offset), max(hi, offset))
    return extent


def batch_id(extent: Extent) -> str:
    """A batch's id, a function of its offsets: a retry of the batch records the same one."""
    spans = ",".join(f"{t}:{p}:{lo}-{hi}" for (t, p), (lo, hi) in sorted(extent.items()))
    return hashlib.sha256(spans.encode()).hexdigest()[:32]


def kafka_order(item: SourceRecord) -> tuple[str, int, int]:
    return item.topic, item.partition, item.offset


@dataclass(frozen=True)
class BatchRecord:
    """A partition's latest batch, as ``sink_batches`` holds it."""

    batch_id: str
    partitions: int
    first_offset: int
    last_offset: int


@dataclass(frozen=True)
class OpenBatch:
    """A batch begun and not stored in full: see :meth:`ClickHouseSink.open_batches`."""

    batch_id: str
    extent: Extent
    complete: bool


class ClickHouseSink:
    """Batched, idempotent writer. Not thread-safe: call from one thread."""

    def __init__(self, client: Client, audit_key: AuditKey | None = None,
                 max_partitions: int = MAX_PARTITIONS_PER_INSERT) -> None:
        self.client = client
        self.rows_written: dict[str, int] = defaultdict(int)
        # Audit rows are hash-chained as written (HMAC-sealed with audit_key if one is configured).
        self.chains = ChainSealer(clickhouse_head_loader(client), audit_key)
        self.max_partitions = max_partitions
        self._partition_of: dict[str, Callable[[list[Any]], Hashable]] = {}
        #: Audit event ids sealed lately (a redelivered copy is recognised without a query).
        self._recent_event_ids: BoundedSet = BoundedSet(RECENT_EVENT_IDS)
        #: (topic, partition) -> highest offset stored in every table (``sink_progress``); None until read.
        self._stored: dict[tuple[str, int], int] | None = None
        #: (topic, partition) -> its latest batch as recorded in ``sink_batches``; None until read.
        self._batches: dict[tuple[str, int], BatchRecord] | None = None

    def forget(self) -> None:
        """Re-read what is stored before writing again (partitions were reassigned: another sink may have
        written meanwhile): the audit chains' heads, the ``sink_progress`` offsets and the ``sink_batches``."""
        self.chains.forget()
        self._stored = None
        self._batches = None

    def stored_offset(self, topic: str, partition: int) -> int:
        """The highest offset of ``topic``/``partition`` whose rows are all stored (-1: none)."""
        if self._stored is None:
            self._stored = {(t, int(p)): int(o) for t, p, o in self.client.query(
                "SELECT topic, partition, max(stored_offset) FROM sink_progress GROUP BY topic, partition").result_rows}
        return self._stored.get((topic, partition), -1)

    def drop_progress_beyond(self, topic: str, partition: int, end_offset: int) -> bool:
        """Forget the stored offset of a partition whose log now ends before it; True if there was one.

        ``sink_progress`` relies on a partition's offsets never going back. A topic deleted and re-created
        (or a new broker) against an old store starts again at 0: its messages would all sit "at or below"
        the old progress and be skipped as already stored, i.e. lost without a trace. A stored offset at or
        past the partition's end (``end_offset``, the next offset to be written) can only mean that, so the
        record is deleted (logged as an error) and the partition's messages are stored again; the worst left
        is the dashboards' aggregates counting an old copy, never a lost order.
        """
        stored = self.stored_offset(topic, partition)
        begun = self._latest_batches().get((topic, partition))
        beyond = max(stored, begun.last_offset if begun is not None else -1)
        if beyond < end_offset:
            return False
        log.error("sink_progress says %s[%d] was stored (or sink_batches, begun) up to offset %d, but the partition "
                  "ends at %d: the topic was re-created (or the broker is new) against an old store; its progress "
                  "is dropped and its messages are stored again", topic, partition, beyond, end_offset)
        for table in ("sink_progress", "sink_batches"):  # an old batch must not be replayed from the new topic
            self.client.command(f"ALTER TABLE {table} DELETE WHERE topic = %(t)s AND partition = %(p)s",
                                parameters={"t": topic, "p": partition}, settings={"mutations_sync": 2})
        if self._stored is not None:
            self._stored.pop((topic, partition), None)
        if self._batches is not None:
            self._batches.pop((topic, partition), None)
        return True

    def already_stored(self, item: SourceRecord) -> bool:
        """True for a message re-delivered after its batch was stored but not committed to Kafka (a crash
        between the two): its rows are in every table already, so writing them again would count it twice
        in the dashboards' aggregates, whose sums do not collapse copies as ``FINAL`` does on the tables."""
        return item.offset <= self.stored_offset(item.topic, item.partition)

    def _latest_batches(self) -> dict[tuple[str, int], BatchRecord]:
        if self._batches is None:
            self._batches = {(t, int(p)): BatchRecord(b, int(n), int(lo), int(hi)) for t, p, b, n, lo, hi in
                             self.client.query(
                "SELECT topic, partition, argMax(batch_id, last_offset), argMax(batch_partitions, last_offset), "
                "argMax(first_offset, last_offset), max(last_offset) FROM sink_batches "
                "GROUP BY topic, partition").result_rows}
        return self._batches

    def open_batches(self) -> list[OpenBatch]:
        """Batches begun (``sink_batches``) and not stored in full (``sink_progress``): a sink died mid-batch.

        Each is to be written again exactly as it was (:meth:`write` with its ``extent``), before anything
        after it, so that its inserts repeat their deduplication tokens. ``complete`` is False when a later
        batch has since overwritten one of its partitions' records (only a group of several sinks splitting
        its partitions can do that): it can no longer be re-formed exactly.
        """
        found: dict[str, tuple[int, Extent]] = {}
        for (topic, partition), rec in sorted(self._latest_batches().items()):
            found.setdefault(rec.batch_id, (rec.partitions, {}))[1][(topic, partition)] = (rec.first_offset,
                                                                                          rec.last_offset)
        return [OpenBatch(batch_id, extent, complete=len(extent) == partitions)
                for batch_id, (partitions, extent) in found.items()
                if any(hi > self.stored_offset(t, p) for (t, p), (_lo, hi) in extent.items())]

    def _record_batch(self, extent: Extent) -> None:
        """Remember, in ClickHouse, the batch about to be written (before its first insert; see 021)."""
        bid = batch_id(extent)
        rows = [[t, p, bid, len(extent), lo, hi] for (t, p), (lo, hi) in sorted(extent.items())]
        self.client.insert("sink_batches", list(zip(*rows)), column_oriented=True,
                           column_names=["topic", "partition", "batch_id", "batch_partitions", "first_offset",
                                         "last_offset"])
        latest = self._latest_batches()
        for (t, p), (lo, hi) in extent.items():
            latest[(t, p)] = BatchRecord(bid, len(extent), lo, hi)

    def _record_progress(self, extent: Extent) -> None:
        """Remember, in ClickHouse, the highest offset of each partition of a batch now stored in full."""
        highest = {key: hi for key, (_lo, hi) in extent.items() if hi > self.stored_offset(*key)}
        if not highest:
            return
        rows = [[t, p, o] for (t, p), o in sorted(highest.items())]
        self.client.insert("sink_progress", list(zip(*rows)), column_names=["topic", "partition", "stored_offset"],
                           column_oriented=True)
        stored = self._stored if self._stored is not None else {}
        for key, offset in highest.items():
            stored[key] = max(stored.get(key, -1), offset)
        self._stored = stored

    def write(self, batch: Iterable[SourceRecord], reject: Reject | None = None,
              extent: Extent | None = None) -> dict[str, int]:
        """Insert the batch's rows; return the rows written per table.

        ``extent``: the offsets the batch was read from, each partition's
        first and last (:func:`extent_of` the messages as fetched, before any
        was dead-lettered); by default those of ``batch``. It is recorded
        before the first insert (``sink_batches``) and becomes the stored
        progress after the last (``sink_progress``): a sink that dies in
        between writes exactly that batch again (:meth:`open_batches`).

        Messages are taken in Kafka order (topic, partition, offset), whatever
        order they came in, so the same messages always form the same runs and
        the same deduplication tokens. The batch is cut into runs whose rows span at most
        ``max_partitions`` partitions in every table, each written as one insert
        per table. Without ``reject`` any error propagates (the caller retries
        the batch). With it, a run that fails on a data error (:func:`is_data_error`)
        is bisected, keeping each message's rows together, down to the messages
        that fail alone; each of those is passed to ``reject`` and the rest are
        written. Runs and halves are written in Kafka order and the audit chain
        advances only after a run's audit rows are stored, so a refused audit
        event leaves no hole: the next one is sealed after the last stored one.
        An outage error propagates even with ``reject``.
        """
        fresh = []
        skipped = 0
        for item in batch:
            if self.already_stored(item):
                skipped += 1
            else:
                fresh.append(item)
        fresh.sort(key=kafka_order)
        if extent is None:
            extent = extent_of((item.topic, item.partition, item.offset) for item in fresh)
        items = []
        for item in fresh:
            if item.rows is None:
                try:
                    item = replace(item, rows=checked_rows(item.schema, item.record))
                except Exception as exc:  # noqa: BLE001 - one unmappable record is that record's problem
                    if reject is None:
                        raise
                    reject(item, exc)
                    continue
            items.append(item)
        if skipped:
            log.info("%d re-delivered messages skipped: already stored (sink_progress)", skipped)
        written: dict[str, int] = defaultdict(int)
        if items:
            self._record_batch(extent)
        for run in self._runs(items):
            self._write_isolating(run, reject, written)
        self._record_progress(extent)
        return dict(written)

    def _partition(self, table: str) -> Callable[[list[Any]], Hashable]:
        if table not in self._partition_of:
            self._partition_of[table] = partition_key(table, TABLE_COLUMNS[table])
        return self._partition_of[table]

    def _runs(self, items: list[SourceRecord]) -> Iterator[list[SourceRecord]]:
        """Consecutive runs of messages whose rows span at most ``max_partitions`` partitions per table."""
        run: list[SourceRecord] = []
        seen: dict[str, set[Hashable]] = defaultdict(set)
        for item in items:
            keys = {table: {self._partition(table)(r) for r in rows} for table, rows in (item.rows or {}).items()}
            if run and any(len(seen[table] | k) > self.max_partitions for table, k in keys.items()):
                yield run
                run, seen = [], defaultdict(set)
            run.append(item)
            for table, k in keys.items():
                seen[table] |= k
        if run:
            yield run

    def _write_isolating(self, records: list[SourceRecord], reject: Reject | None,
                         written: dict[str, int]) -> None:
        try:
            for table, n in self._write_run(records).items():
                written[table] += n
        except Exception as exc:  # noqa: BLE001
            if reject is None or not is_data_error(exc):
                raise
            if len(records) == 1:
                log.warning("ClickHouse refused %s from %s[%d]@%d: %s", records[0].schema, records[0].topic,
                            records[0].partition, records[0].offset, exc)
                reject(records[0], exc)
                return
            mid = len(records) // 2  # in order: the left half's audit events are sealed first
            self._write_isolating(records[:mid], reject, written)
            self._write_isolating(records[mid:], reject, written)

    def _stored_event_ids(self, batch: list[SourceRecord]) -> set[str]:
        """Which of the run's audit event ids are already sealed and stored.

        A worker that recovers from a crash publishes the outputs it recorded
        for an order again, byte for byte (issue 10), so the same audit event
        can arrive twice at different offsets. Sealing both would give the
        second its own place in the chain, and the table's merge (one row per
        event id) would later remove one of them: a gap in the chain. So an
        event id is sealed once; a copy is skipped. Recent ids are remembered
        here; older ones are looked up in ClickHouse, once per run.
        """
        day_of = {r[_EVENT_ID]: _day(r[_OCCURRED_AT])
                  for item in batch for r in (item.rows or {}).get("audit_events", ())}
        found = {i for i in day_of if i in self._recent_event_ids}
        unknown = sorted(set(day_of) - found)
        # In slices (a query is limited to 256 KiB), and restricted to the events' days: the sorting key starts
        # with toDate(occurred_at), so only those days' parts are read, not every event ever stored.
        for start in range(0, len(unknown), LOOKUP_SLICE):
            ids = unknown[start:start + LOOKUP_SLICE]
            days = ", ".join(sorted({f"'{day_of[i]}'" for i in ids}))
            listed = ", ".join(_quoted(i) for i in ids)
            found |= {r[0] for r in self.client.query(
                f"SELECT DISTINCT event_id FROM audit_events WHERE toDate(occurred_at) IN ({days}) "
                f"AND event_id IN ({listed})").result_rows}
        return found

    @staticmethod
    def _first_copies(rows: list[list[Any]], sealed: set[str]) -> list[list[Any]]:
        """The audit rows whose event id is not sealed yet (each id then counts as sealed for the run)."""
        out = []
        for row in rows:
            if row[_EVENT_ID] not in sealed:
                sealed.add(row[_EVENT_ID])
                out.append(row)
        return out

    def _write_run(self, batch: list[SourceRecord]) -> dict[str, int]:
        """One insert per table (the deduplication token is a function of the records: a retry repeats it)."""
        per_table: dict[str, list[list[Any]]] = defaultdict(list)
        ranges: dict[str, dict[tuple[str, int], list[int]]] = defaultdict(dict)
        self.chains.begin()
        sealed = self._stored_event_ids(batch)
        for item in batch:
            mapped = item.rows if item.rows is not None else rows_for(item.schema, item.record)
            for table, rows in mapped.items():
                if table == "audit_events":  # sealed in Kafka order; [] for an event already stored
                    rows = self.chains.seal_rows(item.topic, item.partition, item.offset,
                                                 self._first_copies(rows, sealed))
                per_table[table].extend(rows)
                span = ranges[table].setdefault((item.topic, item.partition), [item.offset, item.offset])
                span[0] = min(span[0], item.offset)
                span[1] = max(span[1], item.offset)
        written = {}
        for table, rows in per_table.items():
            if not rows:
                continue
            token = table + "|" + ",".join(
                f"{t}:{p}:{lo}-{hi}" for (t, p), (lo, hi) in sorted(ranges[table].items()))
            # Column-oriented: one C-level transpose here instead of the driver's row-by-row one.
            self.client.insert(table, list(zip(*rows)), column_names=list(TABLE_COLUMNS[table]),
                               column_oriented=True, settings=insert_settings(token))
            if table == "audit_events":
                self.chains.commit()
                self._recent_event_ids.update(r[_EVENT_ID] for r in rows)
            self.rows_written[table] += len(rows)
            written[table] = len(rows)
        return written


def insert_settings(token: str) -> dict[str, Any]:
    """An insert's settings: its deduplication token, carried to the materialized views too.

    A retried insert (same token) is dropped by its table, but its block still reaches the table's views
    (the dashboards' aggregates, 017); with ``deduplicate_blocks_in_dependent_materialized_views`` each
    view's block gets a token derived from this one, and the aggregate tables' deduplication window (020)
    drops the copy. Tested in ``tests/unit/test_dashboard_aggregates.py``.
    """
    return {"insert_deduplication_token": token, "deduplicate_blocks_in_dependent_materialized_views": 1}


def to_json_rows(columns: list[str], rows: list[tuple]) -> str:
    return json.dumps({"columns": columns, "rows": [list(r) for r in rows]}, default=str)
