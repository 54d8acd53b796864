"""The tamper-evident audit trail: sealing in the sink, and verification that finds every edit, gap and reorder.

Three levels: the pure chain logic; the real sink code path into a real
embedded ClickHouse, tampered with the way someone with write access to the
store would (mutations, delete and re-insert); and a real pipeline run, whose
whole audit trail must be sealed and verify clean.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

from connectors.clickhouse.audit_chain import (
    AUDIT_FIELDS, CHAIN_COLUMNS, GENESIS, AuditKey, AuditKeyError, AuditReport, ChainRow, ChainSealer, Head, KeyRing,
    canonical, epoch_ms, key_id_of, load_anchors, read_chain, render, seal, verify_rows, verify_store,
)
from streams.tools.broker import free_port
from connectors.clickhouse.sink import ClickHouseSink, SourceRecord
from connectors.clickhouse.client import apply_ddl, open_client
from streams.cli import main as cli
from streams.core.config import Settings
from streams.tools.processes import settings_env
from connectors.clickhouse.query import open_reader

T0 = datetime(2026, 11, 20, 12, 0, 0, 123000, tzinfo=timezone.utc)
AUDIT = "audit.events"
#: Fixed test keys (the sink's, a rotated-in one, an attacker's), as `csos audit new-key` prints them.
K1_TEXT = "5f1c3a9e27d04b8c6e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f"
K2_TEXT = "c0ffee" * 10 + "0123"
K1, K2 = AuditKey.parse(K1_TEXT), AuditKey.parse(K2_TEXT)
EVIL = AuditKey(b"attacker's own key, 32+ bytes...")


def event(i: int, **changes) -> dict:
    ev = {"event_id": f"ev-{i}", "occurred_at": T0 + timedelta(seconds=i), "stage": "monitor", "action": "order.held",
          "order_id": f"order-{i}" if i % 3 else None, "purchaser_dea": "BE8821844" if i % 2 else None,
          "outcome": "HOLD", "detail": json.dumps({"i": i, "note": "größe ✓"}), "actor": "worker-1"}
    ev.update(changes)
    return ev


def sealed_chain(n: int, chain: str = "audit.events/0", offset0: int = 0, key: AuditKey | None = None,
                 after: list[ChainRow] = ()) -> list[ChainRow]:
    """What the sink would store for events 0..n-1 at consecutive offsets (via the real sealer).

    ``key``: the sink's CSOS_AUDIT_KEY; ``after``: the chain so far (a sink restarted with another key continues it).
    """
    head = Head(after[-1].seq, after[-1].event_hash, after[-1].offset) if after else None
    sealer = ChainSealer(lambda _c: head, key)
    rows = list(after)
    for i in range(len(after), len(after) + n):
        (row,) = sealer.seal_rows(AUDIT, int(chain.rsplit("/", 1)[1]), offset0 + i,
                                  [[event(i)[c] for c in AUDIT_FIELDS]])
        rows.append(ChainRow(row[9], row[10], row[11], row[12], row[13], dict(zip(AUDIT_FIELDS, row[:9])), row[14]))
    return rows


def problems(report) -> list[tuple[str, int | None]]:
    return [(p.kind, p.seq) for p in report.problems]


def moved(row: ChainRow, **changes) -> ChainRow:
    return ChainRow(**{**row.__dict__, **changes})


def forge_tail(chain: list[ChainRow], at: int, key: AuditKey | None, key_id: str, **changes) -> list[ChainRow]:
    """Someone with write access to the store: edits event ``at`` and re-seals it and every later event, consistently
    linked, with ``key`` (None: plain SHA-256), each row claiming ``key_id``."""
    out = chain[:at]
    prev = chain[at - 1].event_hash if at else GENESIS
    for r in chain[at:]:
        ev = {**r.event, **changes} if r.seq == at else r.event
        digest = seal(prev, r.chain, r.seq, r.offset, ev, key)
        out.append(moved(r, event=ev, prev_hash=prev, event_hash=digest, key_id=key_id))
        prev = digest
    return out


# ------------------------------------------------------------------------------------------ pure logic
def test_canonical_form_keeps_null_apart_from_empty_and_times_in_epoch_ms():
    a = canonical("c/0", 1, 5, event(1, order_id=None))
    b = canonical("c/0", 1, 5, event(1, order_id=""))
    assert a != b
    ms = epoch_ms(T0)
    assert ms == 1_795_176_000_123
    # What ClickHouse returns (epoch ms) canonicalizes like the datetime the sink had; naive times are UTC.
    assert canonical("c/0", 1, 5, event(0, occurred_at=ms)) == canonical("c/0", 1, 5, event(0))
    assert epoch_ms(T0.replace(tzinfo=None)) == ms
    # Every sealed field counts, the position included.
    base = seal(GENESIS, "c/0", 1, 5, event(1))
    assert base == seal(GENESIS, "c/0", 1, 5, event(1))
    variants = [seal("11" * 32, "c/0", 1, 5, event(1)), seal(GENESIS, "c/1", 1, 5, event(1)),
                seal(GENESIS, "c/0", 2, 5, event(1)), seal(GENESIS, "c/0", 1, 6, event(1))]
    variants += [seal(GENESIS, "c/0", 1, 5, event(1, **{f: "x"})) for f in AUDIT_FIELDS if f != "occurred_at"]
    variants.append(seal(GENESIS, "c/0", 1, 5, event(1, occurred_at=T0 + timedelta(milliseconds=1))))
    assert base not in variants and len(set(variants)) == len(variants)


def test_sealer_links_events_skips_redeliveries_and_resumes_from_the_stored_head():
    chain = sealed_chain(5)
    assert [r.seq for r in chain] == [0, 1, 2, 3, 4]
    assert chain[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.event_hash for a, b in zip(chain, chain[1:]))

    # Restart: the head comes from the store; a redelivered event is skipped, the next one continues the chain.
    loads = []
    sealer = ChainSealer(lambda c: loads.append(c) or Head(4, chain[4].event_hash, 4))
    sealer.begin()
    assert sealer.seal_rows(AUDIT, 0, 4, [[event(4)[c] for c in AUDIT_FIELDS]]) == []
    (row,) = sealer.seal_rows(AUDIT, 0, 7, [[event(5)[c] for c in AUDIT_FIELDS]])  # offsets need not be dense
    assert row[9:13] == ["audit.events/0", 5, 7, chain[4].event_hash]
    # The insert failed: nothing committed, the retry seals the very same row (so its dedup token matches).
    sealer.begin()
    assert sealer.seal_rows(AUDIT, 0, 7, [[event(5)[c] for c in AUDIT_FIELDS]]) == [row]
    sealer.commit()
    sealer.begin()
    assert sealer.seal_rows(AUDIT, 0, 7, [[event(5)[c] for c in AUDIT_FIELDS]]) == []
    assert loads == ["audit.events/0"]
    sealer.forget()  # partitions reassigned: the head is read again
    sealer.seal_rows(AUDIT, 0, 8, [[event(6)[c] for c in AUDIT_FIELDS]])
    assert loads == ["audit.events/0"] * 2


def test_a_clean_chain_verifies():
    (report,) = verify_rows(sealed_chain(20))
    assert report.ok, report.problems
    assert (report.events, report.first_seq, report.last_seq, report.head_hash) == (20, 0, 19, sealed_chain(20)[-1].event_hash)


def test_an_edited_event_is_reported_at_its_seq():
    chain = sealed_chain(10)
    chain[6] = moved(chain[6], event={**chain[6].event, "outcome": "RELEASE"})
    (report,) = verify_rows(chain)
    assert problems(report) == [("edit", 6)]


def test_a_deleted_event_is_a_gap_and_deleting_the_first_is_too():
    chain = sealed_chain(10)
    (report,) = verify_rows(chain[:3] + chain[4:])
    assert problems(report) == [("gap", 3)]
    (report,) = verify_rows(chain[:3] + chain[6:])
    assert problems(report) == [("gap", 3)] and "3..5" in report.problems[0].detail
    (report,) = verify_rows(chain[1:])
    assert problems(report) == [("gap", 0)]


def test_reordered_events_are_reported_at_both_places():
    chain = sealed_chain(10)
    # The seq numbers swapped (the rows otherwise untouched).
    swapped = chain[:3] + [moved(chain[4], seq=3), moved(chain[3], seq=4)] + chain[5:]
    (report,) = verify_rows(swapped)
    assert problems(report) == [("reorder", 3), ("reorder", 4)]
    # The events' fields swapped (the chain columns untouched).
    swapped = chain[:5] + [moved(chain[5], event=chain[6].event), moved(chain[6], event=chain[5].event)] + chain[7:]
    (report,) = verify_rows(swapped)
    assert problems(report) == [("reorder", 5), ("reorder", 6)]


def test_a_resealed_edit_breaks_the_link_to_the_next_event():
    chain = sealed_chain(10)
    forged = dict(chain[4].event, outcome="RELEASE")
    chain[4] = moved(chain[4], event=forged, event_hash=seal(chain[4].prev_hash, chain[4].chain, 4, 4, forged))
    (report,) = verify_rows(chain)
    assert problems(report) == [("reorder", 5)]


def test_two_different_events_at_one_seq_are_reported_and_an_identical_copy_is_not():
    chain = sealed_chain(6)
    (report,) = verify_rows(chain[:3] + [chain[2]] + chain[3:])
    assert report.ok and report.identical_duplicates == 1
    other = moved(chain[2], event={**chain[2].event, "event_id": "forged"})
    (report,) = verify_rows(chain[:3] + [other] + chain[3:])
    assert ("duplicate", 2) in problems(report)


def test_anchors_catch_a_truncated_or_rewritten_chain():
    chain = sealed_chain(10)
    anchors = {"audit.events/0": (9, chain[9].event_hash)}
    (report,) = verify_rows(chain, anchors)
    assert report.ok
    (report,) = verify_rows(chain[:8], anchors)  # newest events dropped: the chain alone still looks fine
    assert problems(report) == [("anchor", 9)]
    rewritten = sealed_chain(10, offset0=100)  # every hash recomputed: consistent, but not what was recorded
    (report,) = verify_rows(rewritten, anchors)
    assert problems(report) == [("anchor", 9)]


# ------------------------------------------------------------------------------------------ keyed chains
def test_keys_parse_from_hex_or_base64_and_the_key_id_never_reveals_the_key(monkeypatch):
    raw = bytes.fromhex(K1_TEXT)
    forms = [K1_TEXT, K1_TEXT.upper(), f"  {K1_TEXT}\n", base64.b64encode(raw).decode(),
             base64.urlsafe_b64encode(raw).decode().rstrip("=")]
    assert {AuditKey.parse(f).secret for f in forms} == {raw}
    assert re.fullmatch("[0-9a-f]{16}", K1.key_id) and K1.key_id == key_id_of(raw) != K2.key_id
    for key, text in ((K1, K1_TEXT), (K2, K2_TEXT), (EVIL, EVIL.secret.hex())):
        spellings = {text.lower(), key.secret.hex(), base64.b64encode(key.secret).decode()}
        assert key.key_id not in spellings and not any(key.key_id in t or t in key.key_id for t in spellings)
        assert key.key_id != hashlib.sha256(key.secret).hexdigest()[:16]  # labelled: not the key's plain digest
        assert text not in repr(key) and key.secret.hex() not in repr(KeyRing([key]))
    # Settings keep keys out of their repr (logs) but hand them to child processes.
    s = Settings().with_(audit_key=K1_TEXT, audit_old_keys=K2_TEXT)
    assert K1_TEXT not in repr(s) and K2_TEXT not in repr(s)
    assert (settings_env(s)["CSOS_AUDIT_KEY"], settings_env(s)["CSOS_AUDIT_OLD_KEYS"]) == (K1_TEXT, K2_TEXT)
    monkeypatch.setenv("CSOS_AUDIT_KEY", K2_TEXT)
    monkeypatch.setenv("CSOS_AUDIT_OLD_KEYS", f"{K1_TEXT}, {EVIL.secret.hex()}")
    assert sorted(KeyRing.from_settings(Settings.from_env()).keys) == sorted([K1.key_id, K2.key_id, EVIL.key_id])
    assert sorted(KeyRing.parse(f"# old keys\n{K1_TEXT}\n\n{K2_TEXT}\n").keys) == sorted([K1.key_id, K2.key_id])
    # Malformed or short keys are refused, without echoing them.
    for bad in ("zz" * 31 + "!!", "00" * 16, base64.b64encode(b"k" * 31).decode(), "not a key!"):
        with pytest.raises(AuditKeyError) as exc:
            AuditKey.parse(bad)
        assert bad not in str(exc.value)
    # The seal: HMAC-SHA256(key, prev || canonical), not SHA-256.
    msg = bytes.fromhex(GENESIS) + canonical("c/0", 1, 5, event(1))
    assert seal(GENESIS, "c/0", 1, 5, event(1), K1) == hmac.new(raw, msg, hashlib.sha256).hexdigest()
    assert seal(GENESIS, "c/0", 1, 5, event(1)) == hashlib.sha256(msg).hexdigest() != seal(GENESIS, "c/0", 1, 5, event(1), K1)


def test_new_key_prints_a_fresh_usable_key_and_its_id():
    runs = [CliRunner().invoke(cli, ["audit", "new-key"]) for _ in range(2)]
    assert all(r.exit_code == 0 for r in runs)
    keys = [r.stdout.strip() for r in runs]
    assert keys[0] != keys[1] and all(re.fullmatch("[0-9a-f]{64}", k) for k in keys)
    assert f"key id: {AuditKey.parse(keys[0]).key_id}" in runs[0].stderr and keys[0] not in runs[0].stderr


def test_a_keyed_chain_verifies_with_its_key_and_is_unverifiable_without_it():
    chain = sealed_chain(12, key=K1)
    assert {r.key_id for r in chain} == {K1.key_id}
    assert [r.event_hash for r in chain] != [r.event_hash for r in sealed_chain(12)]
    (report,) = verify_rows(chain, keys=KeyRing([K1]))
    assert report.ok, report.problems
    assert report.key_ids == [K1.key_id] and report.events == 12
    # No key at all: never passed silently, one problem for the whole run of rows, naming the missing key.
    (report,) = verify_rows(chain)
    assert problems(report) == [("unverifiable", 0)]
    detail = report.problems[0].detail
    assert "seq 0..11 (12 events)" in detail and K1.key_id in detail and "no key was given" in detail
    assert f"UNVERIFIABLE seq 0: {detail}" in render(AuditReport([report], 0, list(report.problems)))
    # Only some other key.
    (report,) = verify_rows(chain, keys=KeyRing([K2]))
    assert problems(report) == [("unverifiable", 0)]
    assert K1.key_id in report.problems[0].detail and "does not have" in report.problems[0].detail
    # Without the key, links are still checked: a gap is still a gap.
    (report,) = verify_rows(chain[:5] + chain[6:])
    assert problems(report) == [("unverifiable", 0), ("gap", 5), ("unverifiable", 6)]


def test_a_forged_tail_resealed_without_the_key_passes_unkeyed_but_is_caught_with_the_key():
    # The known limit of the unkeyed chain: an edit re-sealed from there on is a consistent chain.
    plain = sealed_chain(10)
    (report,) = verify_rows(forge_tail(plain, 4, None, "", outcome="RELEASE"))
    assert report.ok
    # The same forgery of a keyed chain.
    keyed, ring = sealed_chain(10, key=K1), KeyRing([K1])
    downgraded = forge_tail(keyed, 4, None, "", outcome="RELEASE")  # plain SHA-256, rows claim no key
    for allow_unkeyed in (False, True):  # legacy rows are accepted only before a chain's first keyed row
        (report,) = verify_rows(downgraded, keys=ring, allow_unkeyed=allow_unkeyed)
        assert problems(report) == [("unkeyed", 4)]
        assert "seq 4..9 (6 events)" in report.problems[0].detail and "after keyed" in report.problems[0].detail
    # SHA-256 or the attacker's own key, the rows still naming the real key: every re-sealed row fails its HMAC.
    for forger in (None, EVIL):
        (report,) = verify_rows(forge_tail(keyed, 4, forger, K1.key_id, outcome="RELEASE"), keys=ring)
        assert problems(report) == [("edit", s) for s in range(4, 10)]
    # The attacker's key under its own id: a key the verifier does not have.
    (report,) = verify_rows(forge_tail(keyed, 4, EVIL, EVIL.key_id, outcome="RELEASE"), keys=ring)
    assert problems(report) == [("unverifiable", 4)] and EVIL.key_id in report.problems[0].detail
    # Only the key holder can re-seal consistently (what the HMAC does not prove; anchors still catch it).
    resealed = forge_tail(keyed, 4, K1, K1.key_id, outcome="RELEASE")
    assert verify_rows(resealed, keys=ring)[0].ok
    assert problems(verify_rows(resealed, {"audit.events/0": (9, keyed[9].event_hash)}, keys=ring)[0]) == [("anchor", 9)]


def test_a_chain_that_rotated_keys_verifies_with_both_and_not_with_only_the_new_one():
    old = sealed_chain(6, key=K1)
    chain = sealed_chain(6, key=K2, after=old)  # the sink restarted with a new key continues the chain
    assert [r.key_id for r in chain] == [K1.key_id] * 6 + [K2.key_id] * 6
    assert chain[6].prev_hash == chain[5].event_hash and [r.seq for r in chain] == list(range(12))
    (report,) = verify_rows(chain, keys=KeyRing([K2, K1]))
    assert report.ok, report.problems
    assert report.key_ids == [K1.key_id, K2.key_id]
    (report,) = verify_rows(chain, keys=KeyRing([K2]))
    assert problems(report) == [("unverifiable", 0)]
    assert "seq 0..5 (6 events)" in report.problems[0].detail and K1.key_id in report.problems[0].detail
    (report,) = verify_rows(chain, keys=KeyRing([K1]))
    assert problems(report) == [("unverifiable", 6)] and K2.key_id in report.problems[0].detail
    # Moves are recognised across the rotation too (each row checked with its own key).
    swapped = chain[:5] + [moved(chain[5], event=chain[6].event), moved(chain[6], event=chain[5].event)] + chain[7:]
    (report,) = verify_rows(swapped, keys=KeyRing([K1, K2]))
    assert problems(report) == [("reorder", 5), ("reorder", 6)]
    swapped = chain[:5] + [moved(chain[6], seq=5), moved(chain[5], seq=6)] + chain[7:]
    (report,) = verify_rows(swapped, keys=KeyRing([K1, K2]))
    assert problems(report) == [("reorder", 5), ("reorder", 6)]


def test_unkeyed_events_before_a_key_was_configured_are_accepted_only_when_allowed():
    chain = sealed_chain(4, key=K1, after=sealed_chain(4))
    ring = KeyRing([K1])
    (report,) = verify_rows(chain, keys=ring)
    assert problems(report) == [("unkeyed", 0)] and "seq 0..3 (4 events)" in report.problems[0].detail
    (report,) = verify_rows(chain, keys=ring, allow_unkeyed=True)
    assert report.ok and report.key_ids == ["", K1.key_id]
    (report,) = verify_rows(chain)  # no key: the unkeyed part checks, the keyed part cannot
    assert problems(report) == [("unverifiable", 4)]
    # An unkeyed event after keyed ones is never accepted.
    (report,) = verify_rows(sealed_chain(2, after=chain), keys=ring, allow_unkeyed=True)
    assert problems(report) == [("unkeyed", 8)]


# ------------------------------------------------------------------------------------------ real ClickHouse
def audit_records(partition: int, n: int, offset0: int = 0, tag: str = "") -> list[SourceRecord]:
    return [SourceRecord(AUDIT, partition, offset0 + i, "audit.AuditEvent", event(offset0 + i, event_id=f"{tag}p{partition}-{offset0 + i}"))
            for i in range(n)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    settings = Settings().with_(data_dir=tmp_path_factory.mktemp("audit-ch"), sink_port=free_port())
    client = open_client(settings)
    apply_ddl(client)
    apply_ddl(client)  # 010_audit_chain.sql is idempotent too
    client.settings_for_cli = settings
    yield client
    client.close()


def write_chain(client, partition: int, n: int = 12) -> str:
    """A chain written through the real sink path, in several batches with a redelivery and a restart between."""
    records = audit_records(partition, n)
    sink = ClickHouseSink(client)
    sink.write(records[:5])
    sink.write(records[3:8])  # redelivered 3, 4 with new 5..7
    sink = ClickHouseSink(client)  # a restarted sink reads the head from ClickHouse
    sink.write(records[6:])
    return f"audit.events/{partition}"


@contextmanager
def rows_reader(settings):
    """The analysts' read path (``connectors.clickhouse.query.open_reader``) as the SQL -> rows function verify_store reads."""
    with open_reader(settings) as read:
        yield lambda sql: read(sql)[1]


def verify(client, chain: str, keys: KeyRing | None = None):
    with rows_reader(client.settings_for_cli) as query:
        return verify_store(query, only=[chain], page_size=5, keys=keys)  # small pages: chains span several queries


def mutate(client, sql: str) -> None:
    client.command(sql + " SETTINGS mutations_sync = 1")


def run_cli(client, monkeypatch, *args: str, keys: dict[str, str] | None = None):
    """``csos audit verify ARGS`` with CSOS_AUDIT_KEY / CSOS_AUDIT_OLD_KEYS exactly as in ``keys`` (default: none)."""
    s = client.settings_for_cli
    for name in ("CSOS_AUDIT_KEY", "CSOS_AUDIT_OLD_KEYS"):
        if (keys or {}).get(name):
            monkeypatch.setenv(name, keys[name])
        else:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CSOS_DATA_DIR", str(s.data_dir))
    monkeypatch.setenv("CSOS_SINK_PORT", str(s.sink_port))
    monkeypatch.setenv("CLICKHOUSE_URL", "")
    monkeypatch.setenv("CLICKHOUSE_DATABASE", s.clickhouse_database)
    return CliRunner().invoke(cli, ["audit", "verify", *args])


def test_the_sink_seals_every_audit_row_once_and_the_cli_reports_the_chain_clean(store, monkeypatch, tmp_path):
    chain = write_chain(store, 0)
    rows = store.query("SELECT chain_seq, chain_offset, prev_hash, event_hash, event_id FROM audit_events "
                       f"WHERE chain = '{chain}' ORDER BY chain_seq").result_rows
    assert [r[0] for r in rows] == list(range(12)) and [r[1] for r in rows] == list(range(12))
    assert rows[0][2] == GENESIS and all(b[2] == a[3] for a, b in zip(rows, rows[1:]))
    assert len({r[4] for r in rows}) == 12  # the redelivered events were not sealed twice

    result = run_cli(store, monkeypatch, "--chain", chain, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["ok"] and doc["problems"] == []
    (c,) = doc["chains"]
    assert (c["chain"], c["events"], c["first_seq"], c["last_seq"], c["head_hash"]) == (chain, 12, 0, 11, rows[-1][3])
    text = run_cli(store, monkeypatch, "--chain", chain)
    assert text.exit_code == 0 and rows[-1][3] in text.output and "intact" in text.output

    # The JSON is an anchors file: the same chain still matches it; a chain that lost its head does not.
    anchors = tmp_path / "anchors.json"
    anchors.write_text(result.output)
    assert load_anchors(doc) == {chain: (11, rows[-1][3])}
    assert run_cli(store, monkeypatch, "--chain", chain, "--anchors", str(anchors)).exit_code == 0
    doc["chains"][0]["last_seq"] = 12
    anchors.write_text(json.dumps(doc))
    truncated = run_cli(store, monkeypatch, "--chain", chain, "--anchors", str(anchors), "--json")
    assert truncated.exit_code == 1
    assert [(p["kind"], p["seq"]) for p in json.loads(truncated.output)["problems"]] == [("anchor", 12)]


def test_a_failed_insert_is_resealed_identically_on_retry(store):
    class Flaky:
        def __init__(self, client):
            self.client, self.failed = client, False

        def insert(self, table, *args, **kwargs):
            if table == "audit_events" and not self.failed:
                self.failed = True
                raise ConnectionError("ClickHouse went away")
            return self.client.insert(table, *args, **kwargs)

        def query(self, *args, **kwargs):
            return self.client.query(*args, **kwargs)

    sink = ClickHouseSink(store)
    records = audit_records(6, 8)
    sink.write(records[:3])
    sink.client = Flaky(store)
    with pytest.raises(ConnectionError):
        sink.write(records[3:])
    sink.write(records[3:])  # the sink service's retry: same batch
    report = verify(store, "audit.events/6")
    assert report.ok, report.problems
    assert (report.chains[0].events, report.chains[0].last_seq) == (8, 7)


def test_an_edited_row_is_reported_as_an_edit_at_its_seq(store, monkeypatch):
    chain = write_chain(store, 1)
    mutate(store, f"ALTER TABLE audit_events UPDATE detail = '{{\"forged\": true}}' "
                  f"WHERE chain = '{chain}' AND chain_seq = 7")
    assert problems(verify(store, chain)) == [("edit", 7)]
    result = run_cli(store, monkeypatch, "--chain", chain)
    assert result.exit_code == 1 and "EDIT" in result.output and "seq 7" in result.output


def test_a_deleted_row_is_reported_as_a_gap_at_its_seq(store, monkeypatch):
    chain = write_chain(store, 2)
    mutate(store, f"ALTER TABLE audit_events DELETE WHERE chain = '{chain}' AND chain_seq = 4")
    assert problems(verify(store, chain)) == [("gap", 4)]
    result = run_cli(store, monkeypatch, "--chain", chain, "--json")
    assert result.exit_code == 1
    assert [(p["kind"], p["seq"]) for p in json.loads(result.output)["problems"]] == [("gap", 4)]


def test_rows_with_swapped_seq_numbers_are_reported_as_reordered(store):
    chain = write_chain(store, 3)
    mutate(store, f"ALTER TABLE audit_events UPDATE chain_seq = if(chain_seq = 5, 6, 5) "
                  f"WHERE chain = '{chain}' AND chain_seq IN (5, 6)")
    assert problems(verify(store, chain)) == [("reorder", 5), ("reorder", 6)]


def test_two_events_with_swapped_contents_are_reported_as_reordered(store):
    chain = write_chain(store, 4)
    cols = ", ".join(f"toUnixTimestamp64Milli({c})" if c == "occurred_at" else c for c in AUDIT_FIELDS)
    (a, b) = store.query(f"SELECT chain_seq, {cols} FROM audit_events WHERE chain = '{chain}' "
                         "AND chain_seq IN (2, 3) ORDER BY chain_seq").result_rows
    chain_cols = store.query("SELECT chain_seq, chain, chain_seq, chain_offset, prev_hash, event_hash "
                             f"FROM audit_events WHERE chain = '{chain}' AND chain_seq IN (2, 3) "
                             "ORDER BY chain_seq").result_rows
    # event_id and occurred_at are in the sorting key (no UPDATE): delete both rows, insert them back swapped.
    mutate(store, f"ALTER TABLE audit_events DELETE WHERE chain = '{chain}' AND chain_seq IN (2, 3)")
    store.insert("audit_events", [list(b[1:]) + list(chain_cols[0][1:]), list(a[1:]) + list(chain_cols[1][1:])],
                 column_names=list(AUDIT_FIELDS) + ["chain", "chain_seq", "chain_offset", "prev_hash", "event_hash"])
    assert problems(verify(store, chain)) == [("reorder", 2), ("reorder", 3)]


def test_a_forged_far_away_seq_is_a_gap_and_costs_a_few_queries(store):
    chain = write_chain(store, 5)
    mutate(store, f"ALTER TABLE audit_events UPDATE chain_seq = 1000000000 WHERE chain = '{chain}' AND chain_seq = 11")
    queries = []
    with rows_reader(store.settings_for_cli) as query:
        report = verify_store(lambda sql: queries.append(sql) or query(sql), only=[chain], page_size=5)
    assert problems(report) == [("gap", 11), ("edit", 1_000_000_000)]
    assert len(queries) < 10


def test_rows_inserted_around_the_sink_are_reported_as_unsealed(store):
    store.insert("audit_events", [[event(99)[c] for c in AUDIT_FIELDS]], column_names=list(AUDIT_FIELDS))
    with rows_reader(store.settings_for_cli) as query:
        report = verify_store(query)
        assert report.unsealed == 1 and ("unsealed", None) in problems(report)
        assert verify_store(query, allow_unsealed=True).unsealed == 1
        assert "1 audit rows carry no seal" in render(report)


def forge_in_store(client, chain: str, at: int, key: AuditKey | None, key_id: str) -> None:
    """Rewrite event ``at`` of a stored chain and re-seal the rest of it (delete, insert the forgery back)."""
    stored = list(read_chain(lambda sql: client.query(sql).result_rows, chain, 0, 10**9))
    forged = forge_tail(stored, at, key, key_id, outcome="RELEASE", detail='{"forged": true}')[at:]
    mutate(client, f"ALTER TABLE audit_events DELETE WHERE chain = '{chain}' AND chain_seq >= {at}")
    client.insert("audit_events", [[r.event[c] for c in AUDIT_FIELDS] + [r.chain, r.seq, r.offset, r.prev_hash,
                                                                          r.event_hash, r.key_id] for r in forged],
                  column_names=list(AUDIT_FIELDS + CHAIN_COLUMNS))


def test_a_keyed_sink_seals_with_hmac_rotates_keys_and_catches_a_resealed_tail(store, monkeypatch, tmp_path):
    chain = "audit.events/10"
    records = audit_records(10, 12)
    ClickHouseSink(store, K1).write(records[:6])
    ClickHouseSink(store, K2).write(records[4:])  # restarted with a new key: 4, 5 redelivered, head read back
    rows = store.query("SELECT chain_seq, key_id, prev_hash, event_hash FROM audit_events "
                       f"WHERE chain = '{chain}' ORDER BY chain_seq").result_rows
    assert [(r[0], r[1]) for r in rows] == [(i, K1.key_id if i < 6 else K2.key_id) for i in range(12)]
    assert rows[6][2] == rows[5][3]
    assert not any(k.secret.hex() in r[1] or r[1] in k.secret.hex() for k in (K1, K2) for r in rows)

    both = {"CSOS_AUDIT_KEY": K2_TEXT, "CSOS_AUDIT_OLD_KEYS": K1_TEXT}
    result = run_cli(store, monkeypatch, "--chain", chain, keys=both)
    assert result.exit_code == 0, result.output
    assert "intact" in result.output and f"keys {K1.key_id}, {K2.key_id}" in result.output
    key_file = tmp_path / "audit-keys"
    key_file.write_text(f"# retired 2026-11\n{K1_TEXT}\n{base64.b64encode(K2.secret).decode()}\n")
    assert run_cli(store, monkeypatch, "--chain", chain, "--key-file", str(key_file)).exit_code == 0
    only_new = run_cli(store, monkeypatch, "--chain", chain, keys={"CSOS_AUDIT_KEY": K2_TEXT})
    assert only_new.exit_code == 1 and "UNVERIFIABLE" in only_new.output and K1.key_id in only_new.output
    assert K1_TEXT not in only_new.output and K2_TEXT not in only_new.output
    no_key = run_cli(store, monkeypatch, "--chain", chain, "--json")
    assert no_key.exit_code == 1
    assert [(p["kind"], p["seq"]) for p in json.loads(no_key.output)["problems"]] == [("unverifiable", 0),
                                                                                      ("unverifiable", 6)]
    bad = run_cli(store, monkeypatch, "--chain", chain, keys={"CSOS_AUDIT_KEY": "0123"})
    assert bad.exit_code == 2 and "0123" not in bad.output

    # Someone with write access to ClickHouse edits seq 8 and re-seals the tail with plain SHA-256.
    forge_in_store(store, chain, 8, None, "")
    assert problems(verify(store, chain, KeyRing([K1, K2]))) == [("unkeyed", 8)]
    result = run_cli(store, monkeypatch, "--chain", chain, keys=both)
    assert result.exit_code == 1 and "UNKEYED" in result.output
    # ... or with a key of their own, the rows still naming the sink's key.
    forge_in_store(store, chain, 8, EVIL, K2.key_id)
    assert problems(verify(store, chain, KeyRing([K1, K2]))) == [("edit", 8), ("edit", 9), ("edit", 10), ("edit", 11)]

    # The same forgery of an unkeyed chain is consistent: what the key is for.
    plain = write_chain(store, 11)
    forge_in_store(store, plain, 8, None, "")
    assert verify(store, plain).ok
