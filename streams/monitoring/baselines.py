"""Per-registrant, per-drug-family baselines that live in a Faust table.

What a registrant "usually" orders is kept as a handful of exponentially
weighted (EW) statistics per drug family, plus two short rings of recent
activity. They are river statistics (``river.stats.EWMean``, ``EWVar``) so the
arithmetic is river's, but the state that is stored is a plain dict: the Faust
table's changelog is an Avro topic (``som.state.RegistrantState``), which must
stay readable by an auditor years later and must not depend on pickles of
river objects.

river 0.26 implements ``EWMean``/``EWVar`` in Rust and exposes their state only
as bincode bytes (``__getstate__``). This module reads and writes those bytes
field by field against the layout of river's ``rust_src`` (``RsEWMean`` =
``{EWMean{mean, alpha, one_minus_alpha, initialized}, alpha}``). Any change of
that layout in a river upgrade raises :class:`RiverStateError` instead of
silently decoding garbage, and ``tests/unit/test_monitoring.py`` checks the round trip.

Why these quantities (21 CFR 1301.74(b): unusual size, frequency, pattern):

* ``log_units`` (EW mean/var of ln dosage units per order): order size is
  multiplicative (a restock doubles an order), so the spread is judged on a log
  scale; ``units`` (EW mean of raw units) is the number an analyst recognises.
* ``count_24h`` / ``count_7d`` / ``units_30d``: the number of orders in the last
  24 hours / 7 UTC calendar days and the dosage units in the last 30 UTC days,
  each sampled at every learned order *including that order*. At scoring time
  the same quantity is computed including the new order, so the comparison is
  like for like. A sample is only taken once the family's history covers the
  whole window: a window that is only partly filled would set the baseline too
  low and hold the registrant's normal orders.
* ``gap_days``: EW mean of the time between orders, shown to analysts.
* ``mix``: EW mean of the units of each family per order (zeros included), whose
  normalised values are the registrant's usual share of units per family.

Two deliberate departures from a plain EW mean: for the first 1/alpha values
the fading factor is 1/n (:func:`warmup_alpha`), so a registrant's first order
does not define its "usual" for months; and a learned window count is clipped
to one order above the usual count (:func:`_clip_count`), so the released head
of a burst cannot raise the threshold that is meant to stop the burst.

* ``timing`` (per registrant, not per family): learned orders per UTC hour of
  day (24 counts) and per weekday (7 counts), halved whenever they reach
  :data:`TIMING_CAP` orders, for the unusual-timing detector.
* ``mg_per_unit``: EW mean of the order's mg of base drug per dosage unit of
  the family (its usual strength mix), for the strength-shift detector: 30 mg
  tablets instead of 5 mg ones at the same unit count are invisible to unit
  counts, not to this.
* ``months``: dosage units per UTC calendar month, the current month and the
  12 before it: the long memory the ramp detector compares with (a slow ramp
  cannot drag it as it drags the EW statistics) and the static reference rules ("Rafalski" flags: over 2x / 3x
  the trailing 12-month average, over the trailing 6-month maximum, over
  8,000 units a month, over a customer's fixed monthly limit).

Everything is bounded: per family seven numbers, at most ``recent_max``
timestamps from the last 24 hours, at most 30 ``(day, orders, units)`` cells
and at most 13 ``(month, units)`` cells.
"""
from __future__ import annotations

import bisect
import functools
import math
import statistics
import struct
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Final, Iterable, Mapping, NamedTuple, Sequence

from river import stats
from streams.monitoring.errors import RiverStateError, StateVersionError

#: Version of the state dict / ``som.state.RegistrantState`` layout. Bump it and
#: add a step to :func:`migrate_state` whenever the layout changes.
STATE_VERSION: Final = 4

MS_PER_DAY: Final = 86_400_000
WINDOW_24H_MS: Final = MS_PER_DAY
WINDOW_7D_DAYS: Final = 7
WINDOW_30D_DAYS: Final = 30
MONTHS_KEPT: Final = 13  # the current calendar month and the 12 full months before it
#: Legacy guard (the last few learned order ids, as CRCs); the authority on what was learned is the
#: per-order-id ``outcomes`` record, kept CSOS_DEDUP_DAYS (``streams.pipeline.outcomes``).
LEARNED_IDS_KEPT: Final = 8
#: Timing counts are halved when their total reaches this: bounded ints, recent habits weigh more.
TIMING_CAP: Final = 256

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS: Final = timedelta(milliseconds=1)


# --------------------------------------------------------------------------
# river statistic <-> plain numbers
# --------------------------------------------------------------------------

# RsEWMean {ewmean: EWMean{mean: f64, alpha: f64, one_minus_alpha: f64, initialized: bool}, alpha: f64}
_EWMEAN_BYTES: Final = struct.Struct("<ddd?d")
# RsEWVar {ewvar: EWVariance{mean: EWMean, sq_mean: EWMean, alpha: f64}, alpha: f64}
_EWVAR_BYTES: Final = struct.Struct("<ddd?ddd?dd")


def _rust_core(stat: Any, attr: str) -> Any:
    try:
        core = getattr(stat, attr)
        core.__getstate__  # noqa: B018 - presence check
        core.__setstate__  # noqa: B018
    except AttributeError as exc:
        raise RiverStateError(
            f"river.stats.{type(stat).__name__} no longer has the Rust core {attr!r} with "
            f"__getstate__/__setstate__; update streams/monitoring/baselines.py for this river version"
        ) from exc
    return core


def _check_alpha(kind: str, stored: tuple[float, ...], alpha: float) -> None:
    for value in stored:
        if value != alpha and value != 1.0 - alpha:
            raise RiverStateError(
                f"river {kind} state holds {stored!r} where the fading factor {alpha} was expected; "
                f"the internal layout changed"
            )


def ewmean_export(stat: stats.EWMean) -> tuple[float, bool]:
    """(mean, initialized) of a river ``EWMean``, read from its Rust state bytes."""
    return _ewmean_unpack(_rust_core(stat, "_ewmean").__getstate__(), stat.fading_factor)


def _ewmean_unpack(raw: bytes, fading_factor: float) -> tuple[float, bool]:
    """:func:`ewmean_export` from the Rust core's state bytes (what saving a learned baseline reads)."""
    if len(raw) != _EWMEAN_BYTES.size:
        raise RiverStateError(f"river EWMean state is {len(raw)} bytes, expected {_EWMEAN_BYTES.size}")
    mean, a, one_minus_a, initialized, a2 = _EWMEAN_BYTES.unpack(raw)
    _check_alpha("EWMean", (a, one_minus_a, a2), fading_factor)
    return mean, initialized


def ewmean_import(mean: float, initialized: bool, alpha: float) -> stats.EWMean:
    """A river ``EWMean`` with fading factor ``alpha`` resumed at ``mean``."""
    stat = stats.EWMean(fading_factor=alpha)
    if initialized:
        _rust_core(stat, "_ewmean").__setstate__(_ewmean_state(mean, alpha))
    return stat


def _ewmean_state(mean: float, alpha: float) -> bytes:
    """The Rust state bytes of an initialised ``EWMean`` at ``mean`` (the one place its layout is written)."""
    return _EWMEAN_BYTES.pack(float(mean), alpha, 1.0 - alpha, True, alpha)


def ewvar_export(stat: stats.EWVar) -> tuple[float, float, bool]:
    """(EW mean of x, EW mean of x**2, initialized) of a river ``EWVar``."""
    return _ewvar_unpack(_rust_core(stat, "_ewvar").__getstate__(), stat.fading_factor)


def _ewvar_unpack(raw: bytes, fading_factor: float) -> tuple[float, float, bool]:
    """:func:`ewvar_export` from the Rust core's state bytes (what learning reads after every update)."""
    if len(raw) != _EWVAR_BYTES.size:
        raise RiverStateError(f"river EWVar state is {len(raw)} bytes, expected {_EWVAR_BYTES.size}")
    m, a1, b1, init1, sq, a2, b2, init2, a3, a4 = _EWVAR_BYTES.unpack(raw)
    _check_alpha("EWVar", (a1, b1, a2, b2, a3, a4), fading_factor)
    if init1 != init2:
        raise RiverStateError("river EWVar mean and square-mean disagree on initialisation")
    return m, sq, init1


def _core_class(stat_type: Any, attr: str) -> Any:
    """The class of a river statistic's Rust core, checked (:func:`_rust_core`) once at import.

    Learning resumes ~30 statistics per released order; building the Rust core directly, as river's own
    ``__init__`` does, skips the Python object around it and the presence checks on every resume.
    """
    return type(_rust_core(stat_type(fading_factor=0.5), attr))


def _checked_ewmean_core() -> Any:
    """:data:`_RS_EWMEAN`, once its state layout is checked: that a learned mean reads back from the state bytes
    as river's ``get()`` returns it (with the fading factor where it is expected), so that saving a baseline can
    store ``get()``'s mean without exporting the state bytes of every statistic."""
    core_class = _core_class(stats.EWMean, "_ewmean")
    core = core_class(0.25)
    for x in (3.0, 5.0, 11.0):
        core.update(x)
    mean, initialized = _ewmean_unpack(core.__getstate__(), 0.25)
    if not initialized or mean != core.get():
        raise RiverStateError("river EWMean state bytes no longer hold get()'s mean; update "
                              "streams/monitoring/baselines.py for this river version")
    return core_class


_RS_EWMEAN: Final[Any] = _checked_ewmean_core()
_RS_EWVAR: Final[Any] = _core_class(stats.EWVar, "_ewvar")


def _ewmean_core(mean: float, initialized: bool, alpha: float, reuse: Any = None) -> Any:
    """:func:`ewmean_import`'s Rust core alone (what learning updates).

    ``reuse``: a core of this kind that may be overwritten. Its state bytes hold every field of the Rust
    statistic, so one set from them is the one a new core would be (``test_monitoring`` checks it against
    river); it saves building a core per update while a warm-up changes the fading factor each time.
    """
    if not initialized:
        return _RS_EWMEAN(alpha)
    core = reuse if reuse is not None else _RS_EWMEAN(alpha)
    core.__setstate__(_ewmean_state(mean, alpha))
    return core


def _ewvar_core(mean: float, sq_mean: float, initialized: bool, alpha: float, reuse: Any = None) -> Any:
    """:func:`ewvar_import`'s Rust core alone (what learning updates); ``reuse``: as :func:`_ewmean_core`."""
    if not initialized:
        return _RS_EWVAR(alpha)
    core = reuse if reuse is not None else _RS_EWVAR(alpha)
    core.__setstate__(_ewvar_state(mean, sq_mean, alpha))
    return core


def ewvar_import(mean: float, sq_mean: float, initialized: bool, alpha: float) -> stats.EWVar:
    """A river ``EWVar`` with fading factor ``alpha`` resumed from its two EW means."""
    stat = stats.EWVar(fading_factor=alpha)
    if initialized:
        _rust_core(stat, "_ewvar").__setstate__(_ewvar_state(mean, sq_mean, alpha))
    return stat


def _ewvar_state(mean: float, sq_mean: float, alpha: float) -> bytes:
    """The Rust state bytes of an initialised ``EWVar`` (the one place its layout is written)."""
    b = 1.0 - alpha
    return _EWVAR_BYTES.pack(float(mean), alpha, b, True, float(sq_mean), alpha, b, True, alpha, alpha)


def warmup_alpha(alpha: float, n: int) -> float:
    """Fading factor for the (n+1)-th value: 1/(n+1) until that falls below ``alpha``.

    river's EW statistics start at the first value and then fade it slowly, so
    with alpha = 0.1 the first order would still weigh 43% after eight orders
    and a registrant's first order would define its "usual". Using 1/(n+1)
    for the first 1/alpha values makes them plain running means (every order
    counts the same) that hand over smoothly to the EW mean.
    """
    return max(alpha, 1.0 / (n + 1))


def ew_memory(alpha: float) -> int:
    """Effective number of observations an EW statistic remembers: (2 - alpha) / alpha."""
    return max(1, round((2.0 - alpha) / alpha))


# --------------------------------------------------------------------------
# Small baselines, each with to_dict/from_dict
# --------------------------------------------------------------------------

class _RiverEW:
    """What the EW mean and EW variance baselines share: river does the arithmetic, with a warm-up.

    Each value is learned by a river statistic resumed from the stored numbers
    with the fading factor :func:`warmup_alpha` gives for the ``n``-th value;
    the statistic is kept while that factor stays the same (after the warm-up,
    for good), so a run of updates costs one import. Subclasses say how to
    resume the statistic's Rust core (``_resume``) and what to read back (``_read``).
    """

    __slots__ = ("alpha", "n", "_core", "_core_alpha")
    alpha: float
    n: int
    _core: Any  # the river statistic's Rust core: updated and read directly (~50 updates per learned order)
    _core_alpha: float  # the fading factor the statistic was resumed with

    def _resume(self, alpha: float) -> Any:
        """The river statistic's Rust core resumed from the stored numbers with fading factor ``alpha`` (the
        core it had, if any, overwritten: see :func:`_ewmean_core`)."""
        raise NotImplementedError

    def _read(self, core: Any) -> None:
        raise NotImplementedError

    def update(self, x: float) -> None:
        inv = 1.0 / (self.n + 1)
        alpha = self.alpha
        a = alpha if alpha >= inv else inv  # warmup_alpha (max(alpha, inv)), inlined
        core = self._core
        if core is None or self._core_alpha != a:
            core = self._core = self._resume(a)
            self._core_alpha = a
        core.update(float(x))  # what river's Python update() does, without its extra call
        self.n += 1
        self._read(core)


class EWMeanBaseline(_RiverEW):
    """``river.stats.EWMean`` plus the number of values it has seen (0 = no baseline yet).

    The stored numbers are river's own state; the river object is only built
    when a value is learned, so scoring, which only reads, costs no river
    calls. After an update the mean is read back from river (``get()``) only
    when something reads it: a family's mix mean is updated on every learned
    order of the registrant (~50 updates per learned order in all) and read at
    most once per order or state export.
    """

    __slots__ = ("_mean", "_stale")

    def __init__(self, alpha: float, mean: float = 0.0, n: int = 0) -> None:
        self.alpha = alpha
        self._mean = float(mean)
        self._stale = False  # river's statistic is newer than _mean
        self.n = int(n)
        self._core = None
        self._core_alpha = 0.0

    @property
    def mean(self) -> float:
        """The EW mean, as river's ``get()`` returns it."""
        if self._stale:
            # river's get() is the mean itself, as its state bytes hold it (checked once at import:
            # _checked_ewmean_core), so saving the state (to_dict) stores it without exporting the bytes.
            self._mean = self._core.get()
            self._stale = False
        return self._mean

    def _resume(self, alpha: float) -> Any:
        return _ewmean_core(self.mean, self.n > 0, alpha, self._core)

    def _read(self, core: Any) -> None:
        self._stale = True

    def get(self) -> float:
        return self.mean if self.n else 0.0

    def window(self) -> str:
        """What the baseline covers, for the verdict's ``window`` field."""
        return _ew_window(self.alpha, self.n)

    def window_later(self, before: str = "", after: str = "") -> tuple[Any, ...]:
        """``before + self.window() + after``, to be written only if the verdict keeps the finding.

        A deferred window (``streams.monitoring.detectors.Window``): the function and the numbers it needs,
        called by ``as_reason`` for the ~20 findings of ~110 per order that a verdict keeps.
        """
        return (_ew_framed, self.alpha, self.n, before, after)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean if self.n else 0.0, "n": self.n}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], alpha: float) -> "EWMeanBaseline":
        return cls(alpha, d["mean"], d["n"])


def _ew_framed(alpha: float, n: int, before: str, after: str) -> str:
    """:meth:`EWMeanBaseline.window_later`'s text."""
    return before + _ew_window(alpha, n) + after


@functools.lru_cache(maxsize=1024)
def _ew_window(alpha: float, n: int) -> str:
    """:meth:`EWMeanBaseline.window`: the same few sentences on every order, written once."""
    if n < round(1.0 / alpha):
        return f"mean over {n} released orders"
    return f"EW mean over ~{ew_memory(alpha)} released orders"


class EWVarBaseline(_RiverEW):
    """``river.stats.EWVar`` (as its two EW means) plus a count; used for ln(order size).

    After an update the two means are read back from river's state bytes only
    when something reads them (scoring reads them once per order of the family,
    learning updates them on every released one).
    """

    __slots__ = ("_mean", "_sq_mean", "_stale")

    def __init__(self, alpha: float, mean: float = 0.0, sq_mean: float = 0.0, n: int = 0) -> None:
        self.alpha = alpha
        self._mean = float(mean)
        self._sq_mean = float(sq_mean)
        self._stale = False  # river's state is newer than _mean / _sq_mean
        self.n = int(n)
        self._core = None
        self._core_alpha = 0.0

    def _resume(self, alpha: float) -> Any:
        return _ewvar_core(self.mean, self.sq_mean, self.n > 0, alpha, self._core)

    def _read(self, core: Any) -> None:
        self._stale = True

    def _sync(self) -> None:
        self._mean, self._sq_mean, _ = _ewvar_unpack(self._core.__getstate__(), self._core_alpha)
        self._stale = False

    @property
    def mean(self) -> float:
        """EW mean of x, as river holds it."""
        if self._stale:
            self._sync()
        return self._mean

    @property
    def sq_mean(self) -> float:
        """EW mean of x**2, as river holds it."""
        if self._stale:
            self._sync()
        return self._sq_mean

    def var(self) -> float:
        """river's EWVar.get(): E[x^2] - E[x]^2 (the same floating-point operations)."""
        return self.sq_mean - self.mean * self.mean if self.n else 0.0

    def std(self) -> float:
        # E[x^2] - E[x]^2 can come out a hair below zero in floating point.
        return math.sqrt(max(self.var(), 0.0))

    def to_dict(self) -> dict[str, Any]:
        if not self.n:
            return {"mean": 0.0, "sq_mean": 0.0, "n": 0}
        return {"mean": self.mean, "sq_mean": self.sq_mean, "n": self.n}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], alpha: float) -> "EWVarBaseline":
        return cls(alpha, d["mean"], d["sq_mean"], d["n"])


class RecentOrders:
    """Times (epoch ms) of the learned orders of the last 24 hours, at most ``cap`` of them.

    With the cap reached the oldest are dropped, so a count over 24 hours
    saturates at ``cap``; the cap is far above any burst threshold.
    """

    __slots__ = ("times", "cap")

    def __init__(self, times: Iterable[int] = (), cap: int = 16) -> None:
        self.times = sorted(int(t) for t in times)
        self.cap = cap

    def count(self, at_ms: int, window_ms: int = WINDOW_24H_MS, exclude: int | None = None) -> int:
        """Learned orders in (at_ms - window, at_ms]; ``exclude`` drops one order at that time."""
        # At most ``cap`` (16) times: a compiled pass over them costs less than two calls of the bisect module
        # from compiled code; it counts what bisect_right(at_ms) - bisect_right(at_ms - window) counts.
        since = at_ms - window_ms
        n = 0
        for t in self.times:
            if since < t <= at_ms:
                n += 1
        if exclude is not None and exclude in self.times and at_ms - window_ms < exclude <= at_ms:
            n -= 1
        return n

    def add(self, at_ms: int, newest_ms: int) -> None:
        times = self.times
        bisect.insort(times, int(at_ms))
        # Sorted: the times after newest - 24 h are a suffix (found by binary search, not a pass over each).
        self.times = times[bisect.bisect_right(times, newest_ms - WINDOW_24H_MS):][-self.cap:]

    def to_dict(self) -> list[int]:
        return list(self.times)


def day_of(ms: int) -> int:
    """UTC calendar day number (days since 1970-01-01)."""
    return ms // MS_PER_DAY


class OrderingDay(NamedTuple):
    """One family's ordering day at an order: how many dosage units the buyer takes that UTC day.

    How lines are grouped into orders is the buyer's paperwork (ARCOS schedule III-V rows have no order form,
    so each is its own order; one schedule II form carries several lines); the day's units are its demand.
    """

    #: Units of the family learned on the order's UTC day plus the order's own.
    units: int
    #: Median units of the family's other ordering days in the 30 days before (0.0 when there are none).
    usual_units: float
    #: How many such days the median is taken over.
    days: int


class DailyRing:
    """Orders, dosage units, mg of base drug and high-strength units per UTC day for the last 30 days: at most
    30 cells."""

    __slots__ = ("cells",)

    def __init__(self, cells: Mapping[str, Sequence[Any]] | None = None) -> None:
        # Stored as parallel arrays (som.state.DayCells): arrays of numbers
        # encode several times faster than an array of small records. ``mg`` and ``high`` are
        # absent (or empty) in states written before they existed: 0 those days.
        cells = cells or {"day": (), "orders": (), "units": ()}
        n = len(cells["day"])
        mg: list[float] = list(cells.get("mg") or ())
        mg += [0.0] * (n - len(mg))
        high = list(cells.get("high") or ())
        high += [0] * (n - len(high))
        # Each day (orders, units, mg, high-strength units): an immutable tuple of numbers, replaced when an order
        # is learned, so that the collector stops tracking it (a list stays tracked: ~30 per family, kept for a
        # batch, and every full collection walked them).
        self.cells: dict[int, tuple[int, int, float, int]] = {
            int(d): (int(o), int(u), float(m), int(h))
            for d, o, u, m, h in zip(cells["day"], cells["orders"], cells["units"], mg, high)}

    def totals(self, at_ms: int, days: int, exclude_units: int | None = None) -> tuple[int, int]:
        """(orders, units) learned on the ``days`` UTC days ending with the day of ``at_ms``."""
        today = day_of(at_ms)
        orders = units = 0
        for day, (o, u, _, _) in self.cells.items():
            if today - days < day <= today:
                orders += o
                units += u
        if exclude_units is not None and today in self.cells:
            orders -= 1
            units -= exclude_units
        return max(orders, 0), max(units, 0)

    def windows(self, at_ms: int, exclude_units: int | None = None, exclude_mg: float | None = None,
                exclude_high: int | None = None) -> tuple[int, int, float, int, int, int, int]:
        """(orders over 7 days, units, mg of base drug, high-strength units and orders over 30 days, ordering
        days in the 7 days and in the 23 days before them) learned on the UTC days ending with the day of ``at_ms``, in one pass over
        the cells (the 30-day mg, high-strength units and orders are the strength window).

        Ordering days (days with a learned order of the family) beside orders: in ARCOS a schedule III-V line
        has no order form number, so one ordering day of a buyer is often several one-line orders, and a burst
        of extra ordering days hides among them when only orders are counted (``FrequencyDetector``).

        ``exclude_units`` / ``exclude_mg`` / ``exclude_high``: a redelivered order's own contribution, taken out
        when its day has a cell. The mg are added cell by cell in the cells' order, as ``sum()`` adds them (the
        learned state's floats depend on it).
        """
        today = day_of(at_ms)
        week, month = today - WINDOW_7D_DAYS, today - WINDOW_30D_DAYS
        orders = units = high = orders_30d = days_7d = days_before = 0
        mg_sum = 0.0
        in_window = False
        for day, cell in self.cells.items():
            if month < day <= today:
                # Typed reads of the cell (orders, units, mg, high are int, int, float, int): compiled, the sums
                # below are C arithmetic, not calls on Python objects.
                o: int = cell[0]
                u: int = cell[1]
                g: float = cell[2]
                h: int = cell[3]
                units += u
                mg_sum += g
                in_window = True
                high += h
                orders_30d += o
                if day > week:
                    orders += o
                    if o > 0:
                        days_7d += 1
                elif o > 0:
                    days_before += 1
        # As sum() adds: an int 0 with no cell (max(0, 0.0) below keeps the int), else 0.0 + each float in turn
        # (0 + g == 0.0 + g exactly).
        mg: Any = mg_sum if in_window else 0
        if today in self.cells:
            if exclude_units is not None:
                orders -= 1
                units -= exclude_units
            if exclude_mg is not None:
                mg -= exclude_mg
                orders_30d -= 1
            if exclude_high is not None:
                high -= exclude_high
        return (max(orders, 0), max(units, 0), max(mg, 0.0), max(high, 0), max(orders_30d, 0), days_7d,
                days_before)

    def ordering_day(self, at_ms: int, units: int, exclude_self: bool = False) -> "OrderingDay":
        """The order's UTC day against the other ordering days of the last 30 (see :class:`OrderingDay`).

        ``exclude_self``: the order was already learned (redelivery), so its own units are in its day's cell once.
        Read only for an order the per-order size test flagged, so its cost is off the common path.
        """
        today = day_of(at_ms)
        learned_today = self.cells[today][1] if today in self.cells else 0
        if exclude_self and today in self.cells:
            learned_today -= units
        prior = [u for d, (o, u, _, _) in self.cells.items() if today - WINDOW_30D_DAYS < d < today and o > 0]
        # the median: robust to one big restock day among a few
        return OrderingDay(max(learned_today, 0) + units, float(statistics.median(prior)) if prior else 0.0,
                           len(prior))

    def add(self, at_ms: int, units: int, newest_ms: int, mg: float = 0.0, high: int = 0) -> None:
        cells = self.cells
        day = day_of(at_ms)
        cell = cells.get(day)
        if cell is None:
            cells[day] = (1, int(units), 0.0 + float(mg), int(high))
        else:
            o, u, g, h = cell
            cells[day] = (o + 1, u + int(units), g + float(mg), h + int(high))
        oldest = day_of(newest_ms) - WINDOW_30D_DAYS
        if _any_at_or_before(cells, oldest):
            # The days that left the window are deleted, not the ring copied without them (one or two a day
            # against ~30 copied); the others keep their order, which the 30-day mg sum follows.
            for d in [d for d in cells if d <= oldest]:
                del cells[d]

    def to_dict(self) -> dict[str, list[Any]]:
        days = sorted(self.cells)
        return {"day": days, "orders": [self.cells[d][0] for d in days], "units": [self.cells[d][1] for d in days],
                "mg": [round(self.cells[d][2], 3) for d in days], "high": [self.cells[d][3] for d in days]}


def _any_at_or_before(cells: dict[int, Any], oldest: int) -> bool:
    """``min(cells) <= oldest`` for a ring's non-empty cells, as a compiled loop over int keys (not a call of the
    builtin ``min`` on a dict)."""
    for k in cells:
        if k <= oldest:
            return True
    return False


class _LastMonth:
    """The last UTC day :func:`month_of` converted, with its month: every family of an order asks for the same
    day (~14 times per scored order, ~13 per learned one). One (day, month) pair, replaced whole, so a reader
    never sees the day of one call with the month of another."""

    __slots__ = ("pair",)

    def __init__(self) -> None:
        self.pair: tuple[int, int] = (0, _month_of_day(0))


def month_of(ms: int) -> int:
    """UTC calendar month index: year * 12 + (month - 1)."""
    day = ms // MS_PER_DAY
    last = _LAST_MONTH.pair
    if last[0] == day:
        return last[1]
    month = _month_of_day(day)
    _LAST_MONTH.pair = (day, month)
    return month


def _month_of_day(day: int) -> int:
    """:func:`month_of` per UTC day, by integer arithmetic on the proleptic Gregorian calendar (the civil-from-days
    algorithm: 400-year eras of 146,097 days, years starting in March), the same month ``datetime`` gives.

    Read ~25 times per order: compiled, a few integer operations cost less than a cached ``datetime`` call.
    """
    z = day + 719_468  # days since 0000-03-01
    era = z // 146_097
    doe = z - era * 146_097  # day of the era, 0..146096
    yoe = (doe - doe // 1_460 + doe // 36_524 - doe // 146_096) // 365  # year of the era, 0..399
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)  # day of the year starting 1 March, 0..365
    mp = (5 * doy + 2) // 153  # month starting from March, 0..11
    year = yoe + era * 400 + (1 if mp >= 10 else 0)  # January and February belong to the next civil year
    month0 = mp + 2 if mp < 10 else mp - 10  # 0-based civil month
    return year * 12 + month0


_LAST_MONTH: Final = _LastMonth()


@functools.lru_cache(maxsize=256)
def month_name(index: int) -> str:
    """``2026-03`` for a month index."""
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


class MonthRing:
    """Learned dosage units per UTC calendar month: at most :data:`MONTHS_KEPT` cells.

    Kept relative to the newest learned month (that month and the 12 before it),
    so the trailing 12 full months are known while the registrant orders in the
    month after. Months without learned orders have no cell.
    """

    __slots__ = ("cells", "mg", "high", "_trailing", "_strength")

    def __init__(self, cells: Mapping[str, Iterable[Any]] | None = None) -> None:
        cells = cells or {"month": (), "units": ()}
        months = [int(m) for m in cells["month"]]
        self.cells: dict[int, int] = {m: int(u) for m, u in zip(months, cells["units"])}
        # mg of base drug and high-strength units per month (strength_shift's long memory); absent in states
        # written before they existed: no strength those months.
        self.mg: dict[int, float] = {m: float(x) for m, x in zip(months, cells.get("mg") or ())}
        self.high: dict[int, int] = {m: int(x) for m, x in zip(months, cells.get("high") or ())}
        # (month, the full months before it as Monthly.prior): read by ~8 detectors per family and order, and
        # unchanged by learning orders of that month or later, so it survives most learned orders.
        self._trailing: tuple[int, tuple[int, ...]] | None = None
        self._strength: tuple[int, int, StrengthMonths] | None = None  # (month, gap, reference) as _trailing

    def units(self, month: int) -> int:
        return self.cells.get(month, 0)

    def add(self, at_ms: int, units: int, newest_ms: int, mg: float = 0.0, high: int = 0) -> None:
        m = month_of(at_ms)
        self.cells[m] = self.cells.get(m, 0) + int(units)
        if mg > 0:
            self.mg[m] = self.mg.get(m, 0.0) + float(mg)
        if high > 0:
            self.high[m] = self.high.get(m, 0) + int(high)
        if self._trailing is not None and m < self._trailing[0]:
            self._trailing = None  # a late order of an earlier month: the trailing months changed
        if self._strength is not None and m < self._strength[0]:
            self._strength = None
        oldest = month_of(newest_ms) - MONTHS_KEPT
        if len(self.cells) > MONTHS_KEPT or _any_at_or_before(self.cells, oldest):
            self.cells = {k: v for k, v in self.cells.items() if k > oldest}
            self.mg = {k: v for k, v in self.mg.items() if k > oldest}
            self.high = {k: v for k, v in self.high.items() if k > oldest}
            self._trailing = self._strength = None

    def strength_months(self, at_ms: int, gap: int) -> "StrengthMonths":
        """The long-memory strength reference: the full months before ``at_ms``'s month but the last ``gap``.

        Leaving the last ``gap`` months out keeps the released first weeks of a shift out of the usual it is
        judged against; calendar months, not an EW mean, so a shift's released orders cannot drag the usual
        up order by order. Only months with a strength (mg) count.
        """
        cur = month_of(at_ms)
        cached = self._strength
        if cached is None or cached[0] != cur or cached[1] != gap:
            cached = self._strength = (cur, gap, self._strength_months(cur, gap))
        return cached[2]

    def _strength_months(self, cur: int, gap: int) -> "StrengthMonths":
        units = high = n = 0
        mg = 0.0
        for k, m in self.mg.items():
            if k < cur - gap and m > 0:
                u = self.cells.get(k, 0)
                if u <= 0:
                    continue
                h = self.high.get(k, 0)
                units += u
                mg += m
                high += h
                n += 1
        return StrengthMonths(n, units, mg, high)

    def monthly(self, at_ms: int, units: int, replay: bool) -> "Monthly":
        """The calendar months up to ``at_ms``'s month with an order of ``units`` added (not when a ``replay``)."""
        cur = month_of(at_ms)
        cells = self.cells
        current = cells.get(cur, 0) + (0 if replay else units)
        cached = self._trailing
        if cached is None or cached[0] != cur:
            known = [k for k in cells if k < cur]
            start = max(cur - 12, min(known)) if known else cur
            cached = self._trailing = (cur, tuple(cells.get(k, 0) for k in range(start, cur)))
        return Monthly(cur, current, cached[1])

    def to_dict(self) -> dict[str, list[Any]]:
        months = sorted(self.cells)
        return {"month": months, "units": [self.cells[m] for m in months],
                "mg": [round(self.mg.get(m, 0.0), 3) for m in months], "high": [self.high.get(m, 0) for m in months]}


class StrengthMonths:
    """strength_shift's long memory of one family: the reference months' totals (see ``MonthRing.strength_months``).

    Never changed once built (cached per month); a plain class for the reason :class:`FamilyFacts` is.
    """

    __slots__ = ("months", "units", "mg", "high", "mg_per_unit", "high_share")

    def __init__(self, months: int, units: int, mg: float, high: int) -> None:
        self.months = months  # reference months with a strength
        self.units = units
        self.mg = mg
        self.high = high  # dosage units in high-strength products
        #: mg / units and high / units (0 without units): fields, not properties, since strength_shift reads them
        #: for every family of every order and they change only with the months (``MonthRing.strength_months``).
        self.mg_per_unit = mg / units if units > 0 else 0.0
        self.high_share = high / units if units > 0 else 0.0


# --------------------------------------------------------------------------
# Orders as the baselines see them
# --------------------------------------------------------------------------

def to_ms(value: datetime | int) -> int:
    """Epoch milliseconds of an Avro timestamp-millis value (aware datetime or int).

    A naive datetime is refused: guessing its zone could shift an order across
    a 24-hour window boundary.
    """
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime: order times must be timezone-aware (UTC)")
        return (value - _EPOCH) // _ONE_MS
    return int(value)


def order_key(order_id: str) -> int:
    """31-bit CRC of an order id: enough to recognise a redelivered order among the last few."""
    return zlib.crc32(order_id.encode("utf-8")) & 0x7FFFFFFF


class FamilyFacts:
    """One drug family's share of an order (all its lines summed); never changed once built.

    A plain class (with ``__slots__``), not a named tuple or a frozen dataclass: built ~7 times per order and
    read ~100 times. Compiled, its ``__init__`` and attribute reads are native; a named tuple was built through
    ``tuple.__new__``, a generic call (~1,500 instructions each), a frozen dataclass through an interpreted
    ``__init__``.
    """

    __slots__ = ("family", "units", "mme", "base_weight_g", "schedules", "high_units")

    def __init__(self, family: str, units: int, mme: float, base_weight_g: float, schedules: tuple[str, ...],
                 high_units: int = 0) -> None:
        self.family = family
        self.units = units
        self.mme = mme
        self.base_weight_g = base_weight_g
        self.schedules = schedules
        #: Units in the family's high-strength products (``order_facts``' ``high_ndcs``).
        self.high_units = high_units


class OrderFacts:
    """What the monitor reads from a verified order; never changed once built (the per-order caches of
    :class:`RegistrantBaselines` hold it by identity).

    Time is the distributor's ``received_at``, not the purchaser's
    ``signed_at``: the purchaser chooses the signing date (an order stays valid
    60 days), the distributor's clock cannot be back-dated to dodge a window.

    A plain class, not a frozen dataclass: compiled, the dataclass's generated ``__init__`` ran interpreted,
    one ``object.__setattr__`` per field (~9,000 instructions an order).
    """

    __slots__ = ("order_id", "purchaser_dea", "at_ms", "families", "family_list", "business_activity", "region")

    def __init__(self, order_id: str, purchaser_dea: str, at_ms: int, families: dict[str, FamilyFacts] | None = None,
                 business_activity: str | None = None, region: str | None = None) -> None:
        self.order_id = order_id
        self.purchaser_dea = purchaser_dea
        self.at_ms = at_ms
        self.families: dict[str, FamilyFacts] = families if families is not None else {}
        #: ``families.values()`` in that order, as a list: ~15 detectors iterate over them per order, and
        #: compiled, a pass over a list costs a tenth of a pass over a dict's values.
        self.family_list: list[FamilyFacts] = list(self.families.values())
        self.business_activity = business_activity  # the purchaser's, for its peer group
        self.region = region  # the purchaser's state when the order carries it (``purchaser_state``)

    @property
    def total_units(self) -> int:
        return sum(f.units for f in self.families.values())


#: :func:`_family_name`'s memo (raw name -> key), emptied when full: a plain dict, cheaper per line than lru_cache.
_FAMILY_NAMES: Final[dict[Any, str]] = {}


def _family_name(raw: Any) -> str:
    """A line's drug family as the baselines key it: the same few names on every line, normalised once."""
    name = _FAMILY_NAMES.get(raw)
    if name is None:
        name = str(raw).strip().upper() or "UNKNOWN"
        if len(_FAMILY_NAMES) >= 1024:  # bounded, whatever names a feed carries
            _FAMILY_NAMES.clear()
        _FAMILY_NAMES[raw] = name
    return name


def _sorted_tuple(xs: list[str]) -> tuple[str, ...]:
    """``tuple(sorted(xs))``; a family's lines nearly always share one schedule, which needs no sort."""
    return tuple(xs) if len(xs) < 2 else tuple(sorted(xs))


def _stored_units_30d(days: Sequence[Any], units: Sequence[Any], today: int) -> int:
    """Units of a family's stored day cells (``som.state.DayCells``) on the 30 UTC days ending with ``today``.

    A compiled loop (the builtin ``sum`` over a generator cost a generator object and a generic call per
    family not on the order, for every order); the cells pair up as ``zip`` pairs them.
    """
    total = 0
    for i in range(min(len(days), len(units))):
        day = _as_int(days[i])
        if today - WINDOW_30D_DAYS < day <= today:
            total += _as_int(units[i])
    return total


class _FamilySum:
    """One family's running sums over an order's lines (:func:`order_facts`): typed fields, so compiled, the
    sums are C arithmetic instead of operations on the boxed numbers of a list."""

    __slots__ = ("units", "mme", "weight_g", "schedules", "high")

    def __init__(self) -> None:
        self.units = 0
        self.mme = 0.0
        self.weight_g = 0.0
        self.schedules: list[str] = []
        self.high = 0


def _as_int(value: Any) -> int:
    """``int(value)``; an int as it is (compiled, ``int()`` of an untyped value is a generic call)."""
    return value if type(value) is int else int(value)


def _as_float(value: Any) -> float:
    """``float(value or 0.0)``: a line's optional number (None or absent: 0.0); a non-zero float as it is."""
    if type(value) is float and value != 0.0:
        return value
    return float(value or 0.0)


def order_facts(order: Mapping[str, Any], high_ndcs: frozenset[str] | set[str] = frozenset()) -> OrderFacts:
    """Aggregate a verified order (``csos.orders.VerifiedOrder`` dict) by drug family.

    ``high_ndcs``: the NDCs of high-strength products (``streams.monitoring.strength``); their lines' units
    are counted in ``FamilyFacts.high_units``.
    """
    acc: dict[str, _FamilySum] = {}
    for raw in order["lines"]:
        # A decoded line is a dict: read as one, compiled code looks its fields up directly instead of
        # calling a generic Mapping's methods (another mapping is copied into one first, same values).
        line: dict[str, Any] = raw if type(raw) is dict else dict(raw)
        fam = _family_name(line["drug_family"])
        a = acc.get(fam)
        if a is None:
            a = acc[fam] = _FamilySum()
        units = _as_int(line["dosage_units"])
        a.units += units
        a.mme += _as_float(line.get("mme"))
        a.weight_g += _as_float(line.get("base_weight_g"))
        sched = line.get("schedule", "")
        schedule = sched if type(sched) is str else str(sched)
        if schedule not in a.schedules:  # the family's distinct schedules (a list: nearly always one)
            a.schedules.append(schedule)
        if high_ndcs and line.get("ndc") in high_ndcs:
            a.high += units
    families: dict[str, FamilyFacts] = {}
    for fam in sorted(acc):  # the names, not (name, sums) pairs: a sort of strings (the names are unique)
        a = acc[fam]
        families[fam] = FamilyFacts(fam, a.units, a.mme, a.weight_g, _sorted_tuple(a.schedules), a.high)
    act = order.get("business_activity")
    region = order.get("purchaser_state")
    return OrderFacts(str(order["order_id"]), str(order["purchaser_dea"]), to_ms(order["received_at"]), families,
                      str(act).strip().upper() if act else None, str(region).strip().upper() if region else None)


# --------------------------------------------------------------------------
# Per family and per registrant
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class BaselineSettings:
    """How fast baselines forget and how much they keep (from ``MonitorConfig``)."""

    ew_alpha: float = 0.1  # weight of the newest order: ~19-order memory
    mix_alpha: float = 0.05  # ~39-order memory for the family mix
    recent_max: int = 16  # order times kept from the last 24 hours, per family
    family_ttl_days: int = 400  # a family not ordered for this long is forgotten (then "new" again)


class Windows:
    """Activity of one family in the windows ending at an order, that order included (never changed once built:
    shared by every detector through the per-order cache). A plain class for the reason :class:`FamilyFacts` is."""

    __slots__ = ("orders_24h", "orders_7d", "units_30d", "learned_mg_30d", "learned_high_30d", "learned_orders_30d",
                 "days_7d", "learned_days_before_7d")

    def __init__(self, orders_24h: int, orders_7d: int, units_30d: int, learned_mg_30d: float = 0.0,
                 learned_high_30d: int = 0, learned_orders_30d: int = 0, days_7d: int = 1,
                 learned_days_before_7d: int = 0) -> None:
        self.orders_24h = orders_24h
        self.orders_7d = orders_7d
        self.units_30d = units_30d
        #: mg of base drug *learned* over the 30 days (the order's own not included; taken out again on a replay).
        self.learned_mg_30d = learned_mg_30d
        #: high-strength units and orders *learned* over the 30 days (the order's own not included, as the mg).
        self.learned_high_30d = learned_high_30d
        self.learned_orders_30d = learned_orders_30d
        #: UTC days of the last 7 with an order of the family, this order's day included.
        self.days_7d = days_7d
        #: UTC days with a learned order of the family among the 23 before those 7 (the 30-day window without the
        #: last 7): the usual ordering days, which a burst inside the 7 days cannot raise.
        self.learned_days_before_7d = learned_days_before_7d


class Monthly:
    """One family's dosage units per UTC calendar month, as the static rules read them.

    ``current``: units learned in the order's calendar month plus the order's own.
    ``prior``: units of each trailing full month the history covers, oldest first,
    at most 12, zeros for covered months without orders. Coverage starts at the
    earliest month with learned orders still kept (so a registrant whose history
    began 4 months ago is averaged over 4 months, not diluted over 12).
    Never changed once built: shared by every detector through the per-order cache (a plain class for the
    reason :class:`FamilyFacts` is).
    """

    __slots__ = ("month", "current", "prior")

    def __init__(self, month: int, current: int, prior: tuple[int, ...]) -> None:
        self.month = month
        self.current = current
        self.prior = prior

    def trailing(self, months: int) -> tuple[int, ...]:
        return trailing_months(self.prior, months)


def trailing_months(prior: tuple[int, ...], months: int) -> tuple[int, ...]:
    """:meth:`Monthly.trailing` as a plain function."""
    return prior[-months:] if months < len(prior) else prior


def months_with_orders(units: tuple[int, ...]) -> int:
    """How many of these months had orders: read by several rules per family and order. A compiled loop over
    at most 13 months, which costs less than hashing the tuple for a cache."""
    n = 0
    for u in units:
        if u > 0:
            n += 1
    return n


def _clip_count(count: int, baseline: EWMeanBaseline) -> float:
    """A window count as learned: at most one order above the usual count.

    Without the clip, the first orders of a burst that are still released
    would each teach a higher "usual" count and drag the threshold up with the
    burst (2, 3, 4 ... orders in 24 hours). A genuine change of cadence is
    still learned, one order per sample.
    """
    return min(count, baseline.get() + 1.0) if baseline.n else count


#: A learned 30-day strength is at most this multiple of the usual one (see :func:`_clip_strength`).
STRENGTH_CLIP: Final = 1.2


def _clip_strength(value: float, baseline: EWMeanBaseline) -> float:
    """A 30-day mg per unit as learned: at most ``STRENGTH_CLIP`` x the usual one.

    The orders of a shift to stronger products that are still released would
    otherwise teach a stronger "usual" mix order by order, and a frequent buyer
    would drag the threshold along before the window is fully shifted. A
    genuine change of mix is still learned, 20 % per sample at most.
    """
    return min(value, STRENGTH_CLIP * baseline.get()) if baseline.n else value


class FamilyBaseline:
    """Everything known about one registrant's orders of one drug family."""

    def __init__(self, s: BaselineSettings, d: Mapping[str, Any] | None = None) -> None:
        """A family with no history, or the one stored as ``d`` (:meth:`to_dict`'s shape)."""
        a = s.ew_alpha
        self.settings = s
        if d is None:
            self.orders = 0
            self.first_order_ms = 0
            self.last_order_ms = 0
            self.log_units = EWVarBaseline(a)
            self.units = EWMeanBaseline(a)
            self.gap_days = EWMeanBaseline(a)
            self.count_24h = EWMeanBaseline(a)
            self.count_7d = EWMeanBaseline(a)
            self.units_30d = EWMeanBaseline(a)
            self.mg_per_unit = EWMeanBaseline(a)
            self.mg_per_unit_30d = EWMeanBaseline(a)
            self.recent = RecentOrders(cap=s.recent_max)
            self.days = DailyRing()
            self.months = MonthRing()
            return
        self.orders = int(d["orders"])
        self.first_order_ms = int(d["first_order_ms"])
        self.last_order_ms = int(d["last_order_ms"])
        self.log_units = EWVarBaseline.from_dict(d["log_units"], a)
        self.units = EWMeanBaseline.from_dict(d["units"], a)
        self.gap_days = EWMeanBaseline.from_dict(d["gap_days"], a)
        self.count_24h = EWMeanBaseline.from_dict(d["count_24h"], a)
        self.count_7d = EWMeanBaseline.from_dict(d["count_7d"], a)
        self.units_30d = EWMeanBaseline.from_dict(d["units_30d"], a)
        self.mg_per_unit = EWMeanBaseline.from_dict(d.get("mg_per_unit") or {"mean": 0.0, "n": 0}, a)
        self.mg_per_unit_30d = EWMeanBaseline.from_dict(d.get("mg_per_unit_30d") or {"mean": 0.0, "n": 0}, a)
        self.recent = RecentOrders(d["recent_ms"], cap=s.recent_max)
        self.days = DailyRing(d["days"])
        self.months = MonthRing(d.get("months"))

    def windows(self, at_ms: int, units: int, exclude_self: bool = False, mg: float = 0.0,
                high: int = 0) -> Windows:
        """Counts over 24 h / 7 days / 30 days ending at ``at_ms``, including an order of ``units``.

        ``exclude_self``: the order was already learned (redelivery), so its own earlier contribution
        (``units``, ``mg`` mg of base drug, ``high`` high-strength units) is taken out before it is added back once.
        """
        c24 = self.recent.count(at_ms, exclude=at_ms if exclude_self else None)
        if exclude_self:
            c7, u30, mg30, high30, orders30, d7, d_before = self.days.windows(at_ms, units, mg, high)
        else:  # a plain call, not *args: mypyc calls the native method directly
            c7, u30, mg30, high30, orders30, d7, d_before = self.days.windows(at_ms)
        # The order makes its day an ordering day; a day that already has a learned order (or this very
        # order, redelivered) is counted once.
        today_learned = day_of(at_ms) in self.days.cells
        return Windows(c24 + 1, c7 + 1, u30 + units, mg30, high30, orders30, d7 + (not today_learned), d_before)

    def covers(self, at_ms: int, days: float) -> bool:
        """Whether this family's learned history reaches back ``days`` before ``at_ms``."""
        return self.orders > 0 and at_ms - self.first_order_ms >= days * MS_PER_DAY

    def learn(self, at_ms: int, units: int, base_mg: float = 0.0, windows: Windows | None = None,
              high: int = 0) -> None:
        """Fold one released order of ``units`` dosage units (``base_mg`` mg of base drug, ``high`` units in
        high-strength products) in.

        ``windows``: this order's :meth:`windows` if the caller has them already (scoring computed them).
        """
        w = windows or self.windows(at_ms, units)
        # covers(at_ms, days) for 1, 7 and 30 days, from one subtraction (learned ~7 times per order).
        span = at_ms - self.first_order_ms if self.orders > 0 else -1
        if span >= MS_PER_DAY:
            self.count_24h.update(_clip_count(w.orders_24h, self.count_24h))
        if span >= WINDOW_7D_DAYS * MS_PER_DAY:
            self.count_7d.update(_clip_count(w.orders_7d, self.count_7d))
        if span >= WINDOW_30D_DAYS * MS_PER_DAY:
            self.units_30d.update(w.units_30d)
        u = max(units, 1)
        self.log_units.update(math.log(u))
        self.units.update(u)
        if base_mg > 0 and units > 0:  # lines without a strength (no product master entry) teach nothing
            self.mg_per_unit.update(base_mg / units)
            if span >= WINDOW_30D_DAYS * MS_PER_DAY and w.units_30d > 0:  # covers(at_ms, 30 days)
                self.mg_per_unit_30d.update(_clip_strength((w.learned_mg_30d + base_mg) / w.units_30d,
                                                           self.mg_per_unit_30d))
        if self.orders and at_ms >= self.last_order_ms:
            self.gap_days.update((at_ms - self.last_order_ms) / MS_PER_DAY)
        if not self.orders or at_ms < self.first_order_ms:
            self.first_order_ms = at_ms
        self.orders += 1
        self.last_order_ms = max(self.last_order_ms, at_ms)
        self.recent.add(at_ms, self.last_order_ms)
        self.days.add(at_ms, units, self.last_order_ms, base_mg, high)
        self.months.add(at_ms, units, self.last_order_ms, base_mg, high)

    def to_dict(self) -> dict[str, Any]:
        return {
            "orders": self.orders,
            "first_order_ms": self.first_order_ms,
            "last_order_ms": self.last_order_ms,
            "log_units": self.log_units.to_dict(),
            "units": self.units.to_dict(),
            "gap_days": self.gap_days.to_dict(),
            "count_24h": self.count_24h.to_dict(),
            "count_7d": self.count_7d.to_dict(),
            "units_30d": self.units_30d.to_dict(),
            "mg_per_unit": self.mg_per_unit.to_dict(),
            "mg_per_unit_30d": self.mg_per_unit_30d.to_dict(),
            "recent_ms": self.recent.to_dict(),
            "days": self.days.to_dict(),
            "months": self.months.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], s: BaselineSettings) -> "FamilyBaseline":
        return cls(s, d)


class TimingProfile:
    """When a registrant orders: learned orders per UTC hour of day and per weekday (Monday = 0).

    Counts, not EW means, so an analyst reads "3 of its 140 orders came at
    night"; halved (rounding down) when the total reaches ``TIMING_CAP``, so
    the state stays 31 small integers and a changed routine takes over.
    UTC because that is what the distributor's clock records; a registrant's
    routine is stable in UTC apart from daylight saving time (one hour), which
    the detector's +/- 2-hour window absorbs.
    """

    __slots__ = ("hours", "weekdays")

    def __init__(self, hours: Iterable[int] = (), weekdays: Iterable[int] = ()) -> None:
        self.hours = [int(x) for x in hours] or [0] * 24
        self.weekdays = [int(x) for x in weekdays] or [0] * 7

    @property
    def n(self) -> int:
        return sum(self.hours)

    def learn(self, at_ms: int) -> None:
        t = _EPOCH + timedelta(milliseconds=at_ms)
        self.hours[t.hour] += 1
        self.weekdays[t.weekday()] += 1
        if self.n >= TIMING_CAP:
            self.hours = [x // 2 for x in self.hours]
            self.weekdays = [x // 2 for x in self.weekdays]

    def to_dict(self) -> dict[str, list[int]]:
        if not self.n:
            return {"hours": [], "weekdays": []}
        return {"hours": list(self.hours), "weekdays": list(self.weekdays)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Iterable[int]] | None) -> "TimingProfile":
        d = d or {}
        return cls(d.get("hours", ()), d.get("weekdays", ()))


class FamilyMix:
    """The registrant's usual share of dosage units per family.

    Per family, an EW mean of the units of that family in each order (0 when
    the order has none), so shares are weighted by units, as the 30-day share
    they are compared with. A family first seen after the registrant's first
    order starts as a mean of 0 over the orders seen so far.
    """

    def __init__(self, alpha: float, means: dict[str, EWMeanBaseline] | None = None) -> None:
        self.alpha = alpha
        self.means = means if means is not None else {}
        self._shares: dict[str, float] | None = None  # read on every order, changed only by learn/drop
        #: (:meth:`_orders` it was written for, -1 past the warm-up, when it no longer changes; the text).
        self._window: tuple[int, str] | None = None
        self._warm = round(1.0 / alpha)  # orders until the shares are EW means (before: plain means)

    def learn(self, units_by_family: Mapping[str, int]) -> None:
        self._shares = None
        seen = max((m.n for m in self.means.values()), default=0)
        for fam in units_by_family:
            if fam not in self.means:
                # None of it in the ``seen`` earlier orders: a mean of 0 over them.
                self.means[fam] = EWMeanBaseline(self.alpha, 0.0, seen)
        for fam, m in self.means.items():
            m.update(units_by_family.get(fam, 0))

    def shares(self) -> dict[str, float]:
        if self._shares is None:
            self._shares = self._compute_shares()
        return dict(self._shares)

    def _compute_shares(self) -> dict[str, float]:
        total = sum(m.get() for m in self.means.values())
        if total <= 0:
            return {fam: 0.0 for fam in self.means}
        return {fam: m.get() / total for fam, m in self.means.items()}

    def window(self) -> str:
        """What the shares cover, for family_mix's window: written again only while the warm-up changes it
        (every learned order changes the shares, not the text once the means are EW means)."""
        n = self._orders()
        key = n if n < self._warm else -1
        cached = self._window
        if cached is None or cached[0] != key:
            cached = self._window = (key, self._describe(n))
        return cached[1]

    def _orders(self) -> int:
        """The most orders any family's mean has seen (``max`` over the means, 0 without any, as a compiled loop)."""
        n = 0
        for m in self.means.values():
            if m.n > n:
                n = m.n
        return n

    def _describe(self, n: int) -> str:
        if n < self._warm:
            return f"share of dosage units over {n} released orders"
        return f"EW share of dosage units over ~{ew_memory(self.alpha)} released orders"

    def drop(self, families: Iterable[str]) -> None:
        self._shares = None
        for fam in families:
            self.means.pop(fam, None)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {fam: m.to_dict() for fam, m in sorted(self.means.items())}

    @classmethod
    def from_dict(cls, d: Mapping[str, Mapping[str, Any]], alpha: float) -> "FamilyMix":
        return cls(alpha, {fam: EWMeanBaseline.from_dict(v, alpha) for fam, v in d.items()})


def new_state(purchaser_dea: str) -> dict[str, Any]:
    """The state of a registrant with no learned orders."""
    return {
        "version": STATE_VERSION,
        "purchaser_dea": purchaser_dea,
        "total_orders": 0,
        "first_order_ms": 0,
        "last_order_ms": 0,
        "learned_ids": [],
        "mix": {},
        "families": {},
        "timing": {"hours": [], "weekdays": []},
        "outcomes": {},
        "due_diligence": new_due_diligence(),
    }


def new_due_diligence() -> dict[str, Any]:
    """An empty ``som.state.DueDiligence`` (also what older states read as); here, with the state it is part
    of, so that ``open_cases`` (which fills it) imports this module and never the other way round."""
    return {"first_seen_ms": 0, "onboarded_ms": 0, "onboarded_by": "", "open": {}, "reported": {}, "limits": {},
            "terminated": None, "applied": [], "cleared": {}}


def _copy_due_diligence(dd: Mapping[str, Any]) -> dict[str, Any]:
    """A private copy of a stored ``due_diligence`` sub-record (the stored state is never mutated)."""
    return {**dd, "open": {f: dict(c, pending=list(c["pending"])) for f, c in dd["open"].items()},
            "reported": dict(dd["reported"]), "limits": dict(dd["limits"]), "applied": list(dd["applied"]),
            "cleared": dict(dd.get("cleared") or {})}  # absent in states written before issue 11's cleared level


def migrate_state(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """Bring a stored state to :data:`STATE_VERSION`, or refuse loudly.

    v1 -> v2: families gain ``months`` (units per calendar month), empty: the
    monthly history starts with the next learned order (Avro's reader default
    already fills it when a v1 record is decoded with the current schema).
    v2 -> v3: the registrant gains ``timing`` (orders per hour and weekday),
    empty: the timing history starts with the next learned order.
    v3 -> v4: families gain ``mg_per_unit`` (usual strength), empty: the
    strength-shift detector applies once enough orders are learned again.
    Each later layout adds a step here, so a changelog written by an older
    worker is still usable after a deploy.
    """
    version = state.get("version")
    if version == STATE_VERSION:
        return state
    if version == 1:
        families = {fam: dict(fb, months=fb.get("months") or {"month": [], "units": []})
                    for fam, fb in state["families"].items()}
        state, version = dict(state, version=2, families=families), 2
    if version == 2:
        state, version = dict(state, version=3, timing=state.get("timing") or {"hours": [], "weekdays": []}), 3
    if version == 3:
        families = {fam: dict(fb, mg_per_unit=fb.get("mg_per_unit") or {"mean": 0.0, "n": 0})
                    for fam, fb in state["families"].items()}
        return dict(state, version=4, families=families)
    raise StateVersionError(f"SOM state version {version!r} is not supported (expected {STATE_VERSION})")


class RegistrantBaselines:
    """All baselines of one registrant, parsed lazily from the stored dict.

    Families are only turned into river objects when an order touches them, so
    scoring an order of one family does not pay for the other twenty.
    """

    def __init__(self, state: Mapping[str, Any], s: BaselineSettings) -> None:
        state = migrate_state(state)
        self.settings = s
        self.purchaser_dea: str = state["purchaser_dea"]
        self.total_orders: int = int(state["total_orders"])
        self.first_order_ms: int = int(state["first_order_ms"])
        self.last_order_ms: int = int(state["last_order_ms"])
        self.learned_ids: list[int] = [int(x) for x in state["learned_ids"]]
        self._raw_mix: Mapping[str, Any] = state["mix"]
        self._mix: FamilyMix | None = None
        self._raw_families: dict[str, Mapping[str, Any]] = dict(state["families"])
        self.timing = TimingProfile.from_dict(state.get("timing"))
        # Order id -> the monitor's outcome (``csos.state.OrderOutcome``), kept and pruned by the agent.
        self.outcomes: dict[str, dict[str, Any]] = dict(state.get("outcomes") or {})
        # Open cases, reports, analyst limits, termination, new-customer period (``open_cases``), mutable in place.
        dd = state.get("due_diligence")
        self.due_diligence: dict[str, Any] = _copy_due_diligence(dd) if dd else new_due_diligence()
        self._families: dict[str, FamilyBaseline] = {}
        # Per-order caches (every detector reads the same windows and months of a family): valid for one
        # OrderFacts object, held here so that it cannot be freed and its id reused; ``learn`` drops them.
        self._cached_for: OrderFacts | None = None
        self._replay = False
        self._windows: dict[str, Windows] = {}
        self._monthly: dict[str, Monthly] = {}
        self._units_30d_all: dict[str, int] | None = None

    @classmethod
    def new(cls, purchaser_dea: str, s: BaselineSettings) -> "RegistrantBaselines":
        return cls(new_state(purchaser_dea), s)

    # -- reading -----------------------------------------------------------
    @property
    def mix(self) -> FamilyMix:
        if self._mix is None:
            self._mix = FamilyMix.from_dict(self._raw_mix, self.settings.mix_alpha)
        return self._mix

    def family_names(self) -> list[str]:
        return sorted(self._raw_families)

    def family(self, name: str) -> FamilyBaseline | None:
        """The baseline of a family, or None if the registrant never ordered it (or forgot it)."""
        fb = self._families.get(name)
        if fb is None:
            raw = self._raw_families.get(name)
            if raw is None:
                return None
            fb = self._families[name] = FamilyBaseline.from_dict(raw, self.settings)
        return fb

    def has_learned(self, order_id: str) -> bool:
        """Whether this order was already learned (a redelivery after the state was saved)."""
        known = self.outcomes.get(order_id)
        return bool(known and known.get("learned")) or order_key(order_id) in self.learned_ids

    def _for_order(self, order: OrderFacts) -> None:
        """Start the per-order caches for ``order`` (whether it is a replay is looked up once, not per read)."""
        if self._cached_for is not order:
            self._cached_for = order
            self._replay = self.has_learned(order.order_id)
            self._windows = {}
            self._monthly = {}
            self._units_30d_all = None

    def windows(self, family: str, order: OrderFacts) -> Windows:
        """Activity of ``family`` in the windows ending at ``order``, the order included."""
        if self._cached_for is not order:  # ~40 reads per order: the call is skipped on the hits
            self._for_order(order)
        w = self._windows.get(family)
        if w is None:
            f = order.families.get(family)
            units, mg, high = (f.units, f.base_weight_g * 1000.0, f.high_units) if f is not None else (0, 0.0, 0)
            fb = self.family(family)
            w = fb.windows(order.at_ms, units, self._replay, mg, high) if fb else Windows(1, 1, units)
            self._windows[family] = w
        return w

    def monthly(self, family: str, order: OrderFacts) -> Monthly:
        """Units of ``family`` per calendar month up to ``order``'s month, the order included."""
        if self._cached_for is not order:
            self._for_order(order)
        m = self._monthly.get(family)
        if m is None:
            f = order.families.get(family)
            units = f.units if f is not None else 0
            fb = self.family(family)
            m = self._monthly[family] = (fb.months.monthly(order.at_ms, units, self._replay) if fb
                                         else Monthly(month_of(order.at_ms), 0 if self._replay else units, ()))
        return m

    def ordering_day(self, family: str, order: OrderFacts) -> OrderingDay:
        """The units of ``family`` on ``order``'s UTC day, the order included, against its usual ordering day."""
        if self._cached_for is not order:
            self._for_order(order)
        f = order.families.get(family)
        units = f.units if f is not None else 0
        fb = self.family(family)
        return fb.days.ordering_day(order.at_ms, units, self._replay) if fb else OrderingDay(units, 0.0, 0)

    def strength_30d(self, family: str, order: OrderFacts) -> tuple[float, int, int, int]:
        """(mg of base drug, dosage units, high-strength units, orders) of ``family`` over the 30 UTC days ending
        at ``order``, the order included.

        The strength window: a multi-strength buyer that restocks one product at a
        time swings one order's mg per unit, not its month's.
        """
        w = self.windows(family, order)  # its learned 30-day figures are 0 when nothing of the family is learned
        f = order.families.get(family)
        if f is None:
            return w.learned_mg_30d + 0.0, w.units_30d, w.learned_high_30d, w.learned_orders_30d + 1
        return (w.learned_mg_30d + f.base_weight_g * 1000.0, w.units_30d, w.learned_high_30d + f.high_units,
                w.learned_orders_30d + 1)

    def units_30d_all(self, order: OrderFacts) -> dict[str, int]:
        """Units per family over the 30 UTC days ending at ``order``, the order included (a copy: callers own it)."""
        self._for_order(order)
        if self._units_30d_all is None:
            self._units_30d_all = self._units_30d_by_family(order)
        return dict(self._units_30d_all)

    def _units_30d_by_family(self, order: OrderFacts) -> dict[str, int]:
        out = {}
        for fam in set(self._raw_families) | set(order.families):
            if fam in order.families:
                out[fam] = self.windows(fam, order).units_30d
            elif fam in self._families:
                out[fam] = self._families[fam].days.totals(order.at_ms, WINDOW_30D_DAYS)[1]
            else:  # not touched by this order: read the stored cells without building the baseline
                cells = self._raw_families[fam]["days"]
                out[fam] = _stored_units_30d(cells["day"], cells["units"], day_of(order.at_ms))
        return out

    # -- learning ----------------------------------------------------------
    def learn(self, order: OrderFacts) -> None:
        """Fold a released order into every baseline. A redelivered order is learned once."""
        key = order_key(order.order_id)
        if self.has_learned(order.order_id):
            return
        for fam, facts in order.families.items():
            fb = self.family(fam)
            if fb is None:
                fb = self._families[fam] = FamilyBaseline(self.settings)
                self._raw_families[fam] = {}
            # The windows scoring computed for this very order (not a replay) are the ones learning needs.
            scored = self._windows.get(fam) if self._cached_for is order and not self._replay else None
            fb.learn(order.at_ms, facts.units, facts.base_weight_g * 1000.0, scored, facts.high_units)
        self.mix.learn({f: x.units for f, x in order.families.items()})
        self.timing.learn(order.at_ms)
        if not self.total_orders or order.at_ms < self.first_order_ms:
            self.first_order_ms = order.at_ms
        self.total_orders += 1
        self.last_order_ms = max(self.last_order_ms, order.at_ms)
        self.learned_ids = (self.learned_ids + [key])[-LEARNED_IDS_KEPT:]
        self._cached_for = None
        self._forget_stale()

    def _forget_stale(self) -> None:
        """Drop families not ordered for ``family_ttl_days``: keeps state bounded."""
        limit = self.last_order_ms - self.settings.family_ttl_days * MS_PER_DAY
        stale = [f for f, raw in self._raw_families.items()
                 if (self._families[f].last_order_ms if f in self._families else raw["last_order_ms"]) < limit]
        for fam in stale:
            self._raw_families.pop(fam, None)
            self._families.pop(fam, None)
        if stale:
            self.mix.drop(stale)

    def to_state(self) -> dict[str, Any]:
        """The plain dict stored in the Faust table (schema ``som.state.RegistrantState``)."""
        families = {}
        for fam in sorted(self._raw_families):
            fb = self._families.get(fam)
            families[fam] = fb.to_dict() if fb is not None else dict(self._raw_families[fam])
        return {
            "version": STATE_VERSION,
            "purchaser_dea": self.purchaser_dea,
            "total_orders": self.total_orders,
            "first_order_ms": self.first_order_ms,
            "last_order_ms": self.last_order_ms,
            "learned_ids": list(self.learned_ids),
            "mix": self.mix.to_dict() if self._mix is not None else {k: dict(v) for k, v in self._raw_mix.items()},
            "families": families,
            "timing": self.timing.to_dict(),
            "outcomes": self.outcomes,
            "due_diligence": self.due_diligence,
        }
