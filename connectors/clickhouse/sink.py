"""Write verdicts, rejections, order lines, audit events, dead letters and the order archive to ClickHouse.

All access goes through clickhouse-connect, so the same code talks to the
embedded engine (``chdb:///dir``, zero setup) and to a ClickHouse server
(``http(s)://...``) with the same DDL from ``schemas/clickhouse/``.

Delivery from Kafka is at-least-once, so every write must be idempotent:
  * an exact retry of a batch carries the same ``insert_deduplication_token``
    (table + topic-partition + offset range) and is dropped by the server;
  * a batch cut short by a crash is written again exactly as it was, so with
    the same tokens (``connectors.clickhouse.progress``: the batch's offsets are
    recorded before its first insert), and a message re-delivered after its
    batch was stored is skipped;
  * should a batch still be re-formed differently, its rows collapse on each
    table's ReplacingMergeTree sorting key (order id, event id), so queries that
    need exact counts use ``FINAL`` (the ``csos sql`` docs say so).

What each message becomes (its rows per table) is ``connectors.clickhouse.rows``.
"""
from __future__ import annotations

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

from connectors.clickhouse.audit_chain import AUDIT_FIELDS, AuditKey, ChainSealer, clickhouse_head_loader
from connectors.clickhouse.column_types import partition_key
from connectors.clickhouse.progress import Extent, SinkProgress, extent_of
from connectors.clickhouse.rows import TABLE_COLUMNS, checked_rows, rows_for

log = logging.getLogger(__name__)


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


def kafka_order(item: SourceRecord) -> tuple[str, int, int]:
    return item.topic, item.partition, item.offset


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
        #: What is stored and what was begun, per topic partition (``sink_progress``, ``sink_batches``).
        self.progress = SinkProgress(client)

    def forget(self) -> None:
        """Re-read what is stored before writing again (partitions were reassigned: another sink may have
        written meanwhile): the audit chains' heads, and the progress and batch records."""
        self.chains.forget()
        self.progress.forget()

    def already_stored(self, item: SourceRecord) -> bool:
        """True for a message re-delivered after its batch was stored but not committed to Kafka (a crash
        between the two): its rows are in every table already, so writing them again would count it twice
        in the dashboards' aggregates, whose sums do not collapse copies as ``FINAL`` does on the tables."""
        return item.offset <= self.progress.stored_offset(item.topic, item.partition)

    def write(self, batch: Iterable[SourceRecord], reject: Reject | None = None,
              extent: Extent | None = None) -> dict[str, int]:
        """Insert the batch's rows; return the rows written per table.

        ``extent``: the offsets the batch was read from, each partition's
        first and last (:func:`extent_of` the messages as fetched, before any
        was dead-lettered); by default those of ``batch``. It is recorded
        before the first insert (``sink_batches``) and becomes the stored
        progress after the last (``sink_progress``): a sink that dies in
        between writes exactly that batch again (``SinkProgress.open_batches``).

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
            self.progress.record_batch(extent)
        for run in self._runs(items):
            self._write_isolating(run, reject, written)
        self.progress.record_stored(extent)
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
