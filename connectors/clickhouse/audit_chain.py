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

Keyed seals. With a secret key configured (``CSOS_AUDIT_KEY``, see
:class:`AuditKey`) the seal is ``HMAC-SHA256(key, prev_hash || canonical(...))``
instead, and every row records the sealing key's ``key_id`` (a fingerprint, never
the key; ``''`` for an unkeyed SHA-256 seal). Then only a key holder can produce
a seal the verifier accepts: someone with write access to ClickHouse alone can no
longer re-seal an edited tail. Keys rotate by restarting the sink with a new one:
the chain continues (the next row's ``prev_hash`` is the last old-key hash) and
each row names its key, so the verifier needs every key a chain used
(:class:`KeyRing`). A row sealed with a key the verifier lacks is *unverifiable*;
with keys configured, a row sealed without a key is *unkeyed* (a downgrade, or a
legacy row accepted only before a chain's first keyed row with
``allow_unkeyed``); neither is ever passed silently. The canonical bytes are the
same in both modes, so chains sealed before keys were introduced still verify.

What the check proves (``csos audit verify``, :func:`verify_store`): every
stored event is the one sealed (an *edit* breaks its hash), nothing was
removed from inside a chain (*gap*), events are in the order they were sealed
(*reorder*: a row whose seal holds but whose ``prev_hash`` is not its
predecessor's hash, or a row that holds an event sealed at another seq), and no
seq holds two different events (*duplicate*). What it cannot prove alone: without
a key, someone able to rewrite the whole tail of a chain (recomputing every later
hash) leaves a consistent chain; with a key, so can anyone holding the key (the
sink's host, and whoever holds a retired key for the part of a chain after it).
Dropping the newest events leaves a consistent chain either way. Record the head
hashes the check prints (``--json``) outside ClickHouse and pass them back with
``--anchors``: a rewritten or truncated chain then no longer matches its anchor.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from streams.core.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from streams.core.config import Settings

#: ``prev_hash`` of the first event (seq 0) of every chain.
GENESIS = "0" * 64
#: The audit event's own fields, in the order they are stored and canonicalized.
AUDIT_FIELDS: tuple[str, ...] = (
    "event_id", "occurred_at", "stage", "action", "order_id", "purchaser_dea", "outcome", "detail", "actor",
)
#: Columns the sink adds to every ``audit_events`` row (schemas/clickhouse/010_audit_chain.sql, 015_audit_key_id.sql).
CHAIN_COLUMNS: tuple[str, ...] = ("chain", "chain_seq", "chain_offset", "prev_hash", "event_hash", "key_id")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)
_OCCURRED = AUDIT_FIELDS.index("occurred_at")


# ------------------------------------------------------------------------------------------ keys
#: Fewest secret bytes a key may have: the key id is a hash of the key, so a guessable key could be found from it.
MIN_KEY_BYTES = 32
_KEY_ID_LABEL = b"csos-som audit-chain key-id v1\x00"
_HEX = re.compile(r"[0-9a-fA-F]+")


class AuditKeyError(ConfigError, ValueError):
    """A configured audit key is malformed (the message never contains the key)."""
    code = "AUDIT_KEY"


@dataclass(frozen=True)
class AuditKey:
    """A secret key for HMAC seals, and its public ``key_id`` (stored with every row it seals)."""

    secret: bytes = field(repr=False)
    key_id: str = ""

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_KEY_BYTES:
            raise AuditKeyError(f"an audit key must have at least {MIN_KEY_BYTES} bytes, this one has "
                                f"{len(self.secret)} (make one with `csos audit new-key`)")
        object.__setattr__(self, "key_id", key_id_of(self.secret))

    @classmethod
    def parse(cls, text: str, source: str = "CSOS_AUDIT_KEY") -> "AuditKey":
        """A key written as hex (64+ digits) or base64 (standard or URL-safe, padding optional)."""
        t = text.strip()
        try:
            if _HEX.fullmatch(t) and len(t) % 2 == 0:
                raw = bytes.fromhex(t)
            else:
                raw = base64.b64decode(t.replace("-", "+").replace("_", "/") + "=" * (-len(t) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise AuditKeyError(f"{source} is neither hex nor base64 (make a key with `csos audit new-key`)") from None
        try:
            return cls(raw)
        except AuditKeyError as exc:
            raise AuditKeyError(f"{source}: {exc}") from None


def key_id_of(secret: bytes) -> str:
    """The key's public fingerprint: the first 16 hex digits of SHA-256(label || key). Never the key itself."""
    return hashlib.sha256(_KEY_ID_LABEL + secret).hexdigest()[:16]


def new_key() -> str:
    """A fresh key for ``CSOS_AUDIT_KEY``: 32 random bytes as 64 hex digits."""
    return secrets.token_hex(MIN_KEY_BYTES)


class KeyRing:
    """The keys a verifier holds, by key id: the current key and every earlier one a chain may still name."""

    def __init__(self, keys: Iterable[AuditKey] = ()) -> None:
        self.keys: dict[str, AuditKey] = {k.key_id: k for k in keys}

    def __bool__(self) -> bool:
        return bool(self.keys)

    def __repr__(self) -> str:
        return f"KeyRing({sorted(self.keys)})"

    def get(self, key_id: str) -> AuditKey | None:
        return self.keys.get(key_id)

    @classmethod
    def parse(cls, *texts: str, source: str = "key") -> "KeyRing":
        """Keys from comma- or newline-separated texts (blank entries and ``#`` comment lines ignored)."""
        keys = []
        for text in texts:
            for line in (text or "").splitlines():
                if line.lstrip().startswith("#"):
                    continue
                keys += [AuditKey.parse(k, source) for k in line.split(",") if k.strip()]
        return cls(keys)

    @classmethod
    def from_settings(cls, settings: "Settings", *extra: str) -> "KeyRing":
        """``CSOS_AUDIT_KEY`` and ``CSOS_AUDIT_OLD_KEYS``, plus ``extra`` texts (e.g. a ``--key-file``'s)."""
        ring = cls.parse(settings.audit_key, source="CSOS_AUDIT_KEY")
        ring.keys.update(cls.parse(settings.audit_old_keys, source="CSOS_AUDIT_OLD_KEYS").keys)
        ring.keys.update(cls.parse(*extra, source="key file").keys)
        return ring


def sink_key(settings: "Settings") -> AuditKey | None:
    """The key the sink seals with (``CSOS_AUDIT_KEY``), or None: plain SHA-256 seals."""
    return AuditKey.parse(settings.audit_key) if settings.audit_key else None


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


def seal(prev_hash: str, chain: str, seq: int, offset: int, event: Mapping[str, Any],
         key: AuditKey | None = None) -> str:
    """``SHA-256(prev_hash || canonical(...))`` as hex, or with a key ``HMAC-SHA256(key, prev_hash || canonical(...))``:
    the event's hash, which the next event carries."""
    message = bytes.fromhex(prev_hash) + canonical(chain, seq, offset, event)
    if key is None:
        return hashlib.sha256(message).hexdigest()
    return hmac.new(key.secret, message, hashlib.sha256).hexdigest()


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
    extended the chain meanwhile). With a ``key`` every seal is an HMAC and every
    row carries the key's id; without, SHA-256 and ``key_id`` ``''``.
    """

    def __init__(self, load_head: Callable[[str], Head | None], key: AuditKey | None = None) -> None:
        self.load_head = load_head
        self.key = key
        self.key_id = key.key_id if key is not None else ""
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
            digest = seal(prev, chain, seq, offset, dict(zip(AUDIT_FIELDS, row)), self.key)
            out.append(row + [chain, seq, offset, prev, digest, self.key_id])
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
    key_id: str = ""  # '' = sealed with plain SHA-256

    def sealed_at(self, seq: int, prev_hash: str, offset: int, key: AuditKey | None = None) -> str:
        """This row's event sealed at another position (to recognise a moved event)."""
        return seal(prev_hash, self.chain, seq, offset, self.event, key)

    def seals(self, digest: str, seq: int, prev_hash: str, offset: int, key: AuditKey | None = None) -> bool:
        """Whether ``digest`` is this row's event sealed at that position (constant-time comparison)."""
        return hmac.compare_digest(self.sealed_at(seq, prev_hash, offset, key), digest)


@dataclass
class Problem:
    kind: str  # gap | edit | reorder | duplicate | anchor | unsealed | missing | unverifiable | unkeyed
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
    key_ids: list[str] = field(default_factory=list)  # the keys that sealed it, in chain order ('' = unkeyed)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Checked:
    row: ChainRow
    intact: bool  # its seal holds, or could not be checked (no key: reported as unverifiable)
    problem: Problem | None = None
    key: AuditKey | None = None


@dataclass
class _Run:
    """Consecutive rows with the same key problem, reported once."""

    problem: Problem
    key_id: str
    first: int
    last: int


class ChainVerifier:
    """Checks one chain from its rows in ``(seq, event_hash)`` order, in constant memory.

    A row whose seal fails is an *edit* unless it is recognised as a moved
    event: compared with the last few failing rows (``window`` rows at most
    ``reach`` seqs back), a row that holds the event sealed at another seq
    (the whole row moved, i.e. its seq changed, or only its event fields
    swapped with another row's) is a *reorder* at both places.

    Each row is checked with the key its ``key_id`` names, from ``keys``. A
    row naming a key not in ``keys`` is *unverifiable* (its links are still
    checked). If ``keys`` holds any key, a row sealed without one is *unkeyed*,
    unless ``allow_unkeyed`` and no keyed row came before it in the chain
    (legacy rows from before keys were configured).
    """

    def __init__(self, chain: str, anchor: tuple[int, str] | None = None, *, keys: KeyRing | None = None,
                 allow_unkeyed: bool = False, window: int = 8, reach: int = 1024) -> None:
        self.report = ChainReport(chain)
        self.anchor = anchor
        self.keys = keys or KeyRing()
        self.allow_unkeyed = allow_unkeyed
        self.last: _Checked | None = None
        self.suspects: deque[_Checked] = deque(maxlen=window)
        self.reach = reach
        self.keyed_seen = False
        self.run: _Run | None = None

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
        checked = self._check(row, linked)
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

    def _check(self, row: ChainRow, linked: bool) -> _Checked:
        """The row's seal checked with the key it names; key problems reported (runs of rows once)."""
        if row.key_id not in self.report.key_ids:
            self.report.key_ids.append(row.key_id)
        if row.key_id:
            self.keyed_seen = True
            key = self.keys.get(row.key_id)
            if key is None:
                self._key_problem(row, "unverifiable", linked, self._missing_key)
                return _Checked(row, True)  # links still checked; the seal cannot be
        else:
            key = None
            if self.keys and not (self.allow_unkeyed and not self.keyed_seen):
                self._key_problem(row, "unkeyed", linked, self._unkeyed)
        return _Checked(row, row.seals(row.event_hash, row.seq, row.prev_hash, row.offset, key), key=key)

    def _missing_key(self, key_id: str, first: int, last: int) -> str:
        what = f"seq {first}" + (f"..{last} ({last - first + 1} events)" if last > first else "")
        if not self.keys:
            return (f"{what} sealed with key {key_id} but no key was given: the chain is keyed, set "
                    "CSOS_AUDIT_KEY (and CSOS_AUDIT_OLD_KEYS for earlier keys) or pass --key-file")
        return (f"{what} sealed with key {key_id}, which the verifier does not have (it has "
                f"{', '.join(sorted(self.keys.keys))}): add it to CSOS_AUDIT_OLD_KEYS or --key-file")

    def _unkeyed(self, _key_id: str, first: int, last: int) -> str:
        what = f"seq {first}" + (f"..{last} ({last - first + 1} events)" if last > first else "")
        if self.keyed_seen:
            return (f"{what} sealed without a key after keyed events: a keyed tail replaced by plain "
                    "SHA-256 seals, which anyone can compute")
        return (f"{what} sealed without a key although the verifier has keys (anyone can compute these seals; "
                "--allow-unkeyed accepts unkeyed events before a chain's first keyed one)")

    def _key_problem(self, row: ChainRow, kind: str, linked: bool,
                     describe: Callable[[str, int, int], str]) -> None:
        run = self.run
        if run is not None and linked and run.problem.kind == kind and run.key_id == row.key_id \
                and run.last + 1 == row.seq:
            run.last = row.seq
        else:
            run = self.run = _Run(self._problem(kind, row.seq, ""), row.key_id, row.seq, row.seq)
        run.problem.detail = describe(row.key_id, run.first, run.last)

    def _recognise_move(self, r: _Checked) -> None:
        a = r.row
        for w in self.suspects:
            b = w.row
            if a.seq - b.seq > self.reach:
                continue
            # a holds what was sealed at b's seq: the whole row moved (A) or just its event fields (C); and vice versa.
            # (A moved row keeps its key id; an event moved alone was sealed with the key of the row it left.)
            a_from_b = (a.seals(a.event_hash, b.seq, a.prev_hash, a.offset, r.key)
                        or a.seals(b.event_hash, b.seq, b.prev_hash, b.offset, w.key))
            b_from_a = (b.seals(b.event_hash, a.seq, b.prev_hash, b.offset, w.key)
                        or b.seals(a.event_hash, a.seq, a.prev_hash, a.offset, r.key))
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


def verify_rows(rows: Iterable[ChainRow], anchors: Mapping[str, tuple[int, str]] | None = None, *,
                keys: KeyRing | None = None, allow_unkeyed: bool = False) -> list[ChainReport]:
    """Check rows ordered by ``(chain, seq)``; one report per chain met."""
    anchors = anchors or {}
    reports: list[ChainReport] = []
    verifier: ChainVerifier | None = None
    for row in rows:
        if verifier is None or row.chain != verifier.report.chain:
            if verifier is not None:
                reports.append(verifier.finish())
            verifier = ChainVerifier(row.chain, anchors.get(row.chain), keys=keys, allow_unkeyed=allow_unkeyed)
        verifier.feed(row)
    if verifier is not None:
        reports.append(verifier.finish())
    return reports


# ------------------------------------------------------------------------------------------ reading ClickHouse
Query = Callable[[str], Sequence[Sequence[Any]]]

_SELECT = ("SELECT chain, chain_seq, chain_offset, prev_hash, event_hash, key_id, event_id, "
           "toUnixTimestamp64Milli(occurred_at), stage, action, order_id, purchaser_dea, outcome, detail, actor "
           "FROM audit_events")


def _row(values: Sequence[Any]) -> ChainRow:
    chain, seq, offset, prev, digest, key_id, *event = values
    return ChainRow(chain, int(seq), int(offset), prev, digest, dict(zip(AUDIT_FIELDS, event)), key_id)


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
                 allow_unsealed: bool = False, only: Iterable[str] = (), keys: KeyRing | None = None,
                 allow_unkeyed: bool = False) -> AuditReport:
    """Check every chain in ``audit_events`` (as of now: rows sealed while it runs are not included).

    ``keys`` are the keys keyed rows may name (:meth:`KeyRing.from_settings`);
    see :class:`ChainVerifier` for ``allow_unkeyed``.

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
        verifier = ChainVerifier(chain, anchors.pop(chain, None), keys=keys, allow_unkeyed=allow_unkeyed)
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


def render(report: AuditReport) -> str:
    """Per chain: events checked, seq and offset range, head hash (to record as an anchor), every problem."""
    lines = []
    for c in report.chains:
        status = "OK" if c.ok else f"{len(c.problems)} problem{'s' if len(c.problems) > 1 else ''}"
        keys = ", ".join(k or "none" for k in c.key_ids)
        lines.append(f"{c.chain}: {c.events} events, seq {c.first_seq}..{c.last_seq} "
                     f"(Kafka offsets {c.first_offset}..{c.last_offset}), keys {keys}, head {c.head_hash}: {status}")
        for p in c.problems:
            lines.append(f"  {p.kind.upper():12} seq {p.seq}: {p.detail}")
    if not report.chains:
        lines.append("no sealed audit events")
    for p in report.problems:
        if not any(p in c.problems for c in report.chains):
            lines.append(f"{p.kind.upper():12} {p.chain or '-'}: {p.detail}")
    if report.unsealed and not any(p.kind == "unsealed" for p in report.problems):
        lines.append(f"{report.unsealed} unsealed audit rows (allowed)")
    lines.append("audit trail intact" if report.ok else
                 f"AUDIT TRAIL NOT INTACT: {len(report.problems)} problem{'s' if len(report.problems) > 1 else ''}")
    return "\n".join(lines)
