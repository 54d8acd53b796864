"""Topic names: the pipeline's public interface to upstream and downstream systems."""

RECEIVED = "csos.orders.received"  # ReceivedOrder, keyed by purchaser DEA number (as claimed by the sender)
VERIFIED = "csos.orders.verified"  # VerifiedOrder, keyed by purchaser DEA number
REJECTED = "csos.orders.rejected"  # Rejection, keyed by order id
PENDING = "csos.orders.pending"  # PendingOrder: not verifiable yet (missing CRL/registrant/product), keyed by order id
VERDICTS = "som.verdicts"  # Verdict, keyed by order id
HOLD = "som.hold"  # Hold, keyed by order id
RELEASE = "som.release"  # Release, keyed by order id
AUDIT = "audit.events"  # AuditEvent, keyed by order id (or event id)
DLQ = "dlq"  # DeadLetter, keyed by the original key
CRL = "pki.crl"  # compacted: latest CRL per issuer (issue 3)
REGISTRANTS = "registrants"  # compacted: registrant master (issue 3)
DECISIONS = "som.decisions"  # Decision: an analyst's release/report/cancel of a held order, keyed by order id
CASES = "som.cases"  # CaseEvent: due-diligence case lifecycle (opened, escalated, closed, refused), keyed by order id
CLEARED = "som.cleared"  # ClearedOrder: released after due diligence, for the learner; keyed by purchaser DEA
REPORTS = "som.reports"  # SuspiciousOrderReport for DEA, keyed by order id
SHIPMENTS = "warehouse.shipments"  # ShipmentConfirmation, written by the warehouse, keyed by order id
