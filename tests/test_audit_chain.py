"""The tamper-evident audit trail: sealing in the sink, and verification that finds every edit, gap and reorder.

Three levels: the pure chain logic; the real sink code path into a real
embedded ClickHouse, tampered with the way someone with write access to the
store would (mutations, delete and re-insert); and a real pipeline run, whose
whole audit trail must be sealed and verify clean.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

from connectors.audit_chain import (
    AUDIT_FIELDS, GENESIS, ChainRow, ChainSealer, Head, canonical, epoch_ms, load_anchors, open_reader, render, seal,
    verify_rows, verify_store,
)
from connectors.broker import free_port
from connectors.clickhouse_sink import ClickHouseSink, SourceRecord, apply_ddl, open_client
from streams.cli import main as cli
from streams.config import Settings

T0 = datetime(2026, 11, 20, 12, 0, 0, 123000, tzinfo=timezone.utc)
AUDIT = "audit.events"


def event(i: int, **changes) -> dict:
    ev = {"event_id": f"ev-{i}", "occurred_at": T0 + timedelta(seconds=i), "stage": "monitor", "action": "order.held",
          "order_id": f"order-{i}" if i % 3 else None, "purchaser_dea": "BE8821844" if i % 2 else None,
          "outcome": "HOLD", "detail": json.dumps({"i": i, "note": "größe ✓"}), "actor": "worker-1"}
    ev.update(changes)
    return ev


def sealed_chain(n: int, chain: str = "audit.events/0", offset0: int = 0) -> list[ChainRow]:
    """What the sink would store for events 0..n-1 at consecutive offsets (via the real sealer)."""
    sealer = ChainSealer(lambda _c: None)
    rows = []
    for i in range(n):
        (row,) = sealer.seal_rows(AUDIT, int(chain.rsplit("/", 1)[1]), offset0 + i,
                                  [[event(i)[c] for c in AUDIT_FIELDS]])
        rows.append(ChainRow(row[9], row[10], row[11], row[12], row[13], dict(zip(AUDIT_FIELDS, row[:9]))))
    return rows


def problems(report) -> list[tuple[str, int | None]]:
    return [(p.kind, p.seq) for p in report.problems]


def moved(row: ChainRow, **changes) -> ChainRow:
    return ChainRow(**{**row.__dict__, **changes})


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


def verify(client, chain: str):
    with open_reader(client.settings_for_cli) as query:
        return verify_store(query, only=[chain], page_size=5)  # small pages: chains span several queries


def mutate(client, sql: str) -> None:
    client.command(sql + " SETTINGS mutations_sync = 1")


def run_cli(client, monkeypatch, *args: str):
    s = client.settings_for_cli
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
    with open_reader(store.settings_for_cli) as query:
        report = verify_store(lambda sql: queries.append(sql) or query(sql), only=[chain], page_size=5)
    assert problems(report) == [("gap", 11), ("edit", 1_000_000_000)]
    assert len(queries) < 10


def test_rows_inserted_around_the_sink_are_reported_as_unsealed(store):
    store.insert("audit_events", [[event(99)[c] for c in AUDIT_FIELDS]], column_names=list(AUDIT_FIELDS))
    with open_reader(store.settings_for_cli) as query:
        report = verify_store(query)
        assert report.unsealed == 1 and ("unsealed", None) in problems(report)
        assert verify_store(query, allow_unsealed=True).unsealed == 1
        assert "1 audit rows carry no seal" in render(report)


# ------------------------------------------------------------------------------------------ the real pipeline
@pytest.mark.kafka
def test_the_audit_trail_of_a_real_run_is_sealed_and_verifies_clean(streamed, monkeypatch):
    s = streamed.settings
    with open_reader(s) as query:  # through the running sink's /sql
        report = verify_store(query)
    assert report.ok, render(report)
    assert report.unsealed == 0
    checked = sum(c.events for c in report.chains)
    assert checked >= len(streamed.feed.messages)  # at least one audit event per order received
    assert all(c.first_seq == 0 and c.head_hash for c in report.chains)
    # Sealing follows Kafka's order: within a chain, offsets grow with seq.
    (bad,) = streamed.sql("SELECT count() FROM (SELECT arrayMap(t -> t.2, arraySort(groupArray((chain_seq, "
                          "chain_offset)))) AS o FROM audit_events WHERE chain != '' GROUP BY chain) "
                          "WHERE arraySort(o) != o")[0]
    assert int(bad) == 0
    for name, value in {"CSOS_DATA_DIR": str(s.data_dir), "CSOS_SINK_PORT": str(s.sink_port),
                        "CLICKHOUSE_URL": "", "KAFKA_BOOTSTRAP": s.kafka_bootstrap}.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(cli, ["audit", "verify", "--json"])
    assert result.exit_code == 0, result.output
    assert {c["chain"] for c in json.loads(result.output)["chains"]} >= {c.chain for c in report.chains}
