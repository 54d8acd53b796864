"""The due-diligence case: state machine, clock, and the case agent's outputs (real Avro, in-memory transport).

The processor tests capture what the agents would publish instead of using a
broker (transport is not what they test); tests/e2e/test_cases_e2e.py runs the
same flow through Kafka, the worker and ClickHouse.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from connectors.kafka.testing import MemoryPublisher

from connectors.kafka import catalogue as t
from streams.pipeline.agents.cases import CaseProcessor
from streams.pipeline.agents.monitor import MonitorProcessor
from streams.pipeline.processor import InputMessage
from streams.core.avro_codec import default_codec
from streams.cases.machine import (
    CANCELLED, HELD, RELEASED, REPORTED, DecisionRefused, decide, escalate, is_repeat, open_case,
)
from streams.cases.sor import report_for
from connectors.kafka.emit import Emitter
from streams.monitoring import Monitor
from tests.unit.test_monitoring import order

codec = default_codec()
T0 = datetime(2026, 11, 2, 15, 0, tzinfo=timezone.utc)
DEA = "BP1234563"


def a_hold(at: datetime = T0, dea: str = DEA, units: int = 9000) -> dict[str, Any]:
    o = order(dea, at - timedelta(seconds=2), {"OXYCODONE": units, "HYDROCODONE": 100})
    return {
        "order_id": o["order_id"], "order_number": o["order_number"], "purchaser_dea": dea, "held_at": at,
        "reasons": [{"detector": "size", "dimension": "size", "drug_family": "OXYCODONE", "value": float(units),
                     "baseline": 400.0, "threshold": 2400.0, "window": "EW over ~20 released orders", "fired": True,
                     "enforced": True, "explanation": f"Ordered {units:,} OXYCODONE units; usual is about 400."}],
        "summary": f"Ordered {units:,} OXYCODONE units; usual is about 400.", "order": o,
        "decision_id": "", "decision_version": 1,
    }


def a_decision(hold: dict[str, Any], action: str, *, actor: str = "alice", role: str = "analyst",
               rationale: str = "Called the pharmacist; new oncology contract on file.", at: datetime | None = None,
               decision_id: str | None = None) -> dict[str, Any]:
    return {"decision_id": decision_id or str(uuid.uuid4()), "order_id": hold["order_id"], "action": action,
            "actor": actor, "actor_role": role, "rationale": rationale, "evidence_notes": "contract #4411",
            "decided_at": at or T0 + timedelta(days=1)}


# --------------------------------------------------------------------------- the state machine
@pytest.mark.parametrize("action, status", [("RELEASE", RELEASED), ("REPORT", REPORTED), ("CANCEL", CANCELLED)])
def test_each_action_closes_a_held_case(action: str, status: str) -> None:
    hold = a_hold()
    case = open_case(hold)
    assert (case.status, case.version, case.due_at) == (HELD, 1, T0 + timedelta(days=7))
    d = a_decision(hold, action)
    closed = decide(case, d)
    assert (closed.status, closed.version, closed.decided_by, closed.decision_id) == (status, 2, "alice",
                                                                                       d["decision_id"])
    assert closed.rationale.startswith("Called the pharmacist") and closed.evidence_notes == "contract #4411"
    assert case.status == HELD  # the input case is not modified


@pytest.mark.parametrize("first", ["RELEASE", "REPORT", "CANCEL"])
@pytest.mark.parametrize("second", ["RELEASE", "REPORT", "CANCEL"])
def test_a_closed_case_refuses_every_further_decision(first: str, second: str) -> None:
    hold = a_hold()
    closed = decide(open_case(hold), a_decision(hold, first, actor="alice"))
    with pytest.raises(DecisionRefused) as exc:
        decide(closed, a_decision(hold, second, actor="bob"))
    assert exc.value.code == "CASE_CLOSED"
    assert f"already {closed.status} by alice" in exc.value.message and hold["order_number"] in exc.value.message


def test_refusals_name_the_problem() -> None:
    hold = a_hold()
    case = open_case(hold)
    cases = {
        "UNKNOWN_CASE": (None, a_decision(hold, "RELEASE")),
        "NOT_AUTHORIZED": (case, a_decision(hold, "RELEASE", actor="vic", role="viewer")),
        "RATIONALE_REQUIRED": (case, a_decision(hold, "REPORT", rationale="   ")),
        "ACTOR_REQUIRED": (case, a_decision(hold, "CANCEL", actor=" ")),
        "UNKNOWN_ACTION": (case, a_decision(hold, "SHIP")),
    }
    for code, (c, d) in cases.items():
        with pytest.raises(DecisionRefused) as exc:
            decide(c, d)
        assert exc.value.code == code, (code, exc.value.message)
    with pytest.raises(DecisionRefused, match="only an analyst may release"):
        decide(case, a_decision(hold, "RELEASE", actor="vic", role="viewer"))


def test_a_redelivered_decision_is_recognised_not_refused() -> None:
    hold = a_hold()
    d = a_decision(hold, "RELEASE")
    closed = decide(open_case(hold), d)
    assert is_repeat(closed, d)
    assert not is_repeat(closed, a_decision(hold, "RELEASE"))
    assert not is_repeat(open_case(hold), d)


def test_clock_escalates_once_when_it_lapses_and_never_a_closed_case() -> None:
    hold = a_hold()
    case = open_case(hold, due_days=7)
    assert escalate(case, T0 + timedelta(days=6, hours=23)) is None
    lapsed = escalate(case, T0 + timedelta(days=7, minutes=1))
    assert lapsed is not None and lapsed.status == HELD and lapsed.version == 2
    assert lapsed.escalated_at == T0 + timedelta(days=7, minutes=1)
    assert escalate(lapsed, T0 + timedelta(days=9)) is None  # once
    assert escalate(decide(case, a_decision(hold, "CANCEL")), T0 + timedelta(days=30)) is None
    # an escalated case can still be decided, and the decision keeps the escalation
    assert decide(lapsed, a_decision(hold, "REPORT")).escalated_at == lapsed.escalated_at
    # configurable period
    assert open_case(hold, due_days=2.5).due_at == T0 + timedelta(days=2, hours=12)
    with pytest.raises(ValueError):
        open_case(hold, due_days=0)


def test_case_state_roundtrips_through_its_avro_schema() -> None:
    hold = a_hold()
    closed = decide(open_case(hold), a_decision(hold, "REPORT"))
    raw = codec.encode("som.state.Case", closed.to_state())
    back = type(closed).from_state(codec.decode(raw, expect="som.state.Case")[1])
    assert back == closed


def test_case_state_record_is_the_cases_fields_with_outcome_and_hold_as_they_are() -> None:
    """The record the case table writes: every field, the recorded outputs' bytes unchanged (no copy, no loss)."""
    import dataclasses

    hold = a_hold()
    case = dataclasses.replace(open_case(hold), outcome={"decision": "HELD", "outputs": [b"\xc3\x01raw"]})
    state = case.to_state()
    assert state == dataclasses.asdict(case) | {"hold": dict(hold)}
    assert state["outcome"]["outputs"] == [b"\xc3\x01raw"]
    assert type(case).from_state(state) == case


# --------------------------------------------------------------------------- the suspicious order report
def test_report_has_deas_fields_for_every_line() -> None:
    hold = a_hold(units=12000)
    case = decide(open_case(hold), a_decision(hold, "REPORT", actor="carol",
                                              rationale="Pharmacist could not explain the volume."))
    rep = report_for(case)
    o = hold["order"]
    assert rep["ordering_registrant_dea"] == DEA and rep["reporting_registrant_dea"] == o["supplier_dea"]
    assert report_for(case, "RD9999997")["reporting_registrant_dea"] == "RD9999997"
    assert rep["order_form_number"] == o["order_number"] and rep["order_id"] == o["order_id"]
    assert rep["date_received"] == o["received_at"] and rep["reported_by"] == "carol"
    assert [(ln["ndc"], ln["quantity"], ln["strength"], ln["dosage_units"]) for ln in rep["lines"]] == [
        (ln["ndc"], ln["packages"], ln["strength"], ln["dosage_units"]) for ln in o["lines"]]
    assert len({ln["transaction_id"] for ln in rep["lines"]}) == len(o["lines"])
    assert all(ln["unit"] == f"package of {ln['package_quantity']} dosage units" for ln in rep["lines"])
    assert "Ordered 12,000 OXYCODONE units" in rep["circumstances"]
    assert "Pharmacist could not explain the volume." in rep["circumstances"] and "contract #4411" in rep[
        "circumstances"]
    assert report_for(case)["report_id"] == rep["report_id"]  # stable: a resent report is the same report
    codec.encode("som.SuspiciousOrderReport", rep)  # and it is a valid record
    with pytest.raises(ValueError, match="not REPORTED"):
        report_for(open_case(hold))


# --------------------------------------------------------------------------- the case agent
@pytest.fixture
def agent() -> tuple[CaseProcessor, MemoryPublisher, dict]:
    pub = MemoryPublisher()
    table: dict[bytes, bytes] = {}
    return CaseProcessor(table, Emitter(pub, "case-agent"), due_days=7), pub, table  # type: ignore[arg-type]


def feed(proc: CaseProcessor, topic: str, schema: str, rec: dict[str, Any], offset: int = 0) -> None:
    proc.handle(InputMessage(topic, 0, offset, rec["order_id"].encode(), codec.encode(schema, rec)))
    proc.end_batch()


def test_release_after_review_goes_to_warehouse_and_learner_once(agent) -> None:
    proc, pub, table = agent
    hold = a_hold()
    feed(proc, t.HOLD, "som.Hold", hold)
    feed(proc, t.HOLD, "som.Hold", hold, offset=1)  # duplicated upstream (a new offset): one case
    opened = pub.take(t.CASES)
    assert [(e["kind"], e["status"], e["version"]) for _, e in opened] == [("OPENED", "HELD", 1)]
    assert opened[0][1]["drug_families"] == ["HYDROCODONE", "OXYCODONE"] and opened[0][1]["total_dosage_units"] == 9100
    d = a_decision(hold, "RELEASE")
    feed(proc, t.DECISIONS, "som.Decision", d)
    releases = pub.take(t.RELEASE)
    assert [(k, r["released_by"], len(r["lines"])) for k, r in releases] == [(hold["order_id"], "alice", 2)]
    cleared = pub.take(t.CLEARED)
    assert [(k, c["order"]["order_id"], c["decision_id"]) for k, c in cleared] == [(DEA, hold["order_id"],
                                                                                   d["decision_id"])]
    events = pub.take(t.CASES)
    assert [(e["kind"], e["actor"], e["rationale"]) for _, e in events] == [("RELEASED", "alice", d["rationale"])]
    audits = [a for _, a in pub.take(t.AUDIT)]
    assert [(a["action"], a["actor"]) for a in audits] == [("case.opened", "case-agent"),
                                                           ("order.redelivery_ignored", "case-agent"),
                                                           ("case.released", "alice")]
    # the same decision sent again resends the same outputs and refuses nothing
    feed(proc, t.DECISIONS, "som.Decision", d, offset=1)
    assert [r["order_id"] for _, r in pub.take(t.RELEASE)] == [hold["order_id"]]
    assert pub.take(t.CASES) == [] and proc.counts["refused"] == 0
    # state is in the table, as Avro
    assert codec.decode(table[hold["order_id"].encode()], expect="som.state.Case")[1]["status"] == RELEASED


def test_refused_decision_changes_nothing_and_is_visible(agent) -> None:
    proc, pub, _ = agent
    hold = a_hold()
    feed(proc, t.HOLD, "som.Hold", hold)
    feed(proc, t.DECISIONS, "som.Decision", a_decision(hold, "CANCEL", actor="bob"))
    pub.take(t.CASES), pub.take(t.AUDIT)
    [(_, cancelled)] = pub.take(t.CLEARED)  # the monitor hears the case closed (its open case ends)
    assert (cancelled["outcome"], cancelled["order_id"]) == ("CANCELLED", hold["order_id"])
    feed(proc, t.DECISIONS, "som.Decision", a_decision(hold, "RELEASE", actor="mallory"))
    assert pub.take(t.RELEASE) == [] and pub.take(t.CLEARED) == []
    [(_, ev)] = pub.take(t.CASES)
    assert (ev["kind"], ev["status"], ev["version"], ev["actor"]) == ("REFUSED", CANCELLED, 2, "mallory")
    assert "already CANCELLED by bob" in ev["error"]
    [(_, audit)] = pub.take(t.AUDIT)
    assert (audit["action"], audit["outcome"], audit["actor"]) == ("case.decision_refused", "REFUSED", "mallory")
    # a decision about an order that was never held: audited, nothing else
    stray = a_decision(a_hold(), "RELEASE")
    feed(proc, t.DECISIONS, "som.Decision", stray)
    assert pub.take(t.CASES) == [] and pub.take(t.RELEASE) == []
    assert '"code": "UNKNOWN_CASE"' in pub.take(t.AUDIT)[0][1]["detail"]


def test_report_decision_emits_the_report(agent) -> None:
    proc, pub, _ = agent
    hold = a_hold()
    feed(proc, t.HOLD, "som.Hold", hold)
    feed(proc, t.DECISIONS, "som.Decision", a_decision(hold, "REPORT", actor="carol"))
    [(key, rep)] = pub.take(t.REPORTS)
    assert key == hold["order_id"] and rep["reported_by"] == "carol" and len(rep["lines"]) == 2
    assert pub.take(t.RELEASE) == []
    [(key, reported)] = pub.take(t.CLEARED)  # for the monitor: the family waits for a new limit; nothing learned
    assert (key, reported["outcome"], reported["cleared_by"]) == (hold["purchaser_dea"], "REPORTED", "carol")


def test_clock_escalates_lapsed_cases_once(agent) -> None:
    proc, pub, _ = agent
    early, late, decided = a_hold(T0), a_hold(T0 + timedelta(days=3)), a_hold(T0)
    for h in (early, late, decided):
        feed(proc, t.HOLD, "som.Hold", h)
    feed(proc, t.DECISIONS, "som.Decision", a_decision(decided, "RELEASE", at=T0 + timedelta(days=1)))
    pub.take(t.CASES), pub.take(t.AUDIT)
    assert proc.tick(T0 + timedelta(days=6)) == 0
    assert proc.tick(T0 + timedelta(days=8)) == 1
    [(key, ev)] = pub.take(t.CASES)
    assert (key, ev["kind"], ev["status"]) == (early["order_id"], "ESCALATED", HELD)
    [(_, audit)] = pub.take(t.AUDIT)
    assert audit["action"] == "case.escalated" and '"days_overdue": 1.0' in audit["detail"]
    assert proc.tick(T0 + timedelta(days=9)) == 0  # once
    assert proc.tick(T0 + timedelta(days=11)) == 1  # the later hold's clock
    # an escalated case is still decided by an analyst
    feed(proc, t.DECISIONS, "som.Decision", a_decision(early, "REPORT", at=T0 + timedelta(days=12)))
    [(_, ev)] = pub.take(t.CASES)[-1:]
    assert ev["kind"] == "REPORTED" and ev["escalated_at"] == T0 + timedelta(days=8)


def test_clock_leaves_cases_this_worker_does_not_own(agent) -> None:
    _, _, table = agent
    pub = MemoryPublisher()
    proc = CaseProcessor(table, Emitter(pub, "case-agent"), owns=lambda oid: False)  # type: ignore[arg-type]
    feed(proc, t.HOLD, "som.Hold", a_hold())
    assert proc.tick(T0 + timedelta(days=30)) == 0


def test_hostile_input_is_dead_lettered_and_the_agent_carries_on(agent) -> None:
    proc, pub, _ = agent
    proc.handle(InputMessage(t.DECISIONS, 0, 5, b"k", b"\x00 not avro"))
    wrong = codec.encode("som.Release", {"order_id": "x", "order_number": "x", "purchaser_dea": DEA,
                                         "released_at": T0, "released_by": "x", "lines": []})
    proc.handle(InputMessage(t.DECISIONS, 0, 6, b"k", wrong))
    dead = pub.take(t.DLQ)
    assert [d["source_offset"] for _, d in dead] == [5, 6]
    assert "expected one of som.Hold, som.Decision, got som.Release" in dead[1][1]["reason"]
    hold = a_hold()
    feed(proc, t.HOLD, "som.Hold", hold)
    assert proc.counts["opened"] == 1 and proc.counts["dead_lettered"] == 2


# --------------------------------------------------------------------------- the learner
def test_cleared_order_is_learned_once_and_held_ones_never() -> None:
    pub = MemoryPublisher()
    monitor = Monitor()
    table: dict[bytes, bytes] = {}
    mon = MonitorProcessor(monitor, table, Emitter(pub, "monitor-agent"))  # type: ignore[arg-type]
    cases = CaseProcessor({}, Emitter(pub, "case-agent"))  # type: ignore[arg-type]
    for i in range(40):  # a steady history of ~400 units every 3 days
        o = order(DEA, T0 - timedelta(days=120 - 3 * i), {"OXYCODONE": 380 + (i % 5) * 10})
        mon.handle(InputMessage(t.VERIFIED, 0, i, DEA.encode(), codec.encode("csos.orders.VerifiedOrder", o)))
    mon.end_batch()
    spike = order(DEA, T0, {"OXYCODONE": 4000})
    mon.handle(InputMessage(t.VERIFIED, 0, 99, DEA.encode(), codec.encode("csos.orders.VerifiedOrder", spike)))
    mon.end_batch()
    [(_, hold)] = pub.take(t.HOLD)
    assert hold["order"]["order_id"] == spike["order_id"]

    def learned() -> int:
        return codec.decode(table[DEA.encode()], expect="som.state.RegistrantState")[1]["total_orders"]

    assert learned() == 40  # held: not learned
    cases.handle(InputMessage(t.HOLD, 0, 0, hold["order_id"].encode(), codec.encode("som.Hold", hold)))
    cases.handle(InputMessage(t.DECISIONS, 0, 1, hold["order_id"].encode(),
                              codec.encode("som.Decision", a_decision(hold, "RELEASE"))))
    [(key, cleared)] = pub.take(t.CLEARED)
    raw = codec.encode("som.ClearedOrder", cleared)
    for offset in (0, 1):  # duplicated: learned once
        mon.handle(InputMessage(t.CLEARED, 0, offset, key.encode(), raw))
        mon.end_batch()
    assert learned() == 41
    actions = [a["action"] for _, a in pub.take(t.AUDIT)]
    assert actions.count("order.learned_after_review") == 1 and actions.count("order.redelivery_ignored") == 1


def test_sink_rows_for_reports_and_case_events_line_up_with_their_columns(agent) -> None:
    from connectors.clickhouse.rows import TABLE_COLUMNS, rows_for

    proc, pub, _ = agent
    hold = a_hold()
    feed(proc, t.HOLD, "som.Hold", hold)
    feed(proc, t.DECISIONS, "som.Decision", a_decision(hold, "REPORT", actor="carol"))
    [(_, rep)] = pub.take(t.REPORTS)
    rows = rows_for("som.SuspiciousOrderReport", rep)["suspicious_order_reports"]
    cols = TABLE_COLUMNS["suspicious_order_reports"]
    as_dicts = [dict(zip(cols, r)) for r in rows]
    assert [(d["transaction_id"], d["ndc"], d["quantity"], d["reported_by"], d["order_form_number"])
            for d in as_dicts] == [(ln["transaction_id"], ln["ndc"], ln["quantity"], "carol", hold["order_number"])
                                   for ln in rep["lines"]]
    events = [e for _, e in pub.take(t.CASES)]
    opened, reported = (rows_for("som.CaseEvent", e) for e in events)
    case_cols = TABLE_COLUMNS["cases"]
    assert dict(zip(case_cols, opened["cases"][0]))["decided_by"] == ""
    closed = dict(zip(case_cols, reported["cases"][0]))
    assert (closed["status"], closed["version"], closed["decided_by"]) == (REPORTED, 2, "carol")
    assert all(len(r) == len(TABLE_COLUMNS[table]) for x in (opened, reported) for table, rs in x.items() for r in rs)


def test_closed_cases_leave_the_table_after_the_retention_period(agent) -> None:
    proc, pub, table = agent
    open_hold, closed_hold = a_hold(), a_hold()
    for h in (open_hold, closed_hold):
        feed(proc, t.HOLD, "som.Hold", h)
    d = a_decision(closed_hold, "CANCEL", at=T0 + timedelta(days=1))
    feed(proc, t.DECISIONS, "som.Decision", d)
    proc.tick(T0 + timedelta(days=90))
    assert closed_hold["order_id"].encode() in table  # not yet: 89 days after the decision
    proc.tick(T0 + timedelta(days=91, hours=1))
    assert closed_hold["order_id"].encode() not in table and open_hold["order_id"].encode() in table
    pub.take(t.AUDIT)
    feed(proc, t.DECISIONS, "som.Decision", a_decision(closed_hold, "RELEASE"))
    assert pub.take(t.RELEASE) == []
    assert '"code": "UNKNOWN_CASE"' in pub.take(t.AUDIT)[0][1]["detail"]
