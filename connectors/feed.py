"""The simulated warehouse feed: population + PKI + signed orders, then onto Kafka.

Preparation and publication are separate steps because the worker must know
the trust anchors and the CRL before the first order arrives, and because the
benchmark must not time certificate issuance or RSA signing (a purchaser's
cost, not the distributor's).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Mapping

from streams.config import Settings

from .intake import OrderIntake
from .kafka_io import Publisher
from .pki import TestPKI
from .simulator import (Population, SigningKit, SimulatedOrder, SimulationConfig, SimulationResult,
                        generate_orders, is_malformed, write_labels)

Progress = Callable[[int], None]


@dataclass
class SignedMessage:
    sim: SimulatedOrder
    document: bytes | None
    signature: bytes

    @property
    def malformed(self) -> bool:
        return is_malformed(self.signature)


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
                 detached_every: int = 4, key_pool: int | None = 16,
                 progress: Progress | None = None) -> PreparedFeed:
    """Generate a population and its orders, issue certificates, sign, and write PKI + labels to disk."""
    config = SimulationConfig(days=days, end=end, seed=seed, bad_fraction=bad_fraction,
                              suspicious_fraction=suspicious_fraction, bad_counts=bad_counts,
                              suspicious_counts=suspicious_counts)
    pki = TestPKI.create(now=config.resolved_end())
    population = Population.generate(registrants, seed)
    result = generate_orders(population, config)
    kit = SigningKit(pki, key_pool=key_pool)
    kit.prepare(result.orders)
    feed = PreparedFeed(result, pki)
    for i, sim in enumerate(result.orders):
        document, signature = kit.sign(sim, detached=bool(detached_every) and i % detached_every == 0)
        feed.messages.append(SignedMessage(sim, document, signature))
        if progress:
            progress(1)
    pki.write_pki(settings.pki_dir)
    population.write_registrant_master(settings.data_dir / "registrants.csv")
    feed.labels_path = write_labels(settings.data_dir / "labels.csv", result.orders)
    return feed


def publish(messages: Iterable[SignedMessage], publisher: Publisher, *, source: str = "simulator",
            progress: Progress | None = None) -> int:
    """Put signed orders on the received topic as a warehouse system would; returns the count."""
    intake = OrderIntake(publisher, source)
    n = 0
    for m in messages:
        if m.malformed:
            intake.submit_raw(bytes(m.signature), key=m.sim.claimed_purchaser_dea)
        else:
            intake.submit(m.signature, document=m.document, purchaser_dea=m.sim.claimed_purchaser_dea,
                          order_id=m.sim.sim_id, received_at=m.sim.received_at)
        n += 1
        if progress and n % 100 == 0:
            progress(100)
    publisher.flush()
    if progress and n % 100:
        progress(n % 100)
    return n
