"""Outcome records: what an agent decided for an order id, consulted before judging it again.

Kafka delivers at least once: after a crash an agent reads again the inputs
whose offsets were not committed, and an upstream agent that crashed may
have produced the same order twice (at a new offset). Judging such an order
again could give another answer (a verified order rejected as a replay of
itself, an order learned twice and then held). So each agent keeps, in the
same per-key state it already writes (and so written in the same changelog
record as the effect of the decision), one ``csos.state.OrderOutcome`` per
order id it decided:

* the decision and its time, kept ``CSOS_DEDUP_DAYS`` (14 by default): a
  duplicate within that window is recognised by its order id and not judged
  (nor learned) again;
* the input it answered (topic, partition, offset) and the exact messages it
  produced, kept only while that input may be delivered again, i.e. until
  the group's committed offset passes it. Redelivered, the same input
  re-publishes those bytes unchanged: downstream sees a duplicate of the same
  decision, never a different one. Any other duplicate (another offset, or
  outputs already pruned, hence already delivered) publishes nothing but an
  audit event ``order.redelivery_ignored``.

Why not Kafka transactions (exactly-once read-process-write): the agents'
outputs go through a confluent-kafka producer while Faust's changelogs and
offset commits go through aiokafka, so no single transaction spans them;
and transactions alone would not catch an upstream duplicate at a new
offset. The record per order id covers both, at the cost of republishing
(never contradicting) duplicates after a crash.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Mapping, MutableMapping

from connectors.kafka.emit import Emitter, Message
from streams.core import clock

DEFAULT_DEDUP_DAYS = 14.0
#: One input: (topic, partition, offset).
Position = tuple[str, int, int]
#: Records without outputs in a row after which the output scan stops (older ones were pruned before).
SCAN_PAST_PRUNED = 32
_DECISIONS = uuid.uuid5(uuid.NAMESPACE_DNS, "decisions.csos-som")


def decision_id(order_id: str, version: int) -> str:
    """The id of an order's decision of a given version: the same for every repeat of that decision."""
    return str(uuid.uuid5(_DECISIONS, f"{order_id}#{version}"))


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


@dataclass
class OutcomeBook:
    """Reads, writes and prunes the outcome records of one agent (held in its per-key state dicts).

    ``committed`` maps (topic, partition) to the group's committed offset
    (the next offset to read); the worker refreshes it every few seconds.
    Without it (tools, tests) recorded outputs are kept until the window ends.
    """

    window: timedelta = timedelta(days=DEFAULT_DEDUP_DAYS)
    committed: dict[tuple[str, int], int] = field(default_factory=dict)

    def set_committed(self, offsets: Mapping[tuple[str, int], int]) -> None:
        self.committed = dict(offsets)

    def make(self, decision: str, position: Position | None, outputs: list[Message], *,
             now: datetime | None = None, **extra: Any) -> dict[str, Any]:
        """A new record. Outputs are kept only with a position (an input that may come again)."""
        topic, partition, offset = position or ("", -1, -1)
        return {"decision": decision, "at": _ms(now or clock.utcnow()), "digest": b"", "learned": False, "topic": topic,
                "partition": partition, "offset": offset,
                "outputs": [{"topic": tp, "key": k, "value": v} for tp, k, v in outputs] if position else [],
                **extra}

    def record(self, records: MutableMapping[str, dict[str, Any]], order_id: str, decision: str,
               position: Position | None, outputs: list[Message], **extra: Any) -> dict[str, Any]:
        """Record a decision for ``order_id`` in one key's records, pruning the others first."""
        self.prune(records)
        rec = records[order_id] = self.make(decision, position, outputs, **extra)
        return rec

    def current(self, records: Mapping[str, dict[str, Any]], order_id: str) -> dict[str, Any] | None:
        """The record of ``order_id`` if it is still within the window."""
        rec = records.get(order_id)
        if rec is None or rec["at"] <= _ms(clock.utcnow() - self.window):
            return None
        return rec

    def prune(self, records: MutableMapping[str, dict[str, Any]]) -> bool:
        """Drop records older than the window and the outputs of committed inputs; True if anything changed.

        Records are kept in the order they were made, so both scans stop
        early (the expiry scan at the first live record, the output scan
        after ``SCAN_PAST_PRUNED`` records in a row that keep no outputs):
        the cost per order does not grow with a busy key's 14 days of orders.
        """
        oldest = _ms(clock.utcnow() - self.window)
        expired = []
        for oid, rec in records.items():
            if rec["at"] > oldest:
                break
            expired.append(oid)
        for oid in expired:
            del records[oid]
        changed = bool(expired)
        quiet = 0
        for rec in reversed(records.values()):  # type: ignore[call-overload]
            if not rec["topic"]:
                quiet += 1
                if quiet >= SCAN_PAST_PRUNED:
                    break
                continue
            quiet = 0
            if self.delivered(rec):
                records_outputs_pruned(rec)
                changed = True
        return changed

    def delivered(self, rec: Mapping[str, Any]) -> bool:
        """Whether the record's input offset is committed (so its outputs were published and it won't come again)."""
        committed = self.committed.get((rec["topic"], rec["partition"]))
        return committed is not None and rec["offset"] < committed

    def repeat(self, emitter: Emitter, stage: str, rec: Mapping[str, Any], order_id: str, position: Position, *,
               purchaser_dea: str | None = None) -> bool:
        """Answer a duplicate of a decided input; True if its recorded outputs were re-published.

        The same input (same position) with its outputs still recorded: the
        state was saved but the outputs may not have been, so they are
        re-published byte for byte. Anything else was already answered: an
        audit event says it was seen and ignored.
        """
        if (rec["topic"], rec["partition"], rec["offset"]) == tuple(position) and rec["outputs"]:
            emitter.republish((o["topic"], o["key"], o["value"]) for o in rec["outputs"])
            return True
        topic, partition, offset = position
        emitter.audit(stage, "order.redelivery_ignored", rec["decision"], order_id=order_id,
                      purchaser_dea=purchaser_dea,
                      detail={"decision": rec["decision"], "decided_at_ms": rec["at"], "topic": topic,
                              "partition": partition, "offset": offset,
                              "reason": "this order id was already decided; its outcome stands and is not "
                                        "judged again"})
        return False


def records_outputs_pruned(rec: dict[str, Any]) -> None:
    """Forget a record's input and outputs (they are delivered), keeping its decision."""
    rec.update(topic="", partition=-1, offset=-1, outputs=[])
