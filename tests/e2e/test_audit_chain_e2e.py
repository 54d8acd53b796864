"""The audit trail of a real run: sealed by the sink with the session's key, verified through /sql and the CLI.

The chain's unit tests (sealing, forgery, rotation) are tests/unit/test_audit_chain.py.
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from connectors.clickhouse.audit_chain import AuditKey, KeyRing, render, verify_store
from connectors.clickhouse.query import open_reader
from streams.cli import main as cli
from tests.conftest import TEST_AUDIT_KEY

# ------------------------------------------------------------------------------------------ the real pipeline
@pytest.mark.kafka
def test_the_audit_trail_of_a_real_run_is_sealed_and_verifies_clean(streamed, monkeypatch):
    s = streamed.settings
    assert s.audit_key == TEST_AUDIT_KEY  # the session pipeline seals with a key (tests/conftest.py)
    key = AuditKey.parse(s.audit_key)
    with open_reader(s) as read:  # through the running sink's /sql
        query = lambda sql: read(sql)[1]  # noqa: E731 - SQL -> rows, what verify_store reads
        report = verify_store(query, keys=KeyRing.from_settings(s))
        unkeyed_view = verify_store(query)  # a verifier without the key cannot vouch for it
    assert report.ok, render(report)
    assert report.unsealed == 0
    assert all(c.key_ids == [key.key_id] for c in report.chains)
    assert not unkeyed_view.ok and {p.kind for p in unkeyed_view.problems} == {"unverifiable"}
    checked = sum(c.events for c in report.chains)
    assert checked >= len(streamed.feed.messages)  # at least one audit event per order received
    assert all(c.first_seq == 0 and c.head_hash for c in report.chains)
    # Sealing follows Kafka's order: within a chain, offsets grow with seq.
    (bad,) = streamed.sql("SELECT count() FROM (SELECT arrayMap(t -> t.2, arraySort(groupArray((chain_seq, "
                          "chain_offset)))) AS o FROM audit_events WHERE chain != '' GROUP BY chain) "
                          "WHERE arraySort(o) != o")[0]
    assert int(bad) == 0
    for name, value in {"CSOS_DATA_DIR": str(s.data_dir), "CSOS_SINK_PORT": str(s.sink_port),
                        "CLICKHOUSE_URL": "", "KAFKA_BOOTSTRAP": s.kafka_bootstrap,
                        "CSOS_AUDIT_KEY": s.audit_key}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CSOS_AUDIT_OLD_KEYS", raising=False)
    result = CliRunner().invoke(cli, ["audit", "verify", "--json"])
    assert result.exit_code == 0, result.output
    assert {c["chain"] for c in json.loads(result.output)["chains"]} >= {c.chain for c in report.chains}
    # The sink says which key seals (by id); no process logs the key itself.
    sink_log = (s.data_dir / "sink.log").read_text(errors="replace")
    assert f"key id {key.key_id}" in sink_log
    for log in ("sink.log", "worker.log"):
        text = (s.data_dir / log).read_text(errors="replace")
        assert s.audit_key not in text and s.audit_key.upper() not in text
