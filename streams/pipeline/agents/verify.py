"""Verification agent: received order -> verified order, rejection, or parked until data arrives.

The cryptographic and document checks live in ``streams.verification``;
this module adds what needs state or reference data, and decides what goes
where:

* a message that is not a ReceivedOrder is dead-lettered;
* an order the verifier cannot judge (an unexpected error inside it) is
  rejected with VERIFICATION_ERROR: an invalid finding can't be bypassed and
  a failure to decide counts as invalid (fail closed);
* an order that cannot be verified *yet* because reference data is missing
  (no current CRL, unknown registrant, unknown product) is parked in the
  purchaser's state and re-verified when the data arrives: never released,
  never lost;
* a valid order whose purchaser's registration is not active is rejected;
* a purchaser's order number is accepted once; a replay is rejected. The
  accepted numbers live in a Faust table (compacted changelog), so this holds
  across restarts and rebalances;
* a valid order that arrived keyed by another DEA number than the one it was
  signed for is re-keyed onto the received topic first, so that the replay
  state of a purchaser is only ever read and written by the partition's owner;
* an order addressed to a supplier DEA number that is not this distributor's
  (``CSOS_SUPPLIER_DEA``) is rejected WRONG_SUPPLIER;
* the receipt time is the sender's ``received_at`` only when it lies within
  ``CSOS_RECEIPT_SKEW_SECONDS`` of the broker's append time of the message;
  otherwise the order is judged as received at the append time (a sender
  cannot backdate an expired order into its 60 days);
* an order id names one order: the same id with the same bytes (a
  redelivery) repeats the acceptance, with other bytes it is dead-lettered
  DUPLICATE_ORDER_ID instead of overwriting the first order's rows;
* every order id decided is recorded with its outcome (``streams.pipeline.outcomes``)
  under the key it arrived with: a redelivery of the same bytes is not judged
  again (no DUPLICATE_ORDER_NUMBER against itself): its recorded outputs are
  re-published, or, once delivered, it is only audited.

State changes are per order and never rolled back: an order number is
recorded as accepted before the verified record is written, so a failure on
one order (or on its outputs) can neither release it twice nor undo what an
earlier order of the same batch recorded.
"""
from __future__ import annotations

import hashlib
import logging
import time
from datetime import datetime, timedelta
from typing import Any, Iterable, MutableMapping

from streams.domain.crl import load_crl
from streams.domain.model import Order

from connectors.kafka import catalogue as t
from streams.core.avro_codec import AvroCodec, default_codec
from connectors.kafka.emit import Emitter, Message
from streams.core import clock
from streams.pipeline.outcomes import OutcomeBook, Position
from streams.pipeline.processor import InputMessage, ProcessorBase, decode
from streams.domain.products import ProductMaster
from connectors.sources.reference_data import (REGISTRANT_UNKNOWN, CrlHistory, CrlRank, ReferenceFeed, RegistrantDirectory, Trace,
                              crl_rank)
from streams.pipeline.table_state import CachedTable
from streams.verification import RETRYABLE, REVOCATION_UNKNOWN, Outcome, Verifier, enrich_lines

log = logging.getLogger(__name__)
STAGE = "verify"
STATE_SCHEMA = "csos.state.PurchaserVerifyState"
DUPLICATE_ORDER_NUMBER = "DUPLICATE_ORDER_NUMBER"
DUPLICATE_ORDER_ID = "DUPLICATE_ORDER_ID"
VERIFICATION_ERROR = "VERIFICATION_ERROR"
WRONG_SUPPLIER = "WRONG_SUPPLIER"
RECEIVED_SCHEMA = "csos.orders.ReceivedOrder"
VERIFY_STATE_SOURCE = "csos-verify-state"  # a dead letter's source_topic for a parked order (not a topic)
RECEIVED_FIELDS = ("order_id", "received_at", "source", "format", "document", "signature")
#: How far the sender's received_at may lie from the broker's append time before it is overruled.
DEFAULT_RECEIPT_SKEW = timedelta(seconds=300)
#: How long an accepted order number is remembered. Orders are void 60 days
#: after signing, so a replay of the same signed order is refused as expired
#: afterwards anyway; the margin covers clock skew and late receipt.
REMEMBER = timedelta(days=400)
REFERENCE_BEHIND = ("The supplier's copy of the certificate revocation lists and registrations had not yet caught up "
                    "with what was published before the order arrived.")
PARK_ADVICE = ("The order is not filled yet: it is held and will be verified as soon as the supplier has the "
               "missing data; no action is needed unless it stays pending.")


def _verified_order(outcome: Outcome) -> Order:
    """The order of an ``ok`` outcome, which the verifier always sets (typed: compiled code needs it not None)."""
    if outcome.order is None:
        raise ValueError("a verified outcome without its order")
    return outcome.order


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


class EarliestExpiry:
    """A lower bound of the earliest ``expires_at`` among a purchaser state's accepted numbers and order ids.

    Kept beside the state, never in it, one entry per purchaser: an entry is tied to the very
    ``accepted`` and ``order_ids`` maps it was computed from (held, and compared by identity), so a
    state parsed again from the table, or maps replaced by anyone, are scanned afresh. A bound only
    ever moves down when a number is recorded (never above the true earliest), so
    ``earliest(...) > now`` proves that nothing has expired. At most ``max_entries`` purchasers are
    followed (emptied when full: their maps are then scanned again).
    """

    def __init__(self, max_entries: int = 50_000) -> None:
        self.max_entries = max_entries
        self._bounds: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {}

    def earliest(self, dea: str, state: dict[str, Any]) -> int:
        """The bound for ``state`` (scanning its maps when they are not the ones followed)."""
        accepted, order_ids = state["accepted"], state["order_ids"]
        known = self._bounds.get(dea)
        if known is not None and known[0] is accepted and known[1] is order_ids:
            return known[2]
        bound = min(min(accepted.values(), default=_NEVER),
                    min((k["expires_at"] for k in order_ids.values()), default=_NEVER))
        if len(self._bounds) >= self.max_entries:
            self._bounds.clear()
        self._bounds[dea] = (accepted, order_ids, bound)
        return bound

    def lower(self, dea: str, state: dict[str, Any], expires: int) -> None:
        """A number expiring at ``expires`` was just recorded in ``state``."""
        known = self._bounds.get(dea)
        if known is not None and known[0] is state["accepted"] and known[1] is state["order_ids"] \
                and expires < known[2]:
            self._bounds[dea] = (known[0], known[1], expires)

    def forget(self, dea: str) -> None:
        """Stop following the purchaser's maps (they were replaced)."""
        self._bounds.pop(dea, None)


_NEVER = 1 << 62  # later than any expiry, in ms


def _check_records(outcome: Outcome, *more: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The verifier's checks as a rejection lists them, then ``more`` (None: not made).

    Built only for a rejection: an accepted order never shows them, and building a dozen records per
    order for nothing was a measurable share of the verify stage."""
    records = [{"check": c.check, "passed": c.passed, "detail": c.detail} for c in outcome.checks]
    records += [m for m in more if m is not None]
    return records


def order_digest(rec: dict[str, Any]) -> str:
    """SHA-256 (hex) of what the purchaser sent: document (length-framed, absent != empty) and signature."""
    doc = rec["document"]
    h = hashlib.sha256(b"-" if doc is None else len(doc).to_bytes(8, "big") + bytes(doc))
    h.update(bytes(rec["signature"]))
    return h.hexdigest()


class VerifyProcessor(ProcessorBase):
    """Decides each received order (see the module docstring); the processor interface is ``streams.pipeline.processor``."""

    stage = STAGE

    def __init__(self, verifier: Verifier, products: ProductMaster, emitter: Emitter,
                 table: MutableMapping[bytes, bytes], directory: RegistrantDirectory | None = None,
                 feed: ReferenceFeed | None = None, codec: AvroCodec | None = None, *,
                 suppliers: Iterable[str] | None = None, receipt_skew: timedelta = DEFAULT_RECEIPT_SKEW,
                 outcomes: OutcomeBook | None = None, barrier_seconds: float = 30.0) -> None:
        """``suppliers``: the DEA numbers an order may be addressed to (None: not checked, for tools and
        tests; the worker always passes CSOS_SUPPLIER_DEA). ``receipt_skew``: see the module docstring.
        ``outcomes``: how long decided order ids are remembered (``CSOS_DEDUP_DAYS``).
        ``barrier_seconds``: the freshness barrier's wait per batch (``CSOS_REFERENCE_BARRIER_SECONDS``)."""
        self.outcomes = outcomes or OutcomeBook()
        self._decision = ""  # what the order being handled came to (VERIFIED, REJECTED:<code>, ...)
        self.verifier = verifier
        self.suppliers = frozenset(suppliers) if suppliers is not None else None
        self.receipt_skew = receipt_skew
        self.products = products
        self.emitter = emitter
        self.directory = directory  # None: registration status is not checked
        self.feed = feed
        self.crls = CrlHistory()  # the CRL in force per issuer and scope: never rolled back
        self.barrier_seconds = barrier_seconds
        self._fresh = True  # the batch being judged sees all reference data published before it arrived
        # Parked orders are re-verified only once the reader has made its first full read of both topics (a
        # restart never re-verifies on a partial view) and reached what they were parked behind.
        self._parked_behind: dict[tuple[str, int], int] = {}
        self._parked_blind = False  # parked behind unknown end offsets: wait for a barrier that succeeds
        self._recheck_owed = False
        self.codec = codec or default_codec()
        self._expiries = EarliestExpiry()
        self.counts = {"verified": 0, "rejected": 0, "dead_lettered": 0, "parked": 0, "rerouted": 0,
                       "receipt_corrected": 0, "redelivered": 0, "reference_behind": 0}
        self.state: CachedTable[dict[str, Any]] = CachedTable(
            table,
            load=lambda raw, dea: (self.codec.decode(raw, expect=STATE_SCHEMA)[1] if raw is not None
                                   else {"purchaser_dea": dea, "accepted": {}, "pending": {}, "order_ids": {}, "outcomes": {}}),
            dump=lambda state: self.codec.encode(STATE_SCHEMA, state),
        )

    # ------------------------------------------------------------------ reference data
    def apply_reference_updates(self) -> int:
        """Apply queued CRLs and registrant changes; returns how many took effect."""
        if self.feed is None:
            return 0
        applied = 0
        for topic, key, record, trace in self.feed.drain():
            if topic == t.CRL:
                if record is None:
                    continue  # a CRL is never withdrawn by a tombstone; a newer one replaces it
                applied += self._apply_crl(record, trace)
            elif self.directory is not None:
                self.directory.apply(key, record)
                applied += 1
        return applied

    def reference_barrier(self) -> bool:
        """Block until the reference reader has applied everything published before the batch just taken.

        Called (off the event loop) after a batch of orders was taken and
        before it is judged: the topics' end offsets asked now cover every CRL
        and registration published before the orders were appended, so a
        revocation published before receipt always applies. One ListOffsets
        round trip per batch; no wait when the reader is already there. If it
        cannot get there within ``barrier_seconds`` the batch is judged
        behind: its orders are parked (REVOCATION_UNKNOWN), never verified on
        a view known to be stale, and re-verified once the reader has caught up.
        """
        if self.feed is None:
            return True
        started = time.monotonic()
        try:
            ends = self.feed.end_offsets(self.barrier_seconds)
            self._fresh = self.feed.wait_until(ends, self.barrier_seconds - (time.monotonic() - started))
        except Exception as exc:  # noqa: BLE001 - broker unreachable: fail closed for this batch
            log.warning("reference data end offsets unknown (%s); this batch's orders are parked", exc)
            ends, self._fresh = None, False
        if not self._fresh:
            self.counts["reference_behind"] += 1
            log.warning("reference data not read up to %s within %.0f s (reader at %s); this batch's orders are "
                        "parked", ends, self.barrier_seconds, self.feed.behind(ends or {}))
            if ends is None:
                self._parked_blind = True
            else:
                self._parked_behind = {tp: max(o, self._parked_behind.get(tp, 0)) for tp, o in ends.items()}
        else:
            self._parked_blind = False  # the reader is past any earlier batch's ends
        return self._fresh

    def _parked_may_recheck(self) -> bool:
        """Whether parked orders see a view at least as new as the one they were parked behind."""
        if self.feed is None:
            return True
        return self.feed.caught_up.is_set() and not self._parked_blind and not self.feed.behind(self._parked_behind)

    def _apply_crl(self, record: dict[str, Any], trace: Trace | None) -> bool:
        """Offer one CRL record to the verifier under the history rule; True if it took effect now.

        Each distinct CRL is judged once (the worker's own copy and the traced
        copy may come in either order); the traced copy leaves the one audit
        trace of a CRL that was refused or superseded (``crl.refused``,
        ``crl.superseded``), the install is audited by every worker (``crl.loaded``).
        """
        try:
            rank = crl_rank(load_crl(record["crl_der"]))  # readable: the feed checked it
        except ValueError as exc:
            log.error("CRL from %s unreadable, not applied: %s", record.get("source"), exc)
            return False
        verdict = self.crls.decided(rank)
        installed = verdict is None and self._judge_crl(record, rank) == "installed"
        verdict = self.crls.decided(rank)
        if trace is not None and verdict != "installed":
            where = {"issuer": record.get("issuer"), "source": record.get("source"), "crl_number": rank.number,
                     "crl_sha256": hashlib.sha256(record["crl_der"]).hexdigest(),
                     "partition": trace.partition, "offset": trace.offset}
            if verdict == "superseded":
                current = self.crls.in_force(rank)
                self.emitter.audit(STAGE, "crl.superseded", "SUPERSEDED", detail={
                    **where, "in_force_crl_number": current.number if current else None,
                    "reason": "not newer than the CRL in force for its issuer and scope"})
            else:
                self.emitter.audit(STAGE, "crl.refused", "REFUSED", detail={
                    **where, "reason": (verdict or "").removeprefix("refused: ")})
        return installed

    def _judge_crl(self, record: dict[str, Any], rank: CrlRank) -> str:
        """Install the CRL if it is newer than the one in force and the verifier takes it; the verdict."""
        if not self.crls.supersedes(rank):
            log.info("CRL from %s (number %s) is not newer than the one in force; ignored",
                     record.get("source"), rank.number)
            verdict = "superseded"
        else:
            try:
                verdict = "installed" if self.verifier.update_crl(record["crl_der"]) else "superseded"
            except Exception as exc:  # noqa: BLE001 - a bad CRL is refused, loudly, never applied
                log.error("CRL from %s refused: %s", record.get("source"), exc)
                verdict = f"refused: {exc}"
        self.crls.decide(rank, verdict)
        if verdict == "installed":  # each worker audits its own load; the digest names the CRL in crl_archive
            self.emitter.audit(STAGE, "crl.loaded", "LOADED", detail={
                "issuer": record["issuer"], "next_update": record["next_update"], "source": record["source"],
                "crl_number": rank.number, "crl_sha256": hashlib.sha256(record["crl_der"]).hexdigest()})
        return verdict

    def recheck_parked(self) -> int:
        """Re-verify every parked order this worker holds; returns how many left the parking."""
        resolved = 0
        for dea in self.state.keys():
            state = self.state.get(dea)
            for order_id, raw in list(state["pending"].items()):
                self._decision = ""
                try:
                    _, rec = self.codec.decode(raw, expect=RECEIVED_SCHEMA)
                    done = self._verify(rec, dea, raw, parked=True)
                except Exception as exc:  # noqa: BLE001 - one parked order must not stop the others
                    log.exception("re-verification failed on parked order %s", order_id)
                    done = self._fail_parked(order_id, raw, dea, exc)
                if done:
                    del state["pending"][order_id]
                    known = state["outcomes"].get(order_id)
                    self.outcomes.record(state["outcomes"], order_id, self._decision or "DEAD_LETTER", None, [],
                                         digest=known["digest"] if known else b"")
                    self.state.mark_dirty(dea)
                    resolved += 1
        return resolved

    def _fail_parked(self, order_id: str, raw: bytes, dea: str, exc: Exception) -> bool:
        """A parked order that fails on re-verification is decided (rejected, or dead-lettered) and unparked."""
        parked = InputMessage(VERIFY_STATE_SOURCE, -1, -1, dea.encode(), raw)  # not a topic: the agent's own state
        try:
            rec = self.codec.decode(raw, expect=RECEIVED_SCHEMA)[1]
        except Exception as bad:  # noqa: BLE001 - state we wrote ourselves, but never trust it blindly
            self._decision = "DEAD_LETTER"
            self.dead_letter(parked, f"parked order {order_id} unreadable: {bad.__class__.__name__}: {bad}")
            return True
        self._fail(rec, exc, parked)
        return True

    def begin_batch(self) -> None:
        """Count the batch and take in the newest CRLs and registrations before judging it."""
        super().begin_batch()
        self.tick()

    def end_batch(self) -> None:
        self.state.flush()

    def tick(self) -> int:
        """Take in reference data and, if it changed, retry parked orders; returns how much happened.

        Parked orders wait until the reader has reached what they were parked
        behind (see ``reference_barrier``); a recheck skipped for that is owed.
        """
        applied = self.apply_reference_updates()
        resolved = 0
        if applied or self._recheck_owed:
            if self._parked_may_recheck():
                self._recheck_owed = False
                self._parked_behind.clear()
                resolved = self.recheck_parked()
            else:
                self._recheck_owed = True
        self.state.flush()
        return applied + resolved

    # ------------------------------------------------------------------ orders
    def handle(self, message: InputMessage) -> None:
        """Decide one received message. Its ``appended_at`` is the broker's append time of the message
        (None: unknown, the stated receipt is used as it is)."""
        decoded = decode(self.codec, message, RECEIVED_SCHEMA)
        if not decoded.ok:
            self.dead_letter(message, decoded.error or "")
            return
        rec: dict[str, Any] = decoded.record  # type: ignore[assignment]
        routing_key = (message.key or b"").decode("utf-8", errors="replace")
        position = message.position
        digest_hex = order_digest(rec)  # one SHA-256 of the order per message, handed to the checks below
        digest = bytes.fromhex(digest_hex)
        try:
            if self._repeated(rec, routing_key, digest, position):
                return
        except Exception:  # noqa: BLE001 - e.g. unreadable state: judged (and recorded) below as any order
            log.exception("outcome record of order %s could not be read", rec["order_id"])
        self._decision = ""
        with self.emitter.capture() as produced:
            try:
                rec, raw = self._judge_receipt(rec, message.value, message.appended_at)
                if self._order_id_reused(rec, routing_key, message):
                    return  # not recorded: the order id stays the accepted order's
                self._verify(rec, routing_key, raw, parked=False, digest=digest_hex)
            except Exception as exc:  # noqa: BLE001 - hostile input must not kill the agent
                log.exception("verification failed on order %s", rec["order_id"])
                # No state is rolled back: what earlier orders recorded stands, and so does this order's
                # number if it was recorded before the failure (it is then never accepted twice). Outputs
                # not yet published are taken back: the order gets one outcome, not half of two.
                self.emitter.discard(produced)
                del produced[:]
                self._fail(rec, exc, message)
        self._record(routing_key, rec["order_id"], digest, position, produced)

    def _repeated(self, rec: dict[str, Any], routing_key: str, digest: bytes, position: Position) -> bool:
        """Answer (and return True for) an order id already decided with the same bytes: never judged twice."""
        state = self.state.get(routing_key)
        known = self.outcomes.current(state["outcomes"], rec["order_id"])
        if known is None or bytes(known["digest"]) != digest:
            return False
        self.counts["redelivered"] += 1
        self.outcomes.repeat(self.emitter, STAGE, known, rec["order_id"], position, purchaser_dea=routing_key)
        return True

    def _record(self, routing_key: str, order_id: str, digest: bytes, position: Position,
                produced: list[Message]) -> None:
        """Keep the order's outcome, and its exact outputs while the input may come again."""
        if not self._decision:
            return
        try:
            state = self.state.get(routing_key)
            self.outcomes.record(state["outcomes"], order_id, self._decision, position, produced, digest=digest)
            self.state.mark_dirty(routing_key)
        except Exception:  # noqa: BLE001 - the outcome stands; only its record is missing (judged again if redelivered)
            log.exception("outcome of order %s could not be recorded", order_id)

    def _fail(self, rec: dict[str, Any], exc: Exception, message: InputMessage) -> None:
        """Reject an order the verifier could not judge; dead-letter it if even that cannot be written."""
        try:
            self._reject(rec, VERIFICATION_ERROR,
                         f"The order could not be verified ({exc.__class__.__name__}); it is treated as invalid.",
                         [], None, None, None)
        except Exception as again:  # noqa: BLE001 - e.g. a field no rejection can carry
            log.exception("rejection of order %s could not be written", rec.get("order_id"))
            self._decision = "DEAD_LETTER"
            self.dead_letter(message, f"{VERIFICATION_ERROR}: {exc.__class__.__name__}: {exc}; the rejection could "
                                      f"not be written either ({again.__class__.__name__}: {again})")

    def _judge_receipt(self, rec: dict[str, Any], raw: bytes,
                       appended_at: datetime | None) -> tuple[dict[str, Any], bytes]:
        """The order as judged: received when the sender says, unless the broker's append time says otherwise.

        ``received_at`` is written by the sender; the append time by the
        broker (``message.timestamp.type=LogAppendTime`` on the received
        topic). A stated receipt further than the skew from the append time
        is overruled by the append time, and the order's message is rewritten
        with it (so a parked or re-keyed order keeps the judged receipt).
        """
        stated = rec["received_at"]
        if appended_at is None or abs(stated - appended_at) <= self.receipt_skew:
            return rec, raw
        note = (f"the stated receipt {stated.isoformat()} is more than {self.receipt_skew.total_seconds():.0f} s "
                f"from the broker's append time {appended_at.isoformat()}, so the order is judged as received "
                f"at the append time")
        judged = {f: rec[f] for f in RECEIVED_FIELDS}
        judged["received_at"] = appended_at
        raw = self.codec.encode(RECEIVED_SCHEMA, judged)
        judged["receipt_note"] = note
        self.counts["receipt_corrected"] += 1
        self.emitter.audit(STAGE, "order.receipt_time_overruled", "OVERRULED", order_id=rec["order_id"],
                           detail={"stated_received_at": stated.isoformat(), "appended_at": appended_at.isoformat(),
                                   "skew_seconds": self.receipt_skew.total_seconds(), "note": note})
        return judged, raw

    def _order_id_reused(self, rec: dict[str, Any], routing_key: str, message: InputMessage) -> bool:
        """Dead-letter (and return True) a message reusing the id of another accepted order.

        Not a rejection: ClickHouse keys an order's rows by its id, so a
        rejection under that id would overwrite the first order's outcome.
        Accepted orders are recorded under the DEA number they are signed
        for, which is the key they are processed under.
        """
        known = self.state.get(routing_key)["order_ids"].get(rec["order_id"])
        if known is None or known["expires_at"] <= _ms(clock.utcnow()) or known["digest"] == order_digest(rec):
            return False
        reason = (f"{DUPLICATE_ORDER_ID}: order id {rec['order_id']} already names order {known['order_number']} "
                  f"accepted from {routing_key}; this message has different bytes and is not judged under that id")
        self.dead_letter(message, reason)
        self.emitter.audit(STAGE, "order.duplicate_order_id", DUPLICATE_ORDER_ID, order_id=rec["order_id"],
                           purchaser_dea=routing_key, detail={"order_number": known["order_number"], "reason": reason})
        return True

    def _verify(self, rec: dict[str, Any], routing_key: str, raw: bytes, *, parked: bool,
                digest: str | None = None) -> bool:
        """Judge one order. Returns False only when it stays (or becomes) parked.

        ``digest``: ``order_digest(rec)`` when the caller has it already (computed here otherwise)."""
        outcome = self.verifier.verify(rec["document"], rec["signature"], rec["received_at"], rec["format"])
        if not parked and not self._fresh:
            self._recheck_owed = True
            return self._park(rec, routing_key, raw, REVOCATION_UNKNOWN, REFERENCE_BEHIND, outcome, parked=False)
        if not outcome.ok:
            if outcome.reason_code in RETRYABLE:
                return self._park(rec, routing_key, raw, outcome.reason_code, outcome.reason or "", outcome,
                                  parked=parked)
            self._reject_outcome(rec, outcome)
            return True
        order = _verified_order(outcome)
        dea = order.purchaser.dea_number
        supplier = order.supplier.dea_number
        if self.suppliers is not None and supplier not in self.suppliers:
            checks = _check_records(outcome)
            checks.append({"check": "supplier", "passed": False,
                           "detail": f"addressed to {supplier}, not to {', '.join(sorted(self.suppliers))}"})
            self._reject(rec, WRONG_SUPPLIER,
                         f"The order is addressed to supplier DEA number {supplier}, which is not this "
                         "distributor's; send it to the supplier it names, or sign a new order naming this one.",
                         checks, order.order_number, dea, outcome.signer_subject)
            return True
        if dea != routing_key and not parked:
            # Re-key so the purchaser's state partition owner decides (replay protection).
            self.emitter.publish(t.RECEIVED, dea, raw)
            self._decision = "REROUTED"
            self.emitter.audit(STAGE, "order.rerouted", "REROUTED", order_id=rec["order_id"], purchaser_dea=dea,
                               detail={"received_key": routing_key, "signed_for": dea})
            self.counts["rerouted"] += 1
            return True
        registration = None
        if self.directory is not None:
            finding = self.directory.check(dea, rec["received_at"])
            if finding.code == REGISTRANT_UNKNOWN:
                return self._park(rec, routing_key, raw, finding.code,
                                  f"The purchaser {dea} is not in the supplier's registrant directory.", outcome,
                                  parked=parked)
            registration = {"check": "registration", "passed": finding.code is None, "detail": finding.detail}
            if finding.code is not None:
                checks = _check_records(outcome, registration)
                self._reject(rec, finding.code,
                             f"{finding.detail[0].upper()}{finding.detail[1:]}: DEA registration must be active "
                             "to order controlled substances; renew or correct the registration, then send a new "
                             "order.", checks, order.order_number, dea, outcome.signer_subject)
                return True
        return self._use_order_number(rec, outcome, dea, registration, digest or order_digest(rec))

    def _use_order_number(self, rec: dict[str, Any], outcome: Outcome, dea: str,
                          registration: dict[str, Any] | None, digest: str) -> bool:
        """Accept a valid order if its number is unused (or it is a redelivery of the order that used it).

        ``registration``: the registration check's record, listed in a rejection's checks."""
        state = self.state.get(dea)
        now_ms = _ms(clock.utcnow())
        order = _verified_order(outcome)
        number = order.order_number
        known = state["order_ids"].get(rec["order_id"])
        if known is not None and known["digest"] == digest and known["order_number"] == number \
                and known["expires_at"] > now_ms:
            self.counts["redelivered"] += 1
            self._accept(rec, outcome, redelivered=True)  # the same order again: its outputs again
            return True
        if state["accepted"].get(number, 0) > now_ms:
            checks = _check_records(outcome, registration)
            checks.append({"check": "order_number_unused", "passed": False,
                           "detail": f"order number {number} was already accepted from {dea}"})
            self._reject(rec, DUPLICATE_ORDER_NUMBER,
                         f"Order number {number} was already used by {dea} and is accepted only once; "
                         "send a new order with a new order number.", checks, number, dea, outcome.signer_subject)
            return True
        expires = _ms(order.signed_at + REMEMBER)
        self._forget_expired(dea, state, now_ms)
        # Recorded before the outputs are written, and never rolled back: if writing them fails the order
        # is rejected, and a second copy finds its number used (or, the same bytes, repeats this attempt).
        state["accepted"][number] = expires
        state["order_ids"][rec["order_id"]] = {"digest": digest, "order_number": number, "expires_at": expires}
        self._expiries.lower(dea, state, expires)
        self.state.mark_dirty(dea)
        self._accept(rec, outcome)
        return True

    def _forget_expired(self, dea: str, state: dict[str, Any], now_ms: int) -> None:
        """Drop the purchaser's expired order numbers and order ids, keeping the others in their order.

        Why the check first: rebuilding both maps on every accepted order cost tens of microseconds
        per order, and nothing has expired in nearly every call. When nothing has, the rebuilt maps
        would equal the present ones (same entries, same order: the state's bytes are the same).
        """
        if self._expiries.earliest(dea, state) > now_ms:
            return
        state["accepted"] = {n: exp for n, exp in state["accepted"].items() if exp > now_ms}
        state["order_ids"] = {o: k for o, k in state["order_ids"].items() if k["expires_at"] > now_ms}
        self._expiries.forget(dea)

    def _park(self, rec: dict[str, Any], routing_key: str, raw: bytes, code: str, reason: str,
              outcome: Outcome, *, parked: bool) -> bool:
        if parked:
            return False  # still waiting; it was announced when first parked
        order = outcome.order
        self.emitter.send(t.PENDING, "csos.orders.PendingOrder", rec["order_id"], {
            "order_id": rec["order_id"], "received_at": rec["received_at"], "parked_at": clock.utcnow(),
            "reason_code": code, "reason": f"{reason} {PARK_ADVICE}".strip(),
            "order_number": order.order_number if order else None,
            "purchaser_dea": order.purchaser.dea_number if order else None, "attempts": 1,
        })
        detail = {"reason": reason}
        if rec.get("receipt_note"):
            detail["receipt"] = rec["receipt_note"]
        self.emitter.audit(STAGE, "order.parked", code, order_id=rec["order_id"],
                           purchaser_dea=order.purchaser.dea_number if order else None, detail=detail)
        # Stored only once it is announced: an order that failed to park is rejected, never also re-verified.
        state = self.state.get(routing_key)
        state["pending"][rec["order_id"]] = raw
        self.state.mark_dirty(routing_key)
        self.counts["parked"] += 1
        self._decision = "PARKED"
        return False

    def _accept(self, rec: dict[str, Any], outcome: Outcome, *, redelivered: bool = False) -> None:
        order = _verified_order(outcome)
        verified = {
            "order_id": rec["order_id"],
            "order_number": order.order_number,
            "purchaser_dea": order.purchaser.dea_number,
            "purchaser_name": order.purchaser.name,
            "supplier_dea": order.supplier.dea_number,
            "signed_at": order.signed_at,
            "received_at": rec["received_at"],
            "verified_at": clock.utcnow(),
            "signer_serial": outcome.signer_serial or "",
            "signer_fingerprint": outcome.signer_fingerprint or "",
            "business_activity": self._registrant_field(order.purchaser.dea_number, "business_activity"),
            "purchaser_state": self._registrant_field(order.purchaser.dea_number, "state"),
            "lines": enrich_lines(order, self.products),
        }
        # Keyed by the DEA number the signature vouches for, not the sender's claim:
        # the monitor's per-registrant state is partitioned by it.
        payload = self.codec.encode("csos.orders.VerifiedOrder", verified)  # fails here, before any output
        self.emitter.publish(t.VERIFIED, order.purchaser.dea_number, payload)
        detail = {"order_number": order.order_number, "signer_serial": outcome.signer_serial,
                  "checks": [c.check for c in outcome.checks], "lines": len(order.lines)}
        if redelivered:
            detail["redelivered"] = "the same order id and bytes as an order already accepted: its outputs again"
        if rec.get("receipt_note"):
            detail["receipt"] = rec["receipt_note"]
        self.emitter.audit(STAGE, "order.verified", "VERIFIED", order_id=rec["order_id"],
                           purchaser_dea=order.purchaser.dea_number, detail=detail)
        self.counts["verified"] += 1
        self._decision = "VERIFIED"

    def _registrant_field(self, dea: str, name: str) -> str | None:
        """A field of the registrant master's record (business activity, state), None when unknown."""
        rec = self.directory.get(dea) if self.directory is not None else None
        return rec.get(name) if rec else None

    def _reject_outcome(self, rec: dict[str, Any], outcome: Outcome) -> None:
        order = outcome.order
        self._reject(rec, outcome.reason_code or "INVALID", outcome.reason or "invalid order",
                     _check_records(outcome),
                     order.order_number if order else None,
                     order.purchaser.dea_number if order else None,
                     outcome.signer_subject)

    def _reject(self, rec: dict[str, Any], code: str, reason: str, checks: list[dict[str, Any]],
                order_number: str | None, purchaser_dea: str | None, signer_subject: str | None) -> None:
        detail = {"order_number": order_number, "reason": reason}
        if rec.get("receipt_note"):
            checks = [{"check": "receipt_time", "passed": False, "detail": rec["receipt_note"]}] + checks
            detail["receipt"] = rec["receipt_note"]
        rejection = {
            "order_id": rec["order_id"], "received_at": rec["received_at"], "rejected_at": clock.utcnow(),
            "reason_code": code, "reason": reason, "order_number": order_number,
            "purchaser_dea": purchaser_dea, "signer_subject": signer_subject, "checks": checks,
        }
        payload = self.codec.encode("csos.orders.Rejection", rejection)  # fails here, before any output
        self.emitter.publish(t.REJECTED, rec["order_id"], payload, record=rejection)
        self.emitter.audit(STAGE, "order.rejected", code, order_id=rec["order_id"], purchaser_dea=purchaser_dea,
                           detail=detail)
        self.counts["rejected"] += 1
        self._decision = f"REJECTED:{code}"
