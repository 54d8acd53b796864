"""The whole pipeline against the real broker and the embedded ClickHouse engine.

One simulated feed (every kind of bad order, injected suspicious episodes) is
streamed once per session through a real worker process; each test checks one
promise the pipeline makes to its users.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from streams.monitoring.open_cases import DUE_DILIGENCE_RULES
from streams.tools.demo import WAITING_DETECTORS

from connectors.kafka import catalogue as t
from streams.core.avro_codec import default_codec

pytestmark = pytest.mark.kafka
codec = default_codec()


def _decode_all(messages, schema):
    return [codec.decode(m.value(), expect=schema)[1] for m in messages]


@pytest.fixture(scope="module")
def outputs(streamed):
    feed = streamed.feed
    n_rejected = sum(1 for m in feed.messages if m.sim.expected_outcome.startswith("REJECT:")) + len(
        streamed.extra_received)
    n_verdicts = sum(1 for m in feed.messages if m.sim.expected_outcome in ("RELEASE", "HOLD"))
    n_dlq = sum(1 for m in feed.messages if m.malformed) + len(streamed.extra_raw)
    return {
        "rejections": _decode_all(streamed.topic(t.REJECTED, n_rejected), "csos.orders.Rejection"),
        "verdicts": _decode_all(streamed.topic(t.VERDICTS, n_verdicts), "som.Verdict"),
        "dlq": _decode_all(streamed.topic(t.DLQ, n_dlq), "dlq.DeadLetter"),
    }


def test_the_worker_commits_every_input_it_decided(streamed):
    """Committed offsets reach the end of each input: a restart resumes where the worker was, not from the start.

    (A consumer that never commits still decides everything once; only a
    restart shows it, by deciding the whole history again.)
    """
    import time

    from streams.tools.chaos import committed_and_ends

    partitions = list(range(streamed.settings.partitions))
    deadline = time.monotonic() + 60
    while True:
        behind = {topic: {p: ce for p, ce in committed_and_ends(streamed.settings, partitions, topic).items()
                          if ce[0] != ce[1]}
                  for topic in (t.RECEIVED, t.VERIFIED)}
        if not any(behind.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not any(behind.values()), f"(committed, end) per partition not caught up: {behind}"


def test_feed_covers_every_kind(streamed):
    labels = Counter(m.sim.label for m in streamed.feed.messages)
    assert len(streamed.feed.messages) >= 1000
    for kind in ("tampered", "wrong_key", "expired_cert", "revoked_cert", "dea_mismatch", "schedule_not_authorized",
                 "untrusted_cert", "malformed_order", "malformed_bytes", "size_spike", "frequency_burst",
                 "family_shift", "normal"):
        assert labels[kind] > 0, kind


def test_every_order_has_exactly_one_outcome(streamed, outputs):
    rejected = Counter(r["order_id"] for r in outputs["rejections"])
    decided = Counter(v["order_id"] for v in outputs["verdicts"])
    assert all(n == 1 for n in rejected.values()), "an order was rejected twice"
    assert all(n == 1 for n in decided.values()), "an order got two verdicts"
    assert not set(rejected) & set(decided), "an order was both rejected and given a verdict"
    by_id = {r["order_id"]: r for r in outputs["rejections"]}
    for m in streamed.feed.messages:
        oid, expected = m.sim.sim_id, m.sim.expected_outcome
        if expected.startswith("REJECT:"):
            assert oid in by_id, f"{m.sim.label} order not rejected"
            assert by_id[oid]["reason_code"] == expected.split(":", 1)[1], (m.sim.label, by_id[oid]["reason"])
            assert by_id[oid]["reason"], "a rejection must say why"
        elif expected in ("RELEASE", "HOLD"):
            assert oid in decided, f"{m.sim.label} order has no verdict"
    for oid, code in streamed.extra_received.items():
        assert by_id[oid]["reason_code"] == code


def test_undecodable_messages_are_dead_lettered_whole_with_a_reason(streamed, outputs):
    sent = [bytes(m.signature) for m in streamed.feed.messages if m.malformed] + streamed.extra_raw
    from_verify = [d for d in outputs["dlq"] if d["stage"] == "verify"]
    assert sorted(d["payload"] for d in from_verify) == sorted(sent)
    for d in from_verify:
        assert d["source_topic"] == t.RECEIVED and d["reason"]
    wrong_type = next(d for d in from_verify if d["payload"] == streamed.extra_raw[0])
    assert "expected csos.orders.ReceivedOrder" in wrong_type["reason"]
    # ... and each one left an audit event naming it.
    rows = streamed.sql("SELECT detail FROM audit_events FINAL WHERE action = 'message.dead_lettered'")
    audited = {json.loads(r[0])["dead_letter_id"] for r in rows}
    assert {d["dead_letter_id"] for d in from_verify} <= audited


def test_size_spikes_are_held_and_the_same_registrants_normal_orders_released(streamed, outputs):
    verdicts = {v["order_id"]: v for v in outputs["verdicts"]}
    spikes = [m.sim for m in streamed.feed.messages if m.sim.label == "size_spike"]
    assert spikes
    for sim in spikes:
        v = verdicts[sim.sim_id]
        assert v["verdict"] == "HOLD"
        fired = [r for r in v["reasons"] if r["fired"] and r["dimension"] == "size"]
        # Held for its size, or already held with the rest of an open case of its family (issue 11: the case's
        # orders are not learned, so a registrant whose first orders opened a case has too little history for
        # the size statistics; no analyst decides in this run).
        joined = [r for r in v["reasons"] if r["fired"] and r["detector"] in DUE_DILIGENCE_RULES]
        assert fired or joined, ("a size spike must be held for its size or its open case", sim.sim_id,
                                 [(r["detector"], r["value"], r["threshold"]) for r in v["reasons"] if r["fired"]])
        for r in fired:
            assert r["value"] > r["threshold"] >= r["baseline"] > 0
            assert f"{r['value']:,.0f}" in r["explanation"]  # the numbers an analyst reads are the numbers
    by_size = [s for s in spikes if any(r["fired"] and r["dimension"] == "size" for r in verdicts[s.sim_id]["reasons"])]
    assert len(by_size) * 2 >= len(spikes), f"only {len(by_size)} of {len(spikes)} spikes held for their size"
    spiked = {sim.registrant.dea_number for sim in spikes}
    normal = [m.sim for m in streamed.feed.messages
              if m.sim.label == "normal" and m.sim.registrant.dea_number in spiked]
    assert normal
    # An open case holds the registrant's later orders of the family until due diligence decides, and a new
    # customer's months above the ceiling wait for onboarding (issue 11): those are policy holds. No statistical
    # detector holds a normal order of theirs.
    policy = set(WAITING_DETECTORS)
    held = [verdicts[s.sim_id] for s in normal if verdicts[s.sim_id]["verdict"] != "RELEASE"]
    for v in held:
        deciding = {r["detector"] for r in v["reasons"] if r["fired"] and r.get("enforced", True)}
        assert deciding and deciding <= policy, (v["order_id"], deciding)
    assert len(held) < len(normal)


def test_other_suspicious_episodes_are_held(streamed, outputs):
    verdicts = {v["order_id"]: v for v in outputs["verdicts"]}
    shifts = [m.sim for m in streamed.feed.messages if m.sim.label == "family_shift"]
    assert all(verdicts[s.sim_id]["verdict"] == "HOLD" for s in shifts)
    bursts = defaultdict(list)
    for m in streamed.feed.messages:
        if m.sim.label == "frequency_burst":
            bursts[m.sim.detail["burst"]].append(verdicts[m.sim.sim_id]["verdict"])
    assert bursts
    for burst, outcomes in bursts.items():
        assert "HOLD" in outcomes, f"burst {burst} never held: {outcomes}"


def test_normal_orders_are_overwhelmingly_released(streamed, outputs):
    verdicts = {v["order_id"]: v for v in outputs["verdicts"]}
    normal = [m.sim.sim_id for m in streamed.feed.messages if m.sim.label == "normal"]

    def judged_suspicious(v: dict) -> bool:
        """Held by a detector of its own, not only while due diligence is pending: an earlier hold's case still
        open (issue 11), or a new customer's period awaiting its onboarding review (every registrant of this
        120-day feed is new to the monitor; the demo counts them the same way, ``WAITING_DETECTORS``)."""
        deciding = {r["detector"] for r in v["reasons"] if r["fired"] and r.get("enforced", True)}
        return v["verdict"] == "HOLD" and bool(deciding - set(WAITING_DETECTORS))

    false_holds = sum(1 for oid in normal if judged_suspicious(verdicts[oid]))
    assert false_holds / len(normal) < 0.01, f"{false_holds} of {len(normal)} normal orders held"


def test_hold_and_release_topics_carry_each_verdict_once(streamed, outputs):
    verdicts = {v["order_id"]: v["verdict"] for v in outputs["verdicts"]}
    n_hold = sum(1 for v in verdicts.values() if v == "HOLD")
    holds = _decode_all(streamed.topic(t.HOLD, n_hold), "som.Hold")
    releases = _decode_all(streamed.topic(t.RELEASE, len(verdicts) - n_hold), "som.Release")
    assert sorted(h["order_id"] for h in holds) == sorted(o for o, v in verdicts.items() if v == "HOLD")
    automatic = [r for r in releases if r["released_by"] == "monitor"]
    assert sorted(r["order_id"] for r in automatic) == sorted(o for o, v in verdicts.items() if v == "RELEASE")
    assert all(h["reasons"] and h["summary"] and h["order"]["order_id"] == h["order_id"] for h in holds)
    # the held order carries what the registrant master says about the purchaser (peer group, region)
    master = {r.dea_number: r for r in streamed.feed.result.population.registrants}
    for h in holds:
        reg = master[h["purchaser_dea"]]
        assert (h["order"]["business_activity"], h["order"]["purchaser_state"]) == (reg.business_activity, reg.state)
    assert all(r["lines"] for r in releases)
    # Every other release is an analyst's, after due diligence, of an order the monitor held (tests/e2e/test_cases_e2e.py)
    reviewed = [r for r in releases if r["released_by"] != "monitor"]
    assert all(verdicts.get(r["order_id"], "HOLD") == "HOLD" for r in reviewed)


def test_clickhouse_rows_match_the_topics(streamed, outputs):
    ch_verdicts = dict(streamed.sql("SELECT order_id, verdict FROM verdicts FINAL"))
    assert ch_verdicts == {v["order_id"]: v["verdict"] for v in outputs["verdicts"]}
    ch_rejections = dict(streamed.sql("SELECT order_id, reason_code FROM rejections FINAL"))
    assert ch_rejections == {r["order_id"]: r["reason_code"] for r in outputs["rejections"]}
    lines = streamed.sql("SELECT count() FROM order_lines FINAL")[0][0]
    assert int(lines) == sum(len(v["lines"]) for v in outputs["verdicts"])
    fired = streamed.sql("SELECT count() FROM verdict_reasons FINAL WHERE fired")[0][0]
    assert int(fired) == sum(1 for v in outputs["verdicts"] for r in v["reasons"] if r["fired"])
    # No duplicates even before merges: every row was inserted once.
    assert int(streamed.sql("SELECT count() FROM verdicts")[0][0]) == len(ch_verdicts)


def test_every_order_has_an_audit_trail(streamed, outputs):
    rows = streamed.sql("SELECT order_id, groupUniqArray(action) FROM audit_events FINAL "
                        "WHERE order_id IS NOT NULL GROUP BY order_id")
    trail = {oid: set(actions) for oid, actions in rows}
    for r in outputs["rejections"]:
        assert {"order.received", "order.rejected"} <= trail[r["order_id"]]
    for v in outputs["verdicts"]:
        done = "order.held" if v["verdict"] == "HOLD" else "order.released"
        assert {"order.received", "order.verified", done} <= trail[v["order_id"]]


def test_sql_is_read_only(streamed):
    from connectors.clickhouse.query import QueryError, run_query

    with pytest.raises(QueryError, match="readonly"):
        run_query(streamed.settings, "INSERT INTO verdicts (order_id) VALUES ('forged')")
    assert streamed.sql("SELECT count() FROM verdicts WHERE order_id = 'forged'")[0][0] == 0


def test_baselines_survive_a_worker_restart(streamed, outputs):
    """The monitor's state comes back from its changelog: a new worker judges by the old baselines.

    The spike stays under the cold-start ceiling, so a worker that had lost the
    state would release it; only the recovered baseline holds it.
    """
    import uuid
    from dataclasses import replace
    from datetime import timedelta

    from connectors.sources.intake import OrderIntake
    from connectors.kafka.io import Publisher, consume_all
    from streams.domain.cms import sign_order
    from streams.domain.model import Order
    from streams.domain.order_document import encode_order

    released = {v["order_id"] for v in outputs["verdicts"] if v["verdict"] == "RELEASE"}
    history = defaultdict(list)
    for m in streamed.feed.messages:
        if m.sim.label == "normal" and m.sim.sim_id in released:
            history[m.sim.registrant.dea_number].append(m.sim.order)
    for dea, orders in sorted(history.items(), key=lambda kv: -len(kv[1])):
        last = orders[-1]
        per_family = max(ln.dosage_units for ln in last.lines)
        factor = min(10, 7999 // per_family)
        if factor >= 6:
            break
    else:
        pytest.skip("no registrant with a spike that fits under the cold-start ceiling")
    cred = streamed.feed.pki.registrants[dea]
    end = streamed.feed.result.end

    def signed(order_lines, at):
        order = Order(f"{at:%y}X{uuid.uuid4().hex[:6].upper()}", last.purchaser, last.supplier, at,
                      tuple(replace(ln, packages=ln.packages * order_lines) for ln in last.lines))
        doc = encode_order(order)
        return doc, sign_order(doc, cred.cert, cred.key, signing_time=at, intermediates=cred.chain)

    streamed.processes.worker.stop()
    streamed.processes.worker.start()

    intake = OrderIntake(Publisher(streamed.settings.kafka_bootstrap), "restart-test")
    spike_doc, spike_sig = signed(factor, end + timedelta(hours=2))
    spike_id = intake.submit(spike_sig, document=spike_doc, purchaser_dea=dea,
                             received_at=end + timedelta(hours=2, minutes=1))
    normal_doc, normal_sig = signed(1, end + timedelta(days=3))
    normal_id = intake.submit(normal_sig, document=normal_doc, purchaser_dea=dea,
                              received_at=end + timedelta(days=3, minutes=1))
    intake.flush()

    def decided(messages):
        ids = {codec.decode(m.value())[1]["order_id"] for m in messages}
        return {spike_id, normal_id} <= ids

    verdicts = {v["order_id"]: v for v in _decode_all(
        consume_all(streamed.settings.kafka_bootstrap, [t.VERDICTS], until=decided, timeout=120), "som.Verdict")}
    spike = verdicts[spike_id]
    assert spike["verdict"] == "HOLD", spike["reasons"]
    assert any(r["fired"] and r["detector"] == "size" for r in spike["reasons"])
    # The next ordinary order is not suspicious by the recovered baseline: it is held only because the
    # spike's case is open (issue 11: an open case holds the family's later orders until due diligence).
    normal = verdicts[normal_id]
    deciding = {r["detector"] for r in normal["reasons"] if r["fired"] and r.get("enforced", True)}
    assert normal["verdict"] == "HOLD" and deciding == {"open_case"}, normal["reasons"]
