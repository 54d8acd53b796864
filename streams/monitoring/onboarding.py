"""The new-customer period: a new registrant is judged against its peers' months, not its own history.

Why: a new pill mill orders under the cold-start ceilings, its released
orders become its own baseline, and from then on the learned detectors judge
it by what it has been doing since it arrived. For its first
``new_customer_months`` months (``SOM_NEW_CUSTOMER_MONTHS``, 3 by default;
from the first order the monitor scored), or until an analyst records the
onboarding review (decision ONBOARDED, audited), each family's units in the
calendar month, this order included, are held above a ceiling that does not
come from the registrant:

* with peer profiles (``SOM_PEER_PROFILES``) and a peer group with at least
  ``peer_min_months`` registrant-months: ``new_customer_peer_ratio`` x the
  peers' ``new_customer_peer_quantile`` month;
* otherwise the ceiling of its business activity (``new_customer_activity_units``, chosen on the
  tuning scenarios), else the fixed ``new_customer_max_monthly_units``.

Once an analyst RELEASED a held order of the family (due-diligence ``cleared``), the ceiling is at
least ``ramp_2x_cleared_ratio`` x the cleared month's units: a legitimate new store is held once.

Its own learned thresholds still apply; holding when either fires is the
same as capping them with the ceiling. After the period its own history
counts, as for every registrant.
"""
from __future__ import annotations

from streams.monitoring.baselines import (
    MS_PER_DAY, FamilyFacts, OrderFacts, RegistrantBaselines, month_name, month_of,
)
from streams.monitoring.detectors import (
    MonitorConfig, PerFamilyDetector, Finding, Window, _MAX, cleared_level, fmt_n, peer_group, finding,
    window_text,
)
from streams.monitoring.peers import PeerProfiles

#: Length of a month in the period's arithmetic (the mean Gregorian month).
MONTH_MS = int(30.436875 * MS_PER_DAY)


def period_start_ms(base: RegistrantBaselines, order: OrderFacts) -> int:
    """When the registrant's relationship began: first scored order, else first learned one, else this order."""
    return base.due_diligence["first_seen_ms"] or base.first_order_ms or order.at_ms


def in_new_customer_period(base: RegistrantBaselines, order: OrderFacts, months: int) -> bool:
    """Whether ``order`` falls in the registrant's new-customer period (not onboarded, within ``months``)."""
    if months <= 0 or base.due_diligence["onboarded_ms"]:
        return False
    return order.at_ms - period_start_ms(base, order) < months * MONTH_MS


def activity_ceilings(items: tuple[str, ...]) -> dict[str, float]:
    """``("RETAIL PHARMACY=8000", ...)`` as ``{"RETAIL PHARMACY": 8000.0}``; a malformed item is refused.

    Refused loudly: a ceiling silently dropped would leave that kind of new customer under the default.
    """
    out: dict[str, float] = {}
    for item in items:
        name, sep, units = item.rpartition("=")
        try:
            value = float(units)
        except ValueError:
            value = -1.0
        if not sep or not name.strip() or value < 0:
            raise ValueError(f"SOM_NEW_CUSTOMER_ACTIVITY_UNITS: {item!r} is not ACTIVITY=units")
        out[name.strip().upper()] = value
    return out


class _Period:
    """What the new-customer rules read once per order, not once per family: the same for every family.

    A plain class (compiled: a native ``__init__``), not a named tuple, whose ``__new__`` is a Python function.
    """

    __slots__ = ("days", "month", "business_activity", "ceiling", "windows")

    def __init__(self, days: float, month: int, business_activity: str, ceiling: float,
                 windows: tuple[Window, Window]) -> None:
        self.days = days  # since the relationship began
        self.month = month  # the order's calendar month
        self.business_activity = business_activity  # upper case, stripped ("" when unknown)
        self.ceiling = ceiling  # this detector's ceiling for the business activity (no peers)
        self.windows = windows  # the findings' window with peers, without (deferred: detectors.Window)


class NewCustomerDetector(PerFamilyDetector):
    """Size/volume of a new customer: the calendar month's units of a family against a peer (or fixed) ceiling."""

    name = "new_customer"
    dimension = "size"

    def __init__(self, cfg: MonitorConfig, peers: PeerProfiles | None = None) -> None:
        self.cfg = cfg
        self.peers = peers
        #: Business activity (upper case) -> monthly units of one family (no peers): new_customer_activity_units.
        self.ceilings = activity_ceilings(cfg.new_customer_activity_units)
        self.default_ceiling = float(cfg.new_customer_max_monthly_units)

    def score_one(self, state: RegistrantBaselines, order: OrderFacts) -> list[Finding]:
        # Outside the period nothing is recorded: an established registrant pays nothing for this rule.
        if not in_new_customer_period(state, order, self.cfg.new_customer_months):
            return []
        p = self._period(state, order)
        return [self._judge(state, order, f, p) for f in order.family_list]

    def _period(self, state: RegistrantBaselines, order: OrderFacts) -> _Period:
        days = (order.at_ms - period_start_ms(state, order)) / MS_PER_DAY
        act = (order.business_activity or "").strip().upper()
        month = month_of(order.at_ms)
        return _Period(days, month, act, float(self.ceilings.get(act, self.default_ceiling)),
                       self._windows(month, days))

    @staticmethod
    def _windows(month: int, days: float) -> tuple[Window, Window]:
        # Deferred (detectors.Window): written only for the findings a verdict keeps (formatting the day and
        # month for both windows of every order of a new customer was most of this detector's cost).
        return (_month_window, month, days, "peers"), (_month_window, month, days, "fixed ceiling")

    def _one(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts) -> Finding:
        return self._judge(state, order, f, self._period(state, order))

    def _judge(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts, p: _Period) -> Finding:
        c = self.cfg
        current = state.monthly(f.family, order).current
        peer = peer_group(self.peers, order, f.family)
        if peer is not None and peer.monthly_units.n >= c.peer_min_months:
            level = peer.monthly_units.quantile(c.new_customer_peer_quantile)
            threshold = c.new_customer_peer_ratio * level
            window = p.windows[0]
        else:
            peer = None
            level = threshold = p.ceiling
            window = p.windows[1]
        if threshold <= 0:
            return finding(self.name, self.dimension, f.family, current, 0.0, _MAX, "not applicable", False, "")
        cleared = None
        if current > threshold:
            cleared = cleared_level(state, f.family, p.month, c.ramp_2x_cleared_months)
            if cleared is not None and c.ramp_2x_cleared_ratio * cleared[1] > threshold:
                threshold = c.ramp_2x_cleared_ratio * cleared[1]
                window = window_text(window) + "; cleared by an analyst"
            else:
                cleared = None
        if not current > threshold:  # the verdict keeps no sentence for a finding that did not fire
            return finding(self.name, self.dimension, f.family, current, level, threshold, window, False, "")
        if peer is not None:
            source = (f"{c.new_customer_peer_ratio:g}x the {100 * c.new_customer_peer_quantile:g}th percentile "
                      f"month of its peers, {peer.describe()} ({fmt_n(level)})")
        else:
            source = f"the new-customer ceiling of a {(order.business_activity or '').lower() or 'registrant'}"
        if cleared is not None:
            source += (f", raised to {c.ramp_2x_cleared_ratio:g}x the {fmt_n(cleared[1])} units an analyst "
                       f"cleared in {month_name(cleared[0])}")
        text = (f"{f.family} in {month_name(p.month)}: {fmt_n(current)} dosage units with this order, by a new "
                f"customer (first order {p.days:.0f} days ago, no onboarding review yet); its own history is not a "
                f"baseline yet, so the ceiling is {source}: {fmt_n(threshold)}; exceeded.")
        return finding(self.name, self.dimension, f.family, current, level, threshold, window, True, text)


class NewCustomerOrderDetector(NewCustomerDetector):
    """Size of one order of a new customer: a family's units in the order against a per-order ceiling.

    Why besides the monthly ceiling: a new pill mill orders several times a
    pharmacy's habit from its first order, yet a month of such orders can stay
    under a monthly ceiling set for the largest established stores. The
    ceiling is its peers' order size (``new_customer_order_peer_ratio`` x their
    ``new_customer_order_peer_quantile`` order) or, without peers, its business
    activity's (``new_customer_order_units``). A legitimate opening stock is
    held once: after an analyst RELEASED a held order of the family it no
    longer applies to that family.
    """

    name = "new_customer_order"

    def __init__(self, cfg: MonitorConfig, peers: PeerProfiles | None = None) -> None:
        self.cfg = cfg
        self.peers = peers
        #: Business activity (upper case) -> units of one family in one order (no peers): new_customer_order_units.
        self.ceilings = activity_ceilings(cfg.new_customer_order_units)
        self.default_ceiling = 0.0

    @staticmethod
    def _windows(month: int, days: float) -> tuple[Window, Window]:
        window = (_order_window, days)  # deferred, as NewCustomerDetector's
        return window, window

    def _judge(self, state: RegistrantBaselines, order: OrderFacts, f: FamilyFacts, p: _Period) -> Finding:
        c = self.cfg
        peer = peer_group(self.peers, order, f.family)
        if peer is not None and peer.order_units.n >= c.peer_min_orders:
            level = peer.order_units.quantile(c.new_customer_order_peer_quantile)
            threshold = c.new_customer_order_peer_ratio * level
        else:
            peer = None
            level = threshold = p.ceiling
        if threshold <= 0 or cleared_level(state, f.family, p.month, c.ramp_2x_cleared_months) is not None:
            why = "no ceiling for this business activity" if threshold <= 0 else "cleared by an analyst"
            return finding(self.name, self.dimension, f.family, f.units, level, _MAX, f"not applicable: {why}",
                           False, "")
        if not f.units > threshold:  # the verdict keeps no sentence for a finding that did not fire
            return finding(self.name, self.dimension, f.family, f.units, level, threshold, p.windows[0], False, "")
        if peer is not None:
            source = (f"{c.new_customer_order_peer_ratio:g}x the {100 * c.new_customer_order_peer_quantile:g}th "
                      f"percentile order of its peers, {peer.describe()} ({fmt_n(level)})")
        else:
            source = f"the new-customer order ceiling of a {(order.business_activity or '').lower() or 'registrant'}"
        text = (f"{f.family}: {fmt_n(f.units)} dosage units in one order of a new customer (first order "
                f"{p.days:.0f} days ago, no onboarding review yet); the ceiling for one order is {source}: "
                f"{fmt_n(threshold)}; exceeded.")
        return finding(self.name, self.dimension, f.family, f.units, level, threshold, p.windows[0], True, text)


def _month_window(month: int, days: float, against: str) -> str:
    """:class:`NewCustomerDetector`'s window (``against``: "peers" or "fixed ceiling")."""
    return f"calendar month {month_name(month)}; new customer (day {days:.0f}); {against}"


def _order_window(days: float) -> str:
    """:class:`NewCustomerOrderDetector`'s window."""
    return f"this order; new customer (day {days:.0f})"


__all__ = ["NewCustomerDetector", "NewCustomerOrderDetector", "activity_ceilings", "in_new_customer_period", "period_start_ms", "MONTH_MS"]
