"""The bench's warm-up: every registrant's certificate is seen before the timed feed, and nothing is lost."""
from __future__ import annotations

from types import SimpleNamespace

from streams.tools.bench import split_warm_up


def _message(dea: str, n: int) -> SimpleNamespace:
    return SimpleNamespace(sim=SimpleNamespace(registrant=SimpleNamespace(dea_number=dea)), n=n)


def test_every_registrant_is_warmed_up_and_each_keeps_its_order() -> None:
    feed = [_message(f"R{i % 7 if i < 60 else 7 + i % 3}", i) for i in range(100)]  # R7-R9 only after the 20th
    warm, timed = split_warm_up(feed)
    assert sorted(m.n for m in warm + timed) == list(range(100))  # nothing lost, nothing twice
    assert warm[:5] == feed[:5]  # the first twentieth as it was
    registrants = {m.sim.registrant.dea_number for m in feed}
    assert {m.sim.registrant.dea_number for m in warm} == registrants
    for dea in registrants:  # a registrant's first order is its warm-up order; the rest follow in order
        ns = [m.n for m in warm + timed if m.sim.registrant.dea_number == dea]
        assert ns == sorted(ns)
    assert all(m.n > 4 for m in warm[5:]) and len(warm) == 5 + 5  # R5, R6 first at 5-6; R7-R9 after 60
