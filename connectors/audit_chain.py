"""Tamper-evident audit trail: audit events hash-chained as the sink writes them, and the check.

What is chained. One chain per partition of ``audit.events`` (``chain`` =
``"audit.events/<partition>"``): Kafka has already fixed a total order there,
so the sink seals events in exactly that order, needs no coordination between
producers (workers, the sink, CLI tools all emit audit events), and several
sinks on a ClickHouse server never share a chain (a partition has one owner).

How. Each event gets a dense sequence number ``chain_seq`` (0, 1, 2, ... per
chain) and::

    event_hash = SHA-256(prev_hash || canonical(chain, chain_seq, chain_offset, event fields))

where ``prev_hash`` is the previous event's ``event_hash`` (:data:`GENESIS`
for seq 0) and ``chain_offset`` is the event's Kafka offset. The sequence is
dense rather than the Kafka offset itself because offsets need not be: a
message on ``audit.events`` the sink cannot decode is dead-lettered, not
written, and transaction markers or a recreated topic also leave holes. With a
dense counter a missing ``chain_seq`` always means a row that was written and
is gone; the offset is still sealed, so every row can be matched to Kafka.

Canonical bytes are a compact JSON array of the stored values (``null`` and
``""`` stay distinct; ``occurred_at`` as integer epoch milliseconds, which is
exactly what ``DateTime64(3, 'UTC')`` stores: the sink inserts that integer,
so no driver time-zone conversion can differ between writing and reading).

Chain heads survive restarts: when the sink meets a chain first (at start, and
again after every partition assignment) it reads the last sealed
``(seq, hash, offset)`` from ClickHouse. An event at or below the head's
offset is a redelivery (at-least-once) and is skipped, which also makes the
sealing idempotent: a retried batch re-seals to identical rows. Heads advance
only after the insert succeeds (:meth:`ChainSealer.commit`).

What the check proves (``csos audit verify``, :func:`verify_store`): every
stored event is the one sealed (an *edit* breaks its hash), nothing was
removed from inside a chain (*gap*), events are in the order they were sealed
(*reorder*: a row whose seal holds but whose ``prev_hash`` is not its
predecessor's hash, or a row that holds an event sealed at another seq), and no
seq holds two different events (*duplicate*). What it cannot prove alone: the
hash is unkeyed, so someone able to rewrite the whole tail of a chain
(recomputing every later hash) or to drop its newest events leaves a
consistent chain. Record the head hashes the check prints (``--json``) outside
ClickHouse and pass them back with ``--anchors``: a rewritten or truncated
chain then no longer matches its anchor.
"""
from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from streams.config import Settings

#: ``prev_hash`` of the first event (seq 0) of every chain.
GENESIS = "0" * 64
#: The audit event's own fields, in the order they are stored and canonicalized.
AUDIT_FIELDS: tuple[str, ...] = (
    "event_id", "occurred_at", "stage", "action", "order_id", "purchaser_dea", "outcome", "detail", "actor",
)
#: Columns the sink adds to every ``audit_events`` row (schemas/clickhouse/010_audit_chain.sql).
CHAIN_COLUMNS: tuple[str, ...] = ("chain", "chain_seq", "chain_offset", "prev_hash", "event_hash")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)
_OCCURRED = AUDIT_FIELDS.index("occurred_at")


# ------------------------------------------------------------------------------------------ sealing
def chain_id(topic: str, partition: int) -> str:
    """The chain of one topic partition: Kafka's order within it is the chain's order."""
    return f"{topic}/{partition}"


def epoch_ms(value: datetime | int) -> int:
    """Milliseconds since the epoch, as ``DateTime64(3, 'UTC')`` stores them (naive datetimes are UTC)."""
    if isinstance(value, int):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return (value - _EPOCH) // _MS


def canonical(chain: str, seq: int, offset: int, event: Mapping[str, Any]) -> bytes:
    """The bytes sealed for one event: stable across the ClickHouse write/read round trip."""
    values: list[Any] = [chain, int(seq), int(offset)]
    for name in AUDIT_FIELDS:
        v = event[name]
        values.append(epoch_ms(v) if name == "occurred_at" else v)
    return json.dumps(values, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def seal(prev_hash: str, chain: str, seq: int, offset: int, event: Mapping[str, Any]) -> str:
    """``SHA-256(prev_hash || canonical(...))`` as hex: the event's hash, which the next event carries."""
    return hashlib.sha256(bytes.fromhex(prev_hash) + canonical(chain, seq, offset, event)).hexdigest()


@dataclass(frozen=True)
class Head:
    """The last sealed event of a chain."""

    seq: int
    hash: str
    offset: int


class ChainSealer:
    """Seals audit rows in the sink, one chain per source partition. Not thread-safe (the sink's one writer).

    ``load_head(chain)`` returns the last sealed event stored for a chain (or
    None); it is called the first time a chain is met and again after
    :meth:`forget` (on every partition assignment, since another sink may have
    extended the chain meanwhile).
    """

    def __init__(self, load_head: Callable[[str], Head | None]) -> None:
        self.load_head = load_head
        self.heads: dict[str, Head | None] = {}
        self.pending: dict[str, Head] = {}  # advanced by the batch being written, not yet stored

    def begin(self) -> None:
        """Start a batch: forget what an earlier, failed insert had sealed (it will be re-sealed identically)."""
        self.pending.clear()

    def seal_rows(self, topic: str, partition: int, offset: int, rows: list[list[Any]]) -> list[list[Any]]:
        """``audit_events`` rows of one message with their chain columns appended; [] for a redelivery."""
        chain = chain_id(topic, partition)
        if chain not in self.heads:
            self.heads[chain] = self.load_head(chain)
        head = self.pending.get(chain) or self.heads[chain]
        if head is not None and offset <= head.offset:
            return []  # already sealed and stored (at-least-once redelivery)
        out = []
        for row in rows:
            row = list(row)
            row[_OCCURRED] = epoch_ms(row[_OCCURRED])  # stored exactly as sealed
            seq = head.seq + 1 if head is not None else 0
            prev = head.hash if head is not None else GENESIS
            digest = seal(prev, chain, seq, offset, dict(zip(AUDIT_FIELDS, row)))
            out.append(row + [chain, seq, offset, prev, digest])
            head = Head(seq, digest, offset)
        if head is not None:
            self.pending[chain] = head
        return out

    def commit(self) -> None:
        """The batch's audit rows are stored: its heads are now the chains' heads."""
        self.heads.update(self.pending)
        self.pending.clear()

    def forget(self) -> None:
        """Re-read every head from ClickHouse before sealing again (partitions were reassigned)."""
        self.heads.clear()
        self.pending.clear()


def _quote(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def clickhouse_head_loader(client: Any) -> Callable[[str], Head | None]:
    """A ``load_head`` reading the last sealed event of a chain from ``audit_events`` (no FINAL: raw rows)."""

    def load(chain: str) -> Head | None:
        rows = client.query(
            "SELECT chain_seq, event_hash, chain_offset FROM audit_events "
            f"WHERE chain = {_quote(chain)} ORDER BY chain_seq DESC, chain_offset DESC LIMIT 1").result_rows
        return Head(int(rows[0][0]), rows[0][1], int(rows[0][2])) if rows else None

    return load


# ------------------------------------------------------------------------------------------ verification
@dataclass(frozen=True)
class ChainRow:
    """One stored audit row as the verifier reads it (``event`` keyed by :data:`AUDIT_FIELDS`)."""

    chain: str
    seq: int
    offset: int
    prev_hash: str
    event_hash: str
    event: Mapping[str, Any]

    def sealed_at(self, seq: int, prev_hash: str, offset: int) -> str:
        """This row's event sealed at another position (to recognise a moved event)."""
        return seal(prev_hash, self.chain, seq, offset, self.event)


@dataclass
class Problem:
    kind: str  # gap | edit | reorder | duplicate | anchor | unsealed | missing
    chain: str
    seq: int | None
    detail: str


@dataclass
class ChainReport:
    chain: str
    events: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    first_offset: int | None = None
    last_offset: int | None = None
    head_hash: str | None = None
    identical_duplicates: int = 0  # the same sealed row stored twice (harmless; collapses on merge)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Checked:
    row: ChainRow
    intact: bool
    problem: Problem | None = None


class ChainVerifier:
    """Checks one chain from its rows in ``(seq, event_hash)`` order, in constant memory.

    A row whose seal fails is an *edit* unless it is recognised as a moved
    event: compared with the last few failing rows (``window`` rows at most
    ``reach`` seqs back), a row that holds the event sealed at another seq
    (the whole row moved, i.e. its seq changed, or only its event fields
    swapped with another row's) is a *reorder* at both places.
    """

    def __init__(self, chain: str, anchor: tuple[int, str] | None = None, *, window: int = 8,
                 reach: int = 1024) -> None:
        self.report = ChainReport(chain)
        self.anchor = anchor
        self.last: _Checked | None = None
        self.suspects: deque[_Checked] = deque(maxlen=window)
        self.reach = reach

    def _problem(self, kind: str, seq: int | None, detail: str) -> Problem:
        p = Problem(kind, self.report.chain, seq, detail)
        self.report.problems.append(p)
        return p

    def feed(self, row: ChainRow) -> None:
        r = self.report
        prev = self.last
        if prev is not None and row.seq < prev.row.seq:
            raise ValueError(f"rows of {r.chain} not in seq order: {row.seq} after {prev.row.seq}")
        if prev is not None and row.seq == prev.row.seq:
            if row.event_hash == prev.row.event_hash and row == prev.row:
                r.identical_duplicates += 1
            else:
                self._problem("duplicate", row.seq, f"seq {row.seq} holds two different events "
                                                    f"({prev.row.event['event_id']}, {row.event['event_id']})")
            return
        r.events += 1
        if r.first_seq is None:
            r.first_seq, r.first_offset = row.seq, row.offset
        r.last_seq, r.last_offset, r.head_hash = row.seq, row.offset, row.event_hash
        expected = prev.row.seq + 1 if prev is not None else 0
        linked = row.seq == expected
        if not linked:
            n = row.seq - expected
            self._problem("gap", expected, f"seq {expected}" + (f"..{row.seq - 1}" if n > 1 else "")
                          + f" missing: {n} event{'s' if n > 1 else ''} deleted")
        checked = _Checked(row, row.sealed_at(row.seq, row.prev_hash, row.offset) == row.event_hash)
        if not checked.intact:
            checked.problem = self._problem(
                "edit", row.seq, f"event {row.event['event_id']}: stored fields do not match its hash "
                                 "(changed after it was sealed)")
            self._recognise_move(checked)
            self.suspects.append(checked)
        elif linked and (prev is None or prev.intact):  # a failing predecessor is already reported
            want = prev.row.event_hash if prev is not None else GENESIS
            if row.prev_hash != want:
                self._problem("reorder", row.seq, f"event {row.event['event_id']} is intact but was sealed "
                              f"after a different event than the one now at seq {expected - 1}"
                              if prev is not None else "first event does not start from the genesis hash")
        if self.anchor is not None and row.seq == self.anchor[0] and row.event_hash != self.anchor[1]:
            self._problem("anchor", row.seq, f"hash {row.event_hash[:16]}... differs from the recorded "
                                             f"anchor {self.anchor[1][:16]}...: the chain was rewritten")
        self.last = checked

    def _recognise_move(self, r: _Checked) -> None:
        a = r.row
        for w in self.suspects:
            b = w.row
            if a.seq - b.seq > self.reach:
                continue
            # a holds what was sealed at b's seq: the whole row moved (A) or just its event fields (C); and vice versa.
            a_from_b = (a.sealed_at(b.seq, a.prev_hash, a.offset) == a.event_hash
                        or a.sealed_at(b.seq, b.prev_hash, b.offset) == b.event_hash)
            b_from_a = (b.sealed_at(a.seq, b.prev_hash, b.offset) == b.event_hash
                        or b.sealed_at(a.seq, a.prev_hash, a.offset) == a.event_hash)
            if a_from_b and r.problem is not None:
                r.problem.kind = "reorder"
                r.problem.detail = f"event {a.event['event_id']} was sealed at seq {b.seq}, is stored at seq {a.seq}"
            if b_from_a and w.problem is not None:
                w.problem.kind = "reorder"
                w.problem.detail = f"event {b.event['event_id']} was sealed at seq {a.seq}, is stored at seq {b.seq}"

    def finish(self) -> ChainReport:
        r = self.report
        if self.anchor is not None and (r.last_seq is None or r.last_seq < self.anchor[0]):
            self._problem("anchor", self.anchor[0], f"chain ends at seq {r.last_seq}, before the recorded anchor "
                                                    f"at seq {self.anchor[0]}: its newest events were deleted")
        return r


def verify_rows(rows: Iterable[ChainRow], anchors: Mapping[str, tuple[int, str]] | None = None
                ) -> list[ChainReport]:
    """Check rows ordered by ``(chain, seq)``; one report per chain met."""
    anchors = anchors or {}
    reports: list[ChainReport] = []
    verifier: ChainVerifier | None = None
    for row in rows:
        if verifier is None or row.chain != verifier.report.chain:
            if verifier is not None:
                reports.append(verifier.finish())
            verifier = ChainVerifier(row.chain, anchors.get(row.chain))
        verifier.feed(row)
    if verifier is not None:
        reports.append(verifier.finish())
    return reports


# ------------------------------------------------------------------------------------------ reading ClickHouse
Query = Callable[[str], Sequence[Sequence[Any]]]

_SELECT = ("SELECT chain, chain_seq, chain_offset, prev_hash, event_hash, event_id, "
           "toUnixTimestamp64Milli(occurred_at), stage, action, order_id, purchaser_dea, outcome, detail, actor "
           "FROM audit_events")


def _row(values: Sequence[Any]) -> ChainRow:
    chain, seq, offset, prev, digest, *event = values
    return ChainRow(chain, int(seq), int(offset), prev, digest, dict(zip(AUDIT_FIELDS, event)))


def read_chain(query: Query, chain: str, first_seq: int, last_seq: int, page_size: int = 10_000
               ) -> Iterator[ChainRow]:
    """The chain's rows with ``first_seq <= seq <= last_seq`` in order, one seq range per query.

    Ranges (not OFFSET/LIMIT) keep every page cheap and every seq's
    duplicates together; an empty range skips ahead to the next stored seq,
    so a forged huge seq costs one query, not millions.
    """
    lo = first_seq
    while lo <= last_seq:
        hi = min(lo + page_size, last_seq + 1)
        rows = query(f"{_SELECT} WHERE chain = {_quote(chain)} AND chain_seq >= {lo} AND chain_seq < {hi} "
                     "ORDER BY chain_seq, event_hash")
        yield from (_row(r) for r in rows)
        lo = hi
        if not rows and lo <= last_seq:
            nxt = query(f"SELECT minOrNull(chain_seq) FROM audit_events WHERE chain = {_quote(chain)} "
                        f"AND chain_seq >= {lo}")  # (plain min() of nothing is 0, not NULL)
            lo = max(lo, int(nxt[0][0])) if nxt and nxt[0][0] is not None else last_seq + 1


@dataclass
class AuditReport:
    chains: list[ChainReport]
    unsealed: int
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """Also the ``--anchors`` file format: ``chains[].chain``, ``last_seq`` and ``head_hash``."""
        return {"ok": self.ok, "unsealed": self.unsealed,
                "chains": [{k: v for k, v in asdict(c).items() if k != "problems"} | {"ok": c.ok} for c in self.chains],
                "problems": [asdict(p) for p in self.problems]}


def load_anchors(doc: Mapping[str, Any]) -> dict[str, tuple[int, str]]:
    """Anchors from an earlier ``csos audit verify --json`` output: chain -> (seq, head hash)."""
    return {c["chain"]: (int(c["last_seq"]), c["head_hash"]) for c in doc.get("chains", ())
            if c.get("last_seq") is not None and c.get("head_hash")}


def verify_store(query: Query, *, anchors: Mapping[str, tuple[int, str]] | None = None, page_size: int = 10_000,
                 allow_unsealed: bool = False, only: Iterable[str] = ()) -> AuditReport:
    """Check every chain in ``audit_events`` (as of now: rows sealed while it runs are not included).

    Rows with no chain are problems too (an event inserted around the sink is
    not covered by any seal) unless ``allow_unsealed`` (e.g. rows written
    before chaining was introduced). ``only`` restricts the check to those
    chains (and then leaves unsealed rows, which belong to no chain, aside).
    """
    only = list(only)
    anchors = {c: a for c, a in (anchors or {}).items() if not only or c in only}
    where = f" AND chain IN ({', '.join(_quote(c) for c in only)})" if only else ""
    chains = query("SELECT chain, min(chain_seq), max(chain_seq) FROM audit_events WHERE chain != ''"
                   f"{where} GROUP BY chain ORDER BY chain")
    reports = []
    for chain, _first, last in chains:
        # From seq 0 even if the chain starts later: missing leading events are a gap.
        verifier = ChainVerifier(chain, anchors.pop(chain, None))
        for row in read_chain(query, chain, 0, int(last), page_size):
            verifier.feed(row)
        reports.append(verifier.finish())
    problems = [p for r in reports for p in r.problems]
    for chain, (seq, _) in sorted(anchors.items()):
        problems.append(Problem("anchor", chain, seq, "chain recorded in the anchors is not in ClickHouse"))
    for chain in only:
        if chain not in {r.chain for r in reports} and chain not in anchors:
            problems.append(Problem("missing", chain, None, "no sealed events in this chain"))
    unsealed = 0 if only else int(query("SELECT count() FROM audit_events WHERE chain = ''")[0][0])
    if unsealed and not allow_unsealed:
        problems.append(Problem("unsealed", "", None, f"{unsealed} audit rows carry no seal (not written by the "
                                                      "sink's sealing path)"))
    return AuditReport(reports, unsealed, problems)


@contextmanager
def open_reader(settings: "Settings") -> Iterator[Query]:
    """The analysts' read-only path: the running sink's ``/sql`` (it owns the embedded store), else a read-only client."""
    from connectors.clickhouse_sink import open_client, run_readonly_query
    from streams.query import run_query, sink_is_up

    if settings.embedded_clickhouse and sink_is_up(settings):
        yield lambda sql: run_query(settings, sql)[1]
        return
    client = open_client(settings, readonly=True)
    try:
        yield lambda sql: run_readonly_query(client, sql)[1]
    finally:
        client.close()


def render(report: AuditReport) -> str:
    """Per chain: events checked, seq and offset range, head hash (to record as an anchor), every problem."""
    lines = []
    for c in report.chains:
        status = "OK" if c.ok else f"{len(c.problems)} problem{'s' if len(c.problems) > 1 else ''}"
        lines.append(f"{c.chain}: {c.events} events, seq {c.first_seq}..{c.last_seq} "
                     f"(Kafka offsets {c.first_offset}..{c.last_offset}), head {c.head_hash}: {status}")
        for p in c.problems:
            lines.append(f"  {p.kind.upper():9} seq {p.seq}: {p.detail}")
    if not report.chains:
        lines.append("no sealed audit events")
    for p in report.problems:
        if not any(p in c.problems for c in report.chains):
            lines.append(f"{p.kind.upper():9} {p.chain or '-'}: {p.detail}")
    if report.unsealed and not any(p.kind == "unsealed" for p in report.problems):
        lines.append(f"{report.unsealed} unsealed audit rows (allowed)")
    lines.append("audit trail intact" if report.ok else
                 f"AUDIT TRAIL NOT INTACT: {len(report.problems)} problem{'s' if len(report.problems) > 1 else ''}")
    return "\n".join(lines)
