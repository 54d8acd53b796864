"""The simulated warehouse feed: population + PKI + signed orders, then onto Kafka.

Preparation and publication are separate steps because the worker must know
the trust anchors and the CRL before the first order arrives, and because the
benchmark must not time certificate issuance or RSA signing (a purchaser's
cost, not the distributor's).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import fastavro

from streams.core.avro_codec import default_codec
from streams.core.config import Settings
from streams.domain.order_document import FORMAT as CANONICAL_FORMAT
from streams.domain.x12_850 import FORMAT as X12_FORMAT
from streams.domain.x12_850 import encode_x12_850

from connectors.sources.intake import OrderIntake
from connectors.kafka.io import Publisher
from streams.tools.pki import TestPKI
from streams.tools.simulator import (Population, SigningKit, SimulatedOrder, SimulationConfig, SimulationResult,
                        generate_orders, is_malformed, write_labels)

Progress = Callable[[int], None]


@dataclass
class SignedMessage:
    sim: SimulatedOrder
    document: bytes | None
    signature: bytes
    fmt: str = "csos-order/1"

    @property
    def malformed(self) -> bool:
        return is_malformed(self.signature)

    def record(self) -> dict:
        """As a ``csos.feed.FeedRecord``: what intake needs, without the ground truth."""
        return {"order_id": self.sim.sim_id, "purchaser_dea": self.sim.claimed_purchaser_dea,
                "received_at": self.sim.received_at, "document": self.document,
                "signature": bytes(self.signature), "malformed": self.malformed, "format": self.fmt}


@dataclass
class PreparedFeed:
    result: SimulationResult
    pki: TestPKI
    messages: list[SignedMessage] = field(default_factory=list)
    labels_path: Path | None = None

    def expected(self) -> Counter:
        return Counter(m.sim.expected_outcome for m in self.messages)

    @property
    def lines(self) -> int:
        return sum(len(m.sim.order.lines) for m in self.messages if not m.malformed)


def prepare_feed(settings: Settings, *, registrants: int = 60, seed: int = 7, days: int = 120,
                 end: datetime | None = None, bad_fraction: float = 0.05, suspicious_fraction: float = 0.02,
                 bad_counts: Mapping[str, int] | None = None, suspicious_counts: Mapping[str, int] | None = None,
                 detached_every: int = 4, x12_every: int = 3, key_pool: int | None = 16,
                 pki: TestPKI | None = None,
                 progress: Progress | None = None) -> PreparedFeed:
    """Generate a population and its orders, issue certificates, sign, and write PKI + labels to disk.

    ``pki`` is an existing test PKI to issue from (e.g. one ``csos pki init``
    made); by default a new one is created whose CAs cover the simulated period.
    Every ``x12_every``-th order is an ANSI X12 850 instead of canonical JSON,
    as an EDI trading partner would send it (0: none).
    """
    config = SimulationConfig(days=days, end=end, seed=seed, bad_fraction=bad_fraction,
                              suspicious_fraction=suspicious_fraction, bad_counts=bad_counts,
                              suspicious_counts=suspicious_counts)
    pki = pki or TestPKI.create(now=config.resolved_end())
    population = Population.generate(registrants, seed)
    result = generate_orders(population, config)
    kit = SigningKit(pki, key_pool=key_pool)
    kit.prepare(result.orders)
    feed = PreparedFeed(result, pki)
    for i, sim in enumerate(result.orders):
        x12 = bool(x12_every) and i % x12_every == 1 and sim.label not in ("tampered", "malformed_order")
        document, signature = kit.sign(sim, detached=bool(detached_every) and i % detached_every == 0,
                                       **({"encode": encode_x12_850} if x12 else {}))
        feed.messages.append(SignedMessage(sim, document, signature, X12_FORMAT if x12 else CANONICAL_FORMAT))
        if progress:
            progress(1)
    pki.write_pki(settings.pki_dir)
    population.write_registrant_master(settings.data_dir / "registrants.csv")
    feed.labels_path = write_labels(settings.data_dir / "labels.csv", result.orders)
    return feed


def replay_settings(settings: Settings, feed: PreparedFeed, *, margin: timedelta = timedelta(hours=6)) -> Settings:
    """Settings for a worker that verifies this simulated feed: its supplier, and a receipt skew admitting its history.

    The feed replays ``days`` of orders with their historical receipt times,
    all appended to the broker now. With the production skew (300 s) every
    order signed more than 60 days ago would be judged as received today and
    expire, so a replay of history widens the skew to the feed's span (its
    first receipt to now, plus ``margin`` for the run itself). The check stays
    on: a receipt stated before the feed began, or far in the future, is
    still overruled by the broker's append time. Production keeps the default.
    """
    first = min((m.sim.received_at for m in feed.messages), default=feed.result.start)
    span = (datetime.now(timezone.utc) - first + margin).total_seconds()
    return settings.with_(supplier_dea=feed.result.population.supplier.dea_number,
                          receipt_skew_seconds=max(settings.receipt_skew_seconds, round(span)))


def save_feed(feed: PreparedFeed, path: Path) -> Path:
    """Record the signed feed as an Avro container file, to publish later (or elsewhere)."""
    schema = default_codec().catalog.get("csos.feed.FeedRecord").parsed
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fastavro.writer(fh, schema, (m.record() for m in feed.messages), codec="deflate")
    return path


def load_feed(path: Path) -> Iterator[dict]:
    with open(path, "rb") as fh:
        yield from fastavro.reader(fh)


def publish_reference_data(settings: Settings, publisher: Publisher) -> tuple[list[str], int]:
    """The simulated distributor's reference data: every CRL in the PKI and the registrant file."""
    from connectors.sources.reference_publish import publish_crls, publish_registrants, read_registrant_file

    issuers = publish_crls(publisher, sorted((settings.pki_dir / "crl").glob("*.crl")))
    records, refused = read_registrant_file(settings.data_dir / "registrants.csv")
    if refused:
        raise ValueError(f"registrant file has bad rows: {refused[:3]}")
    return issuers, publish_registrants(publisher, records)


def publish(messages: Iterable[SignedMessage | dict], publisher: Publisher, *, source: str = "simulator",
            progress: Progress | None = None) -> int:
    """Put signed orders on the received topic as a warehouse system would; returns the count."""
    intake = OrderIntake(publisher, source)
    n = 0
    for m in messages:
        r = m.record() if isinstance(m, SignedMessage) else m
        if r["malformed"]:
            intake.submit_raw(r["signature"], key=r["purchaser_dea"])
        else:
            intake.submit(r["signature"], document=r["document"], purchaser_dea=r["purchaser_dea"],
                          order_id=r["order_id"], received_at=r["received_at"], fmt=r["format"])
        n += 1
        if progress and n % 100 == 0:
            progress(100)
    publisher.flush()
    if progress and n % 100:
        progress(n % 100)
    return n
