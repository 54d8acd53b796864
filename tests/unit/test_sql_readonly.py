"""Read-only means read-only: the analysts' SQL path admits one SELECT, and nothing else reaches the engine.

Issue 9: through the sink's /sql an attacker ran ``SELECT '<PEM>' INTO OUTFILE '<data>/pki/trust/root-x.pem'``
(the embedded engine's ``readonly=1`` does not stop it), overwrote the review users file, ran SYSTEM and
KILL, and could do so from any web page (no token, any Host/Origin, GET). No broker here: the store is an
embedded engine in a temporary directory and the sink's HTTP server runs on a stand-in service.
"""
from __future__ import annotations

import http.client
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streams.tools.broker import free_port
from connectors.clickhouse.client import apply_ddl, open_client, run_readonly_query
from streams.tools.pki import TestPKI
from streams.pipeline.sink_service import ensure_sink_token, serve_http
from connectors.clickhouse.sql_guard import RefusedQuery
from streams.core.config import Settings
from streams.core.file_safety import UnsafeFileError
from streams.domain.products import ProductMaster
from connectors.clickhouse.query import QueryError, run_query, sink_token
from streams.apps.review.auth import UserStore
from streams.verification import Verifier

TOKEN = "t0ken-for-tests-" + "x" * 20


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Any, Any]]:
    """A store with one verdict, its writer session, and the analysts' read-only session."""
    data = tmp_path_factory.mktemp("ro-store")
    settings = Settings().with_(data_dir=data, sink_port=free_port(), clickhouse_url="", sql_token="")
    writer = open_client(settings)
    apply_ddl(writer)
    writer.command("INSERT INTO verdicts (order_id, verdict) VALUES ('o-1', 'RELEASE')")
    reader = open_client(settings, readonly=True)
    yield settings, writer, reader
    reader.close()
    writer.close()


def planted(settings: Settings) -> Path:
    """Where the attack writes: a trust anchor the worker would load at its next start."""
    return settings.data_dir / "pki" / "trust" / "root-x.pem"


def refused_statements(target: str) -> list[tuple[str, str]]:
    """(label, SQL) of every kind of statement the read-only path must refuse."""
    pem = "-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----"
    return [
        ("into outfile", f"SELECT '{pem}' AS x INTO OUTFILE '{target}'"),
        ("into outfile truncate", f"SELECT 'x' INTO OUTFILE '{target}' TRUNCATE"),
        ("outfile after a comment", f"SELECT 1 /* harmless */ INTO OUTFILE '{target}'"),
        ("outfile after a line comment", f"SELECT 1 -- harmless\nINTO OUTFILE '{target}'"),
        ("outfile hidden from a nesting parser", f"SELECT 1 /* /* */ INTO OUTFILE '{target}' /* */ */"),
        ("hash comment", f"SELECT 1 # comment\nINTO OUTFILE '{target}'"),
        ("system", "SYSTEM STOP MERGES"),
        ("kill", "KILL QUERY WHERE 1"),
        ("set", "SET readonly = 0"),
        ("insert", "INSERT INTO verdicts (order_id, verdict) VALUES ('forged', 'RELEASE')"),
        ("insert into function", f"INSERT INTO FUNCTION file('{target}', 'TSV') SELECT 1"),
        ("alter", "ALTER TABLE verdicts DELETE WHERE 1"),
        ("create", "CREATE TABLE evil (a Int8) ENGINE = Memory"),
        ("drop", "DROP TABLE verdicts"),
        ("optimize", "OPTIMIZE TABLE verdicts FINAL"),
        ("truncate", "TRUNCATE TABLE verdicts"),
        ("attach", "ATTACH TABLE evil FROM '/tmp' (a Int8) ENGINE = Memory"),
        ("explain", "EXPLAIN PIPELINE SELECT 1"),
        ("two statements", "SELECT 1; DROP TABLE verdicts"),
        ("two selects", "SELECT 1; SELECT 2"),
        ("table function file", "SELECT * FROM file('/etc/hostname', 'LineAsString')"),
        ("table function url", "SELECT * FROM url('http://127.0.0.1:9/', 'LineAsString')"),
        ("table function in a join", "SELECT * FROM verdicts AS v JOIN remote('127.0.0.1', system.one) AS r ON 1"),
        ("table function after a comma", "SELECT * FROM verdicts, executable('id', 'TSV', 'a String')"),
        ("table function in a subquery", "SELECT 1 WHERE 1 IN (SELECT * FROM s3('http://x/y.csv'))"),
        ("quoted table function", "SELECT * FROM `file`('/etc/hostname', 'LineAsString')"),
        ("scalar file()", "SELECT file('/etc/hostname')"),
        ("quoted scalar file()", "SELECT \"file\"('/etc/hostname')"),
        ("settings readonly", "SELECT 1 SETTINGS readonly = 0"),
        ("settings limits", "SELECT 1 SETTINGS max_execution_time = 0, max_result_rows = 0"),
        ("format", "SELECT 1 FORMAT TSV"),
        ("heredoc", "SELECT $$x$$"),
        ("unterminated comment", f"SELECT 1 /* INTO OUTFILE '{target}'"),
        ("empty", "  ;  "),
    ]


@pytest.mark.parametrize("label", [label for label, _ in refused_statements("/x")])
def test_every_non_select_is_refused_before_the_engine_and_writes_nothing(store, label: str) -> None:
    settings, writer, reader = store
    target = planted(settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    sql = dict(refused_statements(str(target)))[label]
    with pytest.raises(RefusedQuery, match="readonly query refused"):
        run_readonly_query(reader, sql)
    assert not target.exists(), "the query wrote a file"
    assert writer.query("SELECT count() FROM verdicts").result_rows == [(1,)]
    assert writer.query("SELECT count() FROM system.tables WHERE name = 'evil'").result_rows == [(0,)]


def test_the_refusal_names_what_was_refused(store) -> None:
    _, _, reader = store
    with pytest.raises(RefusedQuery, match="INTO"):
        run_readonly_query(reader, "SELECT 1 INTO OUTFILE '/tmp/x'")
    with pytest.raises(RefusedQuery, match=r"table function url\(\)"):
        run_readonly_query(reader, "SELECT * FROM url('http://x')")
    with pytest.raises(RefusedQuery, match="more than one statement"):
        run_readonly_query(reader, "SELECT 1; SELECT 2")


@pytest.mark.parametrize("sql, rows", [
    ("SELECT order_id, verdict FROM verdicts", [("o-1", "RELEASE")]),
    ("select count() from verdicts FINAL;", [(1,)]),
    ("WITH r AS (SELECT order_id FROM verdicts) SELECT count() FROM r", [(1,)]),
    ("SELECT 'INTO OUTFILE ''/x''; DROP TABLE verdicts' AS s", [("INTO OUTFILE '/x'; DROP TABLE verdicts",)]),
    ("SELECT 1 AS `into` -- a comment: SYSTEM STOP MERGES", [(1,)]),
    ("SELECT format('{}-{}', 1, 2), extract(YEAR FROM toDate('2026-01-02'))", [("1-2", 2026)]),
    ("SELECT value FROM system.settings WHERE name = 'readonly'", [("1",)]),
    ("SELECT v.order_id FROM verdicts AS v JOIN (SELECT 'o-1' AS order_id) AS o ON v.order_id = o.order_id",
     [("o-1",)]),
])
def test_plain_selects_still_work(store, sql: str, rows: list[tuple]) -> None:
    _, _, reader = store
    assert run_readonly_query(reader, sql)[1] == rows


def test_the_engine_session_is_read_only_and_limited_even_without_the_guard(store) -> None:
    """Second line: the analysts' session refuses writes and setting changes, and stops runaway queries."""
    settings, _, _ = store
    tight = open_client(settings.with_(sql_max_rows=5, sql_max_seconds=1), readonly=True)
    try:
        for sql in ("SELECT 1 SETTINGS readonly = 0", "SELECT 1 SETTINGS max_execution_time = 0",
                    "INSERT INTO verdicts (order_id) VALUES ('forged')",
                    "SELECT * FROM file('/etc/hostname', 'LineAsString')"):
            with pytest.raises(Exception, match="readonly|READONLY"):
                tight.query(sql)
        with pytest.raises(Exception, match="TOO_MANY_ROWS"):
            run_readonly_query(tight, "SELECT number FROM system.numbers LIMIT 50")
        with pytest.raises(Exception, match="TIMEOUT_EXCEEDED"):
            run_readonly_query(tight, "SELECT count() FROM system.numbers WHERE sleepEachRow(0) = 0")
    finally:
        tight.close()


# ----------------------------------------------------------------------------------------- the sink's /sql
class Service:
    """What serve_http needs from the sink: query() through the read-only gate, and health()."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def query(self, sql: str) -> tuple[list[str], list[tuple]]:
        return run_readonly_query(self.reader, sql)

    def health(self) -> dict[str, Any]:
        return {"status": "ok"}


@pytest.fixture(scope="module")
def endpoint(store) -> Iterator[int]:
    _, _, reader = store
    server = serve_http(Service(reader), 0, TOKEN)
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def call(port: int, method: str, path: str, body: str | None = None, **headers: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    sent = {"Host": f"127.0.0.1:{port}", **{k.replace("_", "-"): v for k, v in headers.items()}}
    conn.request(method, path, body=body.encode() if body is not None else None, headers=sent)
    resp = conn.getresponse()
    status, payload = resp.status, json.loads(resp.read() or b"{}")
    conn.close()
    return status, payload


def test_the_endpoint_answers_a_local_client_with_the_token(endpoint: int) -> None:
    status, payload = call(endpoint, "POST", "/sql", "SELECT order_id FROM verdicts",
                           Authorization=f"Bearer {TOKEN}")
    assert (status, payload) == (200, {"columns": ["order_id"], "rows": [["o-1"]]})
    status, payload = call(endpoint, "POST", "/sql", "SELECT 1", Authorization=f"Bearer {TOKEN}",
                           Host=f"localhost:{endpoint}", Origin=f"http://localhost:{endpoint}")
    assert status == 200


@pytest.mark.parametrize("method, headers, want", [
    ("GET", {"Authorization": f"Bearer {TOKEN}"}, 405),  # GET /sql?q= was a CSRF vector
    ("POST", {}, 401),
    ("POST", {"Authorization": "Bearer wrong-token"}, 401),
    ("POST", {"Authorization": TOKEN}, 401),  # not a bearer token
    ("POST", {"Authorization": f"Bearer {TOKEN}", "Host": "attacker.example:{port}"}, 403),  # DNS rebinding
    ("POST", {"Authorization": f"Bearer {TOKEN}", "Host": "127.0.0.1:1"}, 403),
    ("POST", {"Authorization": f"Bearer {TOKEN}", "Origin": "http://attacker.example"}, 403),  # browser CSRF
    ("POST", {"Authorization": f"Bearer {TOKEN}", "Origin": "null"}, 403),
])
def test_the_endpoint_refuses_what_is_not_a_local_authenticated_post(endpoint: int, method: str,
                                                                      headers: dict[str, str], want: int) -> None:
    headers = {k: v.format(port=endpoint) for k, v in headers.items()}
    status, payload = call(endpoint, method, "/sql?q=SELECT%201" if method == "GET" else "/sql",
                           "SELECT 1" if method == "POST" else None, **headers)
    assert status == want and payload["error"], payload


def test_the_endpoint_refuses_the_attack_and_oversized_bodies(store, endpoint: int) -> None:
    settings, _, _ = store
    target = planted(settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    status, payload = call(endpoint, "POST", "/sql", f"SELECT 'pem' INTO OUTFILE '{target}'",
                           Authorization=f"Bearer {TOKEN}")
    assert status == 400 and "INTO" in payload["error"] and not target.exists()
    try:
        status, payload = call(endpoint, "POST", "/sql", "SELECT '" + "x" * 1_100_000 + "'",
                               Authorization=f"Bearer {TOKEN}")
    except (BrokenPipeError, ConnectionResetError):
        status = 413  # the server answered 413 and closed before the client had sent the whole body
    assert status == 413


def test_health_needs_no_token_and_reveals_no_secret(endpoint: int) -> None:
    status, payload = call(endpoint, "GET", "/health")
    assert status == 200 and payload["status"] == "ok" and TOKEN not in json.dumps(payload)


def test_the_cli_path_reads_the_sink_token_file(store) -> None:
    """`csos sql` (connectors.clickhouse.query.run_query) finds the running sink and sends the token it wrote (mode 0600)."""
    settings, _, reader = store
    token = ensure_sink_token(settings)
    path = settings.data_dir / "sink-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and sink_token(settings) == token
    server = serve_http(Service(reader), settings.sink_port, token)
    try:
        assert run_query(settings, "SELECT order_id FROM verdicts") == (["order_id"], [["o-1"]])
        with pytest.raises(QueryError, match="readonly query refused"):
            run_query(settings, "SYSTEM STOP MERGES")
        with pytest.raises(QueryError, match="token"):
            run_query(settings.with_(sql_token="not-the-sink-token"), "SELECT 1")
    finally:
        server.shutdown()
        server.server_close()


def test_a_token_from_the_environment_is_not_written_to_disk(tmp_path: Path) -> None:
    settings = Settings().with_(data_dir=tmp_path, sql_token="")
    ensure_sink_token(settings)  # a generated one from an earlier start
    assert ensure_sink_token(settings.with_(sql_token=TOKEN)) == TOKEN
    assert not (tmp_path / "sink-token").exists()


# --------------------------------------------------------------------- files the query engine must not feed
@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    previous = os.umask(0o002)  # a common desktop umask: group-writable by default
    try:
        TestPKI.create(reuse_keys=True).write_pki(tmp_path / "pki")
    finally:
        os.umask(previous)
    return tmp_path / "pki"


def products() -> ProductMaster:
    return ProductMaster.load(Settings().products_path)


def test_the_test_pki_is_written_with_modes_the_worker_accepts(pki_dir: Path) -> None:
    Verifier.from_pki_dir(pki_dir, products())
    assert stat.S_IMODE((pki_dir / "trust").stat().st_mode) == 0o755
    assert stat.S_IMODE((pki_dir / "trust" / "root.pem").stat().st_mode) == 0o644


@pytest.mark.parametrize("victim, mode", [("trust", 0o777), ("trust", 0o775), ("trust/root.pem", 0o666),
                                          ("trust/csos-sub-ca.pem", 0o664)])
def test_the_worker_refuses_a_trust_directory_others_can_write(pki_dir: Path, victim: str, mode: int) -> None:
    os.chmod(pki_dir / victim, mode)
    with pytest.raises(UnsafeFileError, match="writable by group or others"):
        Verifier.from_pki_dir(pki_dir, products())


def test_a_planted_group_writable_anchor_stops_the_worker(pki_dir: Path) -> None:
    planted_anchor = pki_dir / "trust" / "root-x.pem"
    planted_anchor.write_bytes((pki_dir / "trust" / "root.pem").read_bytes())
    os.chmod(planted_anchor, 0o664)
    with pytest.raises(UnsafeFileError, match="root-x.pem"):
        Verifier.from_pki_dir(pki_dir, products())


def test_the_review_refuses_a_users_file_others_can_write(tmp_path: Path) -> None:
    users = UserStore(tmp_path / "review-users.json")
    users.add("alice", "analyst", "correct horse battery staple")
    assert users.authenticate("alice", "correct horse battery staple") is not None
    os.chmod(users.path, 0o666)
    with pytest.raises(UnsafeFileError, match="review users file"):
        users.authenticate("alice", "correct horse battery staple")
