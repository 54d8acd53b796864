"""The demo's deterministic core: the same feed through the verify and monitor processors, without a broker.

Why: ``csos demo`` prints a compliance summary, and a refactor must not change
it. The full demo cannot be compared run to run: it simulates the days up to
*today* (so the orders change with the date), the broker and the sink take
minutes, and the case agent's timing decides which later orders an open case
holds. What decides every order is deterministic, though: the simulated feed
for a seed and an end date, the verify agent's processor and the monitor
agent's processor (their state is per registrant, and a registrant's orders
keep their order on every partitioning). This module runs exactly those, in
process, with an in-memory publisher standing in for Kafka, and renders what
the demo prints from them: the order summary (``Summary.render``), the
simulator's ground truth and the comparison with it (``streams.tools.demo``).

Not in it: the case agent (no cases, so no "Due-diligence cases" line), the
scripted analyst and the warehouse, ClickHouse and the audit trail. The
monitor runs with the default configuration (no ``SOM_*`` variables), as the
demo's worker does in a fresh shell.

``tests/unit/test_demo_core.py`` compares the rendering with a checked-in file;
after an intended change of behaviour regenerate it with
``.venv/bin/python -m streams.tools.demo_core --write tests/data/demo-core-summary.txt``.
"""
from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from streams.tools.feed import PreparedFeed, prepare_feed, publish
from connectors.sources.reference_publish import read_registrant_file

from connectors.kafka import catalogue as t
from streams.pipeline.agents.monitor import MonitorProcessor
from streams.pipeline.agents.verify import VerifyProcessor
from streams.pipeline.processor import InputMessage
from streams.core.avro_codec import default_codec
from streams.core.config import Settings
from streams.tools.demo import WAITING_DETECTORS, compare_with_truth, ground_truth
from connectors.kafka.emit import Emitter
from connectors.kafka.testing import MemoryPublisher
from streams.monitoring.detectors import MonitorConfig
from streams.monitoring.monitor import Monitor
from streams.domain.products import ProductMaster
from connectors.sources.reference_data import RegistrantDirectory
from streams.apps.summary import Summary
from streams.verification import Verifier

#: The fixed run the checked-in summary describes: small enough for a unit test (about a minute).
SEED = 7
REGISTRANTS = 12
DAYS = 150
END = datetime(2026, 3, 2, tzinfo=timezone.utc)
#: Where the expected rendering is kept.
EXPECTED = Path(__file__).resolve().parents[2] / "tests" / "data" / "demo-core-summary.txt"


@dataclass
class CoreRun:
    """What the processors decided: the feed and every record they published, decoded per topic."""

    feed: PreparedFeed
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def summary(self) -> Summary:
        """The demo's order summary, counted as ``streams.apps.summary.fetch_summary`` counts it in ClickHouse."""
        verified = {r["order_id"] for r in self.records.get(t.VERIFIED, [])}
        rejected = {r["order_id"]: r["reason_code"] for r in self.records.get(t.REJECTED, [])}
        pending = {r["order_id"] for r in self.records.get(t.PENDING, [])}
        s = Summary(verified=len(verified), rejected=len(set(rejected) - verified),
                    pending=len(pending - verified - set(rejected)), conflicting=len(verified & set(rejected)))
        s.rejected_by_reason = dict(Counter(c for oid, c in rejected.items() if oid not in verified))
        s.dead_lettered = sum(1 for r in self.records.get(t.DLQ, []) if r["stage"] == "verify")
        verdicts = self.verdicts()
        s.released = sum(1 for v in verdicts.values() if v["verdict"] == "RELEASE")
        s.held = sum(1 for v in verdicts.values() if v["verdict"] == "HOLD")
        held_by: Counter[str] = Counter()
        for v in verdicts.values():
            if v["verdict"] == "HOLD":
                held_by.update({f"{r['dimension']} ({r['detector']})" for r in v["reasons"]
                                if r["fired"] and r.get("enforced", True)})
        s.held_by_reason = dict(held_by)
        return s

    def verdicts(self) -> dict[str, dict[str, Any]]:
        return {v["order_id"]: v for v in self.records.get(t.VERDICTS, [])}

    def render(self) -> str:
        """The demo's summary, ground truth and comparison, for this run."""
        verdicts = self.verdicts()
        judged = {oid for oid, v in verdicts.items() if any(
            r["fired"] and r.get("enforced", True) and r["detector"] not in WAITING_DETECTORS for r in v["reasons"])}
        rejections = {r["order_id"]: r["reason_code"] for r in self.records.get(t.REJECTED, [])}
        return "\n".join([self.summary().render(), "", ground_truth(self.feed),
                          compare_with_truth(self.feed, {k: v["verdict"] for k, v in verdicts.items()}, judged,
                                             rejections), "", self.findings()]) + "\n"

    def findings(self) -> str:
        """Per detector: findings recorded and fired, enforced or not (not in the demo's output: a stricter
        check, since a detector that only records, e.g. a static rule, decides nothing the summary shows)."""
        seen: Counter[str] = Counter()
        fired: Counter[str] = Counter()
        for v in self.verdicts().values():
            for r in v["reasons"]:
                seen[r["detector"]] += 1
                fired[r["detector"]] += bool(r["fired"])
        lines = ["Findings per detector (recorded, fired)", "---------------------------------------"]
        lines += [f"  {name:<28} {seen[name]:>6} {fired[name]:>6}" for name in sorted(seen)]
        return "\n".join(lines)


def run_core(data_dir: Path, *, seed: int = SEED, registrants: int = REGISTRANTS, days: int = DAYS,
             end: datetime = END) -> CoreRun:
    """Simulate and sign the demo's feed, then verify and monitor every order in process."""
    feed, _received, out = decide_feed(data_dir, seed=seed, registrants=registrants, days=days, end=end)
    codec = default_codec()
    run = CoreRun(feed)
    for m in out.messages:
        run.records.setdefault(m.topic(), []).append(codec.decode(m.value())[1])
    return run


def decide_feed(data_dir: Path, *, seed: int, registrants: int, days: int,
                end: datetime = END) -> tuple[PreparedFeed, MemoryPublisher, MemoryPublisher]:
    """Simulate and sign a feed and run it through the verify and monitor processors, in memory.

    Returns the feed, the publisher holding the received orders (as published, unreadable ones included)
    and the one holding the processors' outputs, each in order: the demo summary reads the outcomes,
    ``csos bench-sink`` feeds both to the sink.
    """
    settings = Settings().with_(data_dir=data_dir, pki_dir=data_dir / "pki")
    feed = prepare_feed(settings, registrants=registrants, seed=seed, days=days, end=end)
    received = MemoryPublisher()
    publish(feed.messages, received)  # type: ignore[arg-type]
    products = ProductMaster.load(settings.products_path)
    out = MemoryPublisher()
    verify = VerifyProcessor(Verifier.from_pki_dir(settings.pki_dir, products), products,
                             Emitter(out, "verify-agent"), {}, _directory(data_dir),  # type: ignore[arg-type]
                             suppliers={feed.result.population.supplier.dea_number})
    for m in received.on(t.RECEIVED):
        verify.handle(InputMessage(t.RECEIVED, m.partition(), m.offset(), m.key(), m.value()))
    monitor = MonitorProcessor(Monitor(MonitorConfig()), {}, Emitter(out, "monitor-agent"))  # type: ignore[arg-type]
    for m in out.on(t.VERIFIED):
        monitor.handle(InputMessage(t.VERIFIED, m.partition(), m.offset(), m.key(), m.value()))
    return feed, received, out


def _directory(data_dir: Path) -> RegistrantDirectory:
    """The registrations the demo publishes on ``registrants``, as the verify agent's directory holds them."""
    codec = default_codec()
    directory = RegistrantDirectory()
    records, refused = read_registrant_file(data_dir / "registrants.csv")
    if refused:
        raise ValueError(f"registrant file has bad rows: {refused[:3]}")
    for rec in records:
        directory.apply(rec["dea_number"], codec.decode(codec.encode("csos.registry.Registrant", rec))[1])
    return directory


def core_summary() -> str:
    """The rendering for the fixed run (``SEED``, ``REGISTRANTS``, ``DAYS``, ``END``)."""
    with tempfile.TemporaryDirectory(prefix="csos-demo-core-") as tmp:
        return run_core(Path(tmp)).render()


def main(argv: list[str] | None = None) -> None:
    """Print the fixed run's summary, or write it (``--write FILE``) as the test's expected file."""
    parser = argparse.ArgumentParser(prog="python -m streams.tools.demo_core", description=main.__doc__)
    parser.add_argument("--write", type=Path, help=f"write the summary here (the test reads {EXPECTED.name})")
    args = parser.parse_args(argv)
    text = core_summary()
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
