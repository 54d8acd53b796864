"""The three processors of a worker, built from settings over the tables a runtime gives them.

Both runtimes (``streams.pipeline.app``, Faust; ``streams.pipeline.kafka_worker``,
confluent-kafka) run the same processors with the same settings; only where
their tables live and how a batch reaches them differ. Building them here
keeps the two from drifting apart.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import Callable, MutableMapping

from connectors.kafka.emit import Emitter
from connectors.kafka.io import Publisher
from connectors.sources.reference_data import ReferenceFeed, RegistrantDirectory, trace_group_config
from streams.core.config import Settings
from streams.domain.identifiers import is_valid_dea_number
from streams.pipeline.agents.cases import CaseProcessor
from streams.pipeline.agents.monitor import MonitorProcessor
from streams.pipeline.agents.verify import STAGE as VERIFY_STAGE
from streams.pipeline.agents.verify import VerifyProcessor
from streams.pipeline.outcomes import OutcomeBook

log = logging.getLogger(__name__)

#: Each processor's table (Faust names its changelog topic ``<app_id>-<table>-changelog``: ``changelog_topic``).
TABLES = {"verify": "csos-verify-state", "monitor": "som-registrant-state", "cases": "som-cases"}
#: The processors by the name ``/health`` reports their counts under, in the order a batch runs them.
PARTS = ("verify", "monitor", "cases")


def changelog_topic(app_id: str, part: str) -> str:
    """The changelog topic of processor ``part``'s table: the name Faust gives it, which both runtimes use."""
    return f"{app_id}-{TABLES[part]}-changelog"


def require_supplier_dea(settings: Settings) -> frozenset[str]:
    """The supplier DEA numbers the worker accepts orders for; ``ValueError`` when unset or invalid.

    Fail closed: a worker that does not know whose orders it fills would
    release an order addressed to any other distributor.
    """
    deas = settings.supplier_deas
    if not deas:
        raise ValueError("CSOS_SUPPLIER_DEA is not set: give this distributor's DEA number(s), comma-separated; "
                         "orders addressed to any other supplier are rejected (WRONG_SUPPLIER)")
    bad = sorted(d for d in deas if not is_valid_dea_number(d))
    if bad:
        raise ValueError(f"CSOS_SUPPLIER_DEA: {', '.join(bad)} is not a valid DEA number (format or check digit)")
    return deas


def build_processors(settings: Settings, suppliers: frozenset[str], tables: dict[str, MutableMapping[bytes, bytes]],
                     publisher: Publisher, owns_case: Callable[[str], bool], *,
                     trace_group: str) -> dict[str, VerifyProcessor | MonitorProcessor | CaseProcessor]:
    """The verify, monitor and case processors (keys: ``PARTS``), each over ``tables[name]``, their outputs buffered on ``publisher``.

    Loads the PKI and the product master, starts the reference feed (its own
    producer, so that its dead letters are flushed apart from the batches) and
    audits every CRL or certificate file the verifier refused: a refused file
    never stops the worker, but it is never silent either.
    """
    from streams.domain.products import ProductMaster
    from streams.monitoring.monitor import Monitor
    from streams.verification import Verifier

    products = ProductMaster.load(settings.products_path)

    def emitter(actor: str) -> Emitter:
        return Emitter(publisher, actor, buffered=True)  # published once the batch's state is durable

    def book() -> OutcomeBook:
        return OutcomeBook(timedelta(days=settings.dedup_days))

    feed = ReferenceFeed(settings.kafka_bootstrap, emitter=Emitter(Publisher(settings.kafka_bootstrap), "reference-feed"),
                         trace_group=trace_group, trace_config=trace_group_config(settings))
    feed.start()
    verifier = Verifier.from_pki_dir(settings.pki_dir, products)
    startup = Emitter(publisher, "verify-agent")  # unbuffered: no batch carries these
    for refusal in verifier.refusals:
        log.error("%s %s refused: %s", refusal.kind, refusal.source, refusal.reason)
        startup.audit(VERIFY_STAGE, "crl.refused" if refusal.kind == "crl" else "certificate.refused",
                      "REFUSED", detail={"source": refusal.source, "reason": refusal.reason})
    return {
        "verify": VerifyProcessor(
            verifier, products, emitter("verify-agent"), tables["verify"],
            RegistrantDirectory() if settings.require_registration else None, feed,
            suppliers=suppliers, receipt_skew=timedelta(seconds=settings.receipt_skew_seconds),
            outcomes=book(), barrier_seconds=settings.reference_barrier_seconds),
        "monitor": MonitorProcessor(Monitor.from_env(products), tables["monitor"], emitter("monitor-agent"),
                                    outcomes=book()),
        "cases": CaseProcessor(tables["cases"], emitter("case-agent"), due_days=settings.due_diligence_days,
                               reporting_dea=settings.reporting_dea, owns=owns_case,
                               retention_days=settings.case_retention_days, outcomes=book()),
    }
