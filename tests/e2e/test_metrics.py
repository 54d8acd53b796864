"""Prometheus metrics as an operator scrapes them: counts agree with the pipeline, rules and panels name real series.

The live test scrapes ``/metrics`` from the session pipeline's worker and sink (``streamed``: the
feed and the hostile extras have flowed) and compares them with what ClickHouse recorded. The rule
and dashboard test reads ``deploy/prometheus/alerts.yml`` and the operators' Grafana dashboard and
checks every ``csos_*`` series they use is in what the three processes expose. The Prometheus test
runs a real Prometheus (Debian's package, ``make prometheus``; skipped when the binary is absent) against the
same worker and sink with the alert rules loaded, and reads what it scraped and evaluated through its HTTP API.
"""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from connectors.kafka import catalogue as t

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
OPERATORS = ROOT / "deploy" / "grafana" / "dashboards" / "operators.json"
METRIC = re.compile(r"\bcsos_[a-z0-9_]+")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def samples(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(found: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in found.items() if n == name and labels.items() <= dict(lab).items())


def exposed_names(text: str) -> set[str]:
    """Every series name the exposition declares (a declared family counts even before its first sample)."""
    names: set[str] = set()
    for kind_line in re.findall(r"^# TYPE (\S+) (\w+)$", text, re.M):
        name, kind = kind_line
        names.add(name)
        if kind == "histogram":
            names.update({f"{name}_bucket", f"{name}_count", f"{name}_sum"})
        elif kind == "counter" and not name.endswith("_total"):
            names.add(f"{name}_total")
    return names


def eventually(probe: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 90, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    value = probe()
    while not ok(value) and time.monotonic() < deadline:
        time.sleep(0.5)
        value = probe()
    assert ok(value), f"timed out waiting for {what}: {value}"
    return value


# --------------------------------------------------------------------------- live: worker and sink
@pytest.mark.kafka
def test_scraped_counts_agree_with_what_the_pipeline_did(streamed):
    s = streamed.settings
    sent = len(streamed.feed.messages) + len(streamed.extra_raw) + len(streamed.extra_received)

    def pipeline_counts() -> tuple[dict[str, float], dict[str, int]]:
        w = samples(scrape_text(s.web_port))
        scraped = {o: total(w, "csos_orders_total", outcome=o) for o in ("released", "held", "rejected")}
        scraped["dead_lettered"] = total(w, "csos_dead_letters_total", stage="verify", topic=t.RECEIVED)
        held, released = streamed.sql("SELECT countIf(verdict = 'HOLD'), countIf(verdict = 'RELEASE') "
                                      "FROM verdicts FINAL")[0]
        rejected = streamed.sql("SELECT count() FROM rejections FINAL")[0][0]
        dead = streamed.sql("SELECT uniqExact(source_topic, source_partition, source_offset) FROM dead_letters "
                            f"WHERE stage = 'verify' AND source_topic = '{t.RECEIVED}'")[0][0]
        stored = {"held": int(held), "released": int(released), "rejected": int(rejected), "dead_lettered": int(dead)}
        return scraped, stored

    scraped, stored = eventually(pipeline_counts, lambda c: c[0] == c[1], what="scraped counts == ClickHouse")
    # Every order sent has exactly one outcome: released, held, rejected or dead-lettered.
    assert sum(scraped.values()) == sent, (scraped, sent)
    assert scraped["held"] > 0 and scraped["released"] > 0 and scraped["rejected"] > 0

    worker = samples(scrape_text(s.web_port))
    # Rejections by reason and holds by detector are the same orders, broken down.
    by_reason = dict(streamed.sql("SELECT reason_code, count() FROM rejections FINAL GROUP BY reason_code"))
    for reason, n in by_reason.items():
        assert total(worker, "csos_rejections_total", reason=reason) == n, reason
    by_detector = dict(streamed.sql(
        "SELECT detector, uniqExact(order_id) FROM verdict_reasons FINAL "
        "WHERE verdict = 'HOLD' AND fired AND enforced GROUP BY detector"))
    for detector, n in by_detector.items():
        assert total(worker, "csos_holds_total", detector=detector) == n, detector
    # One latency observation per decided order.
    decided = scraped["held"] + scraped["released"] + scraped["rejected"]
    assert total(worker, "csos_order_decision_seconds_count") == decided
    # The verifier's CRLs: one series per issuer, each in force (nextUpdate ahead).
    crl = {dict(lab)["issuer"]: v for (n, lab), v in worker.items() if n == "csos_crl_seconds_until_next_update"}
    assert crl and all(v > 0 for v in crl.values()), crl
    # Every garbage collection of the worker is timed, by generation (young ones happen in any run).
    pauses = {dict(lab)["generation"]: v for (n, lab), v in worker.items() if n == "csos_gc_pause_seconds_count"}
    assert set(pauses) == {"0", "1", "2"} and pauses["0"] > 0, pauses
    # Lag per input partition, back to 0 once everything is decided.
    lag = eventually(lambda: {dict(lab)["partition"]: v for (n, lab), v in samples(scrape_text(s.web_port)).items()
                              if n == "csos_consumer_lag_messages" and dict(lab)["topic"] == t.RECEIVED},
                     lambda found: len(found) == s.partitions and not any(found.values()), what="worker lag 0")
    assert set(lag) == {str(p) for p in range(s.partitions)}

    sink = eventually(lambda: samples(scrape_text(s.sink_port)),
                      lambda f: any(n == "csos_consumer_lag_messages" for n, _ in f)
                      and total(f, "csos_consumer_lag_messages") == 0, what="sink lag 0")
    assert total(sink, "csos_sink_batch_messages_count") > 0
    assert total(sink, "csos_sink_insert_seconds_count") > 0
    # Rows written at least cover the stored rows (a retried batch may write a copy ClickHouse collapses).
    assert total(sink, "csos_sink_rows_written_total", table="verdicts") >= stored["held"] + stored["released"]
    assert total(sink, "csos_sink_rows_written_total", table="rejections") >= stored["rejected"]
    assert time.time() - total(sink, "csos_sink_last_write_timestamp_seconds") < 600


# --------------------------------------------------------------------------- a real Prometheus scrapes them
PROMETHEUS = shutil.which("prometheus")


def prometheus_api(port: int, path: str, **params: str) -> Any:
    """``data`` of a Prometheus HTTP API answer (fails on an API error)."""
    url = f"http://127.0.0.1:{port}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as r:
        answer = json.loads(r.read())
    assert answer["status"] == "success", answer
    return answer["data"]


def prometheus_config(worker_port: int, sink_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml's jobs and rules, aimed at the session's processes, scraping every second.

    Written as JSON (YAML's subset): no YAML library needed."""
    return {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "csos-worker", "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]},
                               {"job_name": "csos-sink", "static_configs": [{"targets": [f"127.0.0.1:{sink_port}"]}]}]}


@pytest.fixture
def prometheus(streamed, tmp_path: Path) -> Iterator[int]:
    """A real Prometheus (Debian's 2.42) on a free port scraping the session's worker and sink; yields its port."""
    if PROMETHEUS is None:
        pytest.skip("prometheus binary not installed (`make prometheus` installs Debian's prometheus package)")
    from streams.tools.broker import free_port

    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps(prometheus_config(streamed.settings.web_port, streamed.settings.sink_port)))
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if proc.returncode not in (0, -15):
            print((tmp_path / "prometheus.log").read_text()[-4000:])


@pytest.mark.kafka
def test_prometheus_scrapes_the_pipeline_and_evaluates_every_alert_rule(streamed, prometheus):
    """What an operator's Prometheus sees: both targets up, orders by outcome equal to the orders sent, and every
    rule of deploy/prometheus/alerts.yml loaded and evaluated without error."""
    port = prometheus

    def api(path: str, **params: str) -> Any:
        try:
            return prometheus_api(port, path, **params)
        except OSError:  # not listening yet
            return None

    targets = eventually(lambda: api("targets", state="active"),
                         lambda d: d is not None and len(d["activeTargets"]) == 2
                         and all(t["health"] == "up" for t in d["activeTargets"]), what="both targets up")
    assert {t["labels"]["job"] for t in targets["activeTargets"]} == {"csos-worker", "csos-sink"}

    sent = len(streamed.feed.messages) + len(streamed.extra_raw) + len(streamed.extra_received)
    worker = samples(scrape_text(streamed.settings.web_port))
    direct = {o: total(worker, "csos_orders_total", outcome=o) for o in ("released", "held", "rejected")}
    dead = total(worker, "csos_dead_letters_total", stage="verify", topic=t.RECEIVED)

    def outcomes() -> dict[str, float] | None:
        data = api("query", query='sum by (outcome) (csos_orders_total{job="csos-worker"})')
        return None if data is None else {r["metric"]["outcome"]: float(r["value"][1]) for r in data["result"]}

    queried = eventually(outcomes, lambda o: o is not None and {k: o.get(k, 0.0) for k in direct} == direct,
                         what="Prometheus's orders by outcome == the worker's /metrics")
    assert sum(queried.values()) + dead == sent, (queried, dead, sent)
    assert all(queried[o] > 0 for o in ("released", "held", "rejected")), queried

    expected = set(alert_rules())

    def rules() -> dict[str, dict[str, Any]] | None:
        data = api("rules", type="alert")
        return None if data is None else {r["name"]: r for g in data["groups"] for r in g["rules"]}

    loaded = eventually(rules, lambda r: r is not None and set(r) == expected
                        and all(rule["health"] != "unknown" for rule in r.values()), what="every rule evaluated")
    errors = {name: rule.get("lastError") for name, rule in loaded.items() if rule["health"] != "ok"}
    assert not errors, errors


# --------------------------------------------------------------------------- rules and panels name real series
def review_exposition(tmp_path: Path) -> str:
    """The review page's /metrics, from the app itself (its open-case gauges from a stub case list)."""
    from aiohttp.test_utils import TestClient, TestServer
    from cryptography.fernet import Fernet

    from streams.core.config import Settings
    from streams.apps.review.web import ReviewConfig, create_review_app

    class Cases:
        def held_cases(self) -> list[Any]:
            return []

    settings = Settings.from_env().with_(data_dir=tmp_path)
    config = ReviewConfig(port=0, users_path=tmp_path / "users.json", secret=Fernet.generate_key().decode())

    async def go() -> str:
        async with TestClient(TestServer(create_review_app(settings, config, data=Cases()))) as client:  # type: ignore[arg-type]
            resp = await client.get("/metrics")
            assert resp.status == 200
            return await resp.text()
    return asyncio.run(go())


def alert_rules() -> dict[str, str]:
    """alert name -> expr, from deploy/prometheus/alerts.yml (each ``expr:`` on one line, so no YAML library)."""
    rules, name = {}, None
    for line in ALERTS.read_text().splitlines():
        m = re.match(r"\s*- alert:\s*(\S+)", line)
        if m:
            name = m.group(1)
        m = re.match(r"\s*expr:\s*(.+)$", line)
        if m:
            assert name and name not in rules, f"expr without its own alert: {line}"
            rules[name] = m.group(1).strip()
    return rules


def used_names() -> dict[str, set[str]]:
    """csos_* names in each alert rule and each operators' panel target."""
    used: dict[str, set[str]] = {f"alert {name}": set(METRIC.findall(expr)) for name, expr in alert_rules().items()}
    for panel in json.loads(OPERATORS.read_text())["panels"]:
        for target in panel.get("targets", []):
            used.setdefault(f"panel {panel['title']}", set()).update(METRIC.findall(target.get("expr", "")))
    return used


def test_every_alert_and_operator_panel_uses_series_the_processes_expose(tmp_path):
    from connectors.kafka import metrics

    exposed = exposed_names(metrics.exposition()[0].decode()) | exposed_names(review_exposition(tmp_path))
    used = used_names()
    assert {"alert StaleCrl", "alert ConsumerLagGrowing", "alert SinkNotWriting", "alert DeadLettersRising"} <= set(used)
    assert all(used.values()), [k for k, v in used.items() if not v]  # every rule and panel reads a csos_ series
    missing = {where: sorted(names - exposed) for where, names in used.items() if names - exposed}
    assert not missing, missing


@pytest.mark.kafka
def test_worker_and_sink_expose_what_rules_and_panels_use(streamed):
    """The same, against the running processes' own /metrics (not only this test process's registry)."""
    s = streamed.settings
    exposed = exposed_names(scrape_text(s.web_port)) | exposed_names(scrape_text(s.sink_port))
    review_only = {"csos_cases_open", "csos_cases_open_past_due"}
    for where, names in used_names().items():
        assert not (names - exposed - review_only), (where, sorted(names - exposed))


# --------------------------------------------------------------------------- counting at the emitter, no broker
def test_the_emitter_counts_outcomes_once_delivered_and_bounds_dead_letter_reasons():
    from datetime import datetime, timedelta, timezone

    from prometheus_client import REGISTRY

    from connectors.kafka.emit import Emitter
    from tests.unit.test_review import line, verdict, verified

    class Broker:
        def __init__(self) -> None:
            self.sent: list[Any] = []

        def publish(self, topic: str, key: Any, value: bytes) -> None:
            self.sent.append(topic)

        async def flush_async(self) -> None:
            return None

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {"held": value("csos_orders_total", outcome="held"), "size": value("csos_holds_total", detector="size"),
              "ref": value("csos_holds_total", detector="static_8000_du"),
              "bad": value("csos_rejections_total", reason="BAD_SIGNATURE"),
              "lat": value("csos_order_decision_seconds_count", outcome="held"),
              "fast": value("csos_order_decision_seconds_bucket", outcome="held", le="5.0")}
    received = datetime.now(timezone.utc) - timedelta(seconds=2)
    held = verdict(verified("m1", received, [line(1, 5000)]), True)
    held["decided_at"] = received + timedelta(seconds=2)
    emitter = Emitter(Broker(), "monitor-agent", buffered=True)  # type: ignore[arg-type]
    emitter.send(t.VERDICTS, "som.Verdict", "m1", held)
    assert value("csos_orders_total", outcome="held") == before["held"]  # buffered: not delivered yet
    assert asyncio.run(emitter.publish_pending()) == 1
    assert value("csos_orders_total", outcome="held") == before["held"] + 1
    assert value("csos_holds_total", detector="size") == before["size"] + 1
    assert value("csos_holds_total", detector="static_8000_du") == before["ref"]  # fired but only recorded
    assert value("csos_order_decision_seconds_count", outcome="held") == before["lat"] + 1
    assert value("csos_order_decision_seconds_bucket", outcome="held", le="5.0") == before["fast"] + 1

    now = Emitter(Broker(), "verify-agent")  # type: ignore[arg-type]  # immediate: counted as sent
    now.send(t.REJECTED, "csos.orders.Rejection", "r1", {
        "order_id": "r1", "received_at": received, "rejected_at": received, "reason_code": "BAD_SIGNATURE",
        "reason": "x", "order_number": None, "purchaser_dea": None, "signer_subject": None, "checks": []})
    assert value("csos_rejections_total", reason="BAD_SIGNATURE") == before["bad"] + 1
    now.dead_letter("verify", t.RECEIVED, 0, 7, b"k", b"\x00", "undecodable ReceivedOrder: bad byte 0x00 at 7")
    now.dead_letter("reference", t.CRL, 0, 8, b"k", b"\x00", "CRL from CN=Test CA 42 has nextUpdate 2026-01-01 "
                                                              "00:00:00 not after thisUpdate")
    assert value("csos_dead_letters_total", stage="verify", topic=t.RECEIVED, reason="undecodable ReceivedOrder") >= 1
    assert value("csos_dead_letters_total", stage="reference", topic=t.CRL, reason="other") >= 1  # no CA names
