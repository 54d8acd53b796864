"""The monitor's hand-inlined hot paths (issue 14) give what the library calls they replace give.

Run compiled (mypyc) and with ``CSOS_PURE_PYTHON=1``: both must agree with ``datetime`` and river.
"""
from __future__ import annotations

import math
import random
from datetime import datetime, timedelta, timezone

import pytest
from river import stats

from streams.monitoring import baselines as bl

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def test_month_of_is_the_utc_calendar_month_across_leap_years_and_centuries() -> None:
    """Every UTC day from 1899 to 2101 (1900 and 2100 are not leap years, 2000 is) falls in datetime's month."""
    start = (datetime(1899, 1, 1, tzinfo=timezone.utc) - _EPOCH).days
    end = (datetime(2101, 12, 31, tzinfo=timezone.utc) - _EPOCH).days
    for day in range(start, end + 1):
        d = _EPOCH + timedelta(days=day)
        ms = day * bl.MS_PER_DAY + (day * 7919) % bl.MS_PER_DAY  # any time of that day
        assert bl.month_of(ms) == d.year * 12 + d.month - 1, d
    # Asked again for the day it converted last (every family of an order), and alternating between two days.
    rng = random.Random(13)
    for _ in range(2000):
        ms = rng.randrange(start, end) * bl.MS_PER_DAY + rng.randrange(bl.MS_PER_DAY)
        d = _EPOCH + timedelta(milliseconds=ms)
        other = rng.randrange(start, end) * bl.MS_PER_DAY
        o = _EPOCH + timedelta(milliseconds=other)
        assert bl.month_of(ms) == bl.month_of(ms) == d.year * 12 + d.month - 1
        assert bl.month_of(other) == o.year * 12 + o.month - 1 and bl.month_of(ms) == d.year * 12 + d.month - 1


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_baseline_saved_and_restored_every_order_learns_as_river(alpha: float) -> None:
    """The worker restores each registrant's baselines from the saved state for every order: learning through the
    resumed Rust cores must give river's EW mean (with the warm-up fading factors) bit for bit."""
    rng = random.Random(14)
    xs = [rng.uniform(1, 5000) for _ in range(40)]
    kept = bl.EWMeanBaseline(alpha)
    saved = bl.EWMeanBaseline(alpha).to_dict()
    reference = None
    for i, x in enumerate(xs):
        restored = bl.EWMeanBaseline.from_dict(saved, alpha)
        restored.update(x)
        saved = restored.to_dict()
        kept.update(x)
        a = bl.warmup_alpha(alpha, i)
        mean, initialized = bl.ewmean_export(reference) if reference is not None else (0.0, False)
        reference = bl.ewmean_import(mean, initialized, a)
        reference.update(x)
        assert saved == kept.to_dict() == {"mean": reference.get(), "n": i + 1}


def test_log_units_variance_saved_and_restored_every_order_learns_as_river() -> None:
    rng = random.Random(15)
    alpha = 0.1
    kept = bl.EWVarBaseline(alpha)
    saved = bl.EWVarBaseline(alpha).to_dict()
    reference = stats.EWVar(fading_factor=1.0)
    for i in range(30):
        x = rng.gauss(6, 0.4)
        restored = bl.EWVarBaseline.from_dict(saved, alpha)
        restored.update(x)
        saved = restored.to_dict()
        kept.update(x)
        m, sq, initialized = bl.ewvar_export(reference)
        reference = bl.ewvar_import(m, sq, initialized, bl.warmup_alpha(alpha, i))
        reference.update(x)
        m, sq, _ = bl.ewvar_export(reference)
        assert saved == kept.to_dict() == {"mean": m, "sq_mean": sq, "n": i + 1}


def test_round2_is_the_builtin_round_to_two_digits() -> None:
    """The frequency detectors' rounding of a learned rate gives ``round(x, 2)``'s double: random rates, every
    tie and the doubles either side of it (where ``x * 100`` alone could round the wrong way), large values."""
    from streams.monitoring.detectors import round2

    rng = random.Random(16)
    values = [rng.uniform(0, 50) for _ in range(200_000)] + [rng.expovariate(0.001) for _ in range(50_000)]
    for k in range(0, 200_000, 7):
        tie = (k + 0.5) / 100
        values += [tie, math.nextafter(tie, 0.0), math.nextafter(tie, math.inf), k / 100]
    values += [0.0, 5e-3, 0.015, 0.025, 1.005, 2.675, 9_999_999.995, 1e7, 3e9, 1e-300]
    for x in values:
        assert round2(x) == round(x, 2), x


def test_poisson_limits_are_the_rounded_rate_and_its_quantile() -> None:
    from streams.monitoring.detectors import PoissonLimits, poisson_quantile

    limits = PoissonLimits(1e-4)
    rng = random.Random(17)
    for _ in range(3000):
        rate = rng.choice((rng.uniform(0, 12), float(rng.randint(0, 9)), 0.0, -0.0, 0.005, 2.675))
        expect = (round(rate, 2), poisson_quantile(round(rate, 2), 1e-4))
        assert limits.of(rate) == expect and limits.of(rate) == expect
        assert str(limits.of(rate)[0]) == str(expect[0])  # the same sign of zero too
