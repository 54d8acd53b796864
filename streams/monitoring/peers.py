"""Peer profiles: what registrants of the same business activity (and region) order, per drug family.

Why reference data and not table state: the monitor's Faust table is
partitioned by purchaser DEA number, so one worker never sees the other
registrants of a peer group. Peer profiles are therefore *built offline* from
history (orders that shipped: released by the monitor, or ARCOS shipments) and
loaded by every worker at start (``SOM_PEER_PROFILES``, an Avro file of
``som.peers.PeerProfiles``). They serve two purposes (21 CFR 1301.74(b)
"unusual size ... deviating substantially from a normal pattern"):

* **cold start**: a new registrant, or an established one's first orders of a
  family, is judged against what its peers order instead of a fixed ceiling;
* **peer deviation**: an established registrant whose 30-day units of a family
  are far above its peers' monthly units stands out even if its own baseline
  grew with it.

The estimator is river-style (``learn_one``) and composable: a profile is a set
of :class:`LogHistogram` per group, which merge by adding counts, so profiles
built from several sources (or several months) combine exactly. A histogram of
ln(units) in fixed bins gives robust quantiles (median, p90, p99) without
keeping the raw values; the bin width (0.1 in ln, ~10.5 %) bounds their error.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from streams.monitoring.baselines import month_of, order_facts

#: Bin width on the ln(units) scale: a quantile is exact to within ~10.5 %.
BIN_WIDTH = 0.1
#: "All regions" (a group keyed by business activity and family only).
ANY_REGION = "*"
PROFILE_SCHEMA = "som.peers.PeerProfiles"
PROFILE_VERSION = 1


class LogHistogram:
    """Counts of ln(x) in fixed bins: mergeable, serialisable, robust quantiles.

    ``learn_one(x)`` adds one value (x >= 1; smaller values count as 1).
    ``quantile(q)`` returns the geometric middle of the bin holding the q-th
    value, so it is within half a bin (~5 %) of the exact sample quantile.
    """

    __slots__ = ("bins", "n", "_quantiles")

    def __init__(self, bins: Mapping[int, int] | None = None) -> None:
        self.bins: dict[int, int] = dict(bins or {})
        self.n = sum(self.bins.values())
        # Peer profiles are read-only reference data: the monitor asks the same few quantiles on every order.
        self._quantiles: dict[float, float] = {}

    def learn_one(self, x: float) -> None:
        b = int(math.floor(math.log(max(float(x), 1.0)) / BIN_WIDTH))
        self.bins[b] = self.bins.get(b, 0) + 1
        self.n += 1
        self._quantiles.clear()

    def merge(self, other: "LogHistogram") -> "LogHistogram":
        for b, c in other.bins.items():
            self.bins[b] = self.bins.get(b, 0) + c
        self.n += other.n
        self._quantiles.clear()
        return self

    def quantile(self, q: float) -> float:
        value = self._quantiles.get(q)
        if value is None:
            value = self._quantiles[q] = self._quantile(q)
        return value

    def _quantile(self, q: float) -> float:
        if not self.n:
            return 0.0
        rank = q * (self.n - 1)
        seen = 0
        for b in sorted(self.bins):
            seen += self.bins[b]
            if seen > rank:
                return math.exp((b + 0.5) * BIN_WIDTH)
        return math.exp((max(self.bins) + 0.5) * BIN_WIDTH)

    def to_dict(self) -> dict[str, list[int]]:
        keys = sorted(self.bins)
        return {"bin": keys, "count": [self.bins[k] for k in keys]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Iterable[int]]) -> "LogHistogram":
        return cls({int(b): int(c) for b, c in zip(d["bin"], d["count"])})


@dataclass
class PeerGroup:
    """One peer group: registrants of a business activity (and region) ordering one family."""

    business_activity: str
    region: str
    drug_family: str
    registrants: int = 0
    order_units: LogHistogram = field(default_factory=LogHistogram)  # dosage units per order
    monthly_units: LogHistogram = field(default_factory=LogHistogram)  # per registrant, per full month

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.business_activity, self.region, self.drug_family)

    def describe(self) -> str:
        """Who the peers are, for an explanation: 'RETAIL PHARMACY in OH (41 registrants)'."""
        where = "" if self.region == ANY_REGION else f" in {self.region}"
        return f"{self.business_activity}{where} ({self.registrants} registrants)"


@dataclass
class PeerProfiles:
    """Peer groups by (business activity, region, family), and where they came from."""

    groups: dict[tuple[str, str, str], PeerGroup]
    built_at: datetime
    source: str
    min_registrants: int = 5
    #: :meth:`lookup`'s answers (not part of the profiles: not compared, not stored).
    _found: dict[tuple[Any, Any, str], Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def lookup(self, business_activity: str | None, region: str | None, family: str) -> PeerGroup | None:
        """The registrant's peer group for a family: its region's if big enough, else all regions.

        A group smaller than ``min_registrants`` is not a peer baseline (a
        handful of registrants would make one of them the "norm"). Remembered per
        (activity, region, family) as given: several detectors look up every
        family of every order, and the profiles are read-only reference data.
        """
        key = (business_activity, region, family)
        found = self._found.get(key, self)  # self: not looked up yet (None is a valid answer)
        if found is self:
            found = self._found[key] = self._lookup(business_activity, region, family)
        return found

    def _lookup(self, business_activity: str | None, region: str | None, family: str) -> PeerGroup | None:
        if not business_activity:
            return None
        act = business_activity.strip().upper()
        for reg in ((region.strip().upper(), ANY_REGION) if region else (ANY_REGION,)):
            g = self.groups.get((act, reg, family))
            if g is not None and g.registrants >= self.min_registrants:
                return g
        return None

    def digest(self) -> str:
        """Short hash of the content, for ``model_version``: a verdict names the peer data it used."""
        h = hashlib.sha256()
        for k in sorted(self.groups):
            g = self.groups[k]
            h.update(repr((k, g.registrants, sorted(g.order_units.bins.items()),
                           sorted(g.monthly_units.bins.items()))).encode())
        return "peers-" + h.hexdigest()[:8]

    # -- Avro ------------------------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        return {
            "version": PROFILE_VERSION, "built_at": self.built_at, "source": self.source,
            "bin_width": BIN_WIDTH, "min_registrants": self.min_registrants,
            "groups": [{"business_activity": g.business_activity, "region": g.region, "drug_family": g.drug_family,
                        "registrants": g.registrants, "order_units": g.order_units.to_dict(),
                        "monthly_units": g.monthly_units.to_dict()}
                       for _, g in sorted(self.groups.items())],
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "PeerProfiles":
        if abs(float(rec["bin_width"]) - BIN_WIDTH) > 1e-12:
            raise ValueError(f"peer profiles use bin width {rec['bin_width']}, this build reads {BIN_WIDTH}")
        groups = {}
        for g in rec["groups"]:
            pg = PeerGroup(g["business_activity"], g["region"], g["drug_family"], int(g["registrants"]),
                           LogHistogram.from_dict(g["order_units"]), LogHistogram.from_dict(g["monthly_units"]))
            groups[pg.key] = pg
        return cls(groups, rec["built_at"], rec["source"], int(rec["min_registrants"]))

    def save(self, path: str | Path) -> None:
        from streams.core.avro_codec import default_codec
        Path(path).write_bytes(default_codec().encode(PROFILE_SCHEMA, self.to_record()))

    @classmethod
    def load(cls, path: str | Path) -> "PeerProfiles":
        from streams.core.avro_codec import default_codec
        return cls.from_record(default_codec().decode(Path(path).read_bytes(), expect=PROFILE_SCHEMA)[1])


def order_region(order: Mapping[str, Any]) -> str | None:
    """The purchaser's state when the order carries it (``purchaser_state``), else None (all regions)."""
    r = order.get("purchaser_state")
    return str(r).strip().upper() or None if r else None


class PeerProfileBuilder:
    """Learns peer profiles from shipped orders, one at a time (``learn_one``), then ``build()``.

    Feed it only orders that shipped (released, or cleared after a hold):
    a held order must not become part of what "normal peers" order.
    Monthly units are per registrant and family per UTC calendar month; each
    registrant-family's first and last month are left out (partly covered),
    and months without orders are not counted (the group describes months in
    which the family is ordered).
    """

    def __init__(self, min_registrants: int = 5) -> None:
        self.min_registrants = min_registrants
        self._groups: dict[tuple[str, str, str], PeerGroup] = {}
        self._members: dict[tuple[str, str, str], set[str]] = {}
        self._months: dict[tuple[str, str], dict[int, int]] = {}  # (dea, family) -> month -> units
        self._who: dict[str, tuple[str, str | None]] = {}  # dea -> (activity, region)
        self._last: datetime | None = None

    def learn_one(self, order: Mapping[str, Any], business_activity: str | None = None,
                  region: str | None = None) -> None:
        act = (business_activity or order.get("business_activity") or "").strip().upper()
        if not act:
            return  # no activity: belongs to no peer group
        reg = region or order_region(order)
        facts = order_facts(order)
        dea = facts.purchaser_dea
        self._who[dea] = (act, reg.upper() if reg else None)
        month = month_of(facts.at_ms)
        for fam, f in facts.families.items():
            for key in self._keys(act, reg, fam):
                g = self._groups.get(key)
                if g is None:
                    g = self._groups[key] = PeerGroup(*key)
                    self._members[key] = set()
                g.order_units.learn_one(f.units)
                self._members[key].add(dea)
            cells = self._months.setdefault((dea, fam), {})
            cells[month] = cells.get(month, 0) + f.units
        at = order["received_at"]
        self._last = at if self._last is None or at > self._last else self._last

    @staticmethod
    def _keys(act: str, region: str | None, fam: str) -> list[tuple[str, str, str]]:
        keys = [(act, ANY_REGION, fam)]
        if region:
            keys.append((act, region.strip().upper(), fam))
        return keys

    def build(self, source: str) -> PeerProfiles:
        """The profiles learned so far (the builder can keep learning afterwards)."""
        groups = {}
        for key, g in self._groups.items():
            out = PeerGroup(*key, registrants=len(self._members[key]),
                            order_units=LogHistogram(g.order_units.bins))
            groups[key] = out
        for (dea, fam), cells in self._months.items():
            act, reg = self._who[dea]
            months = sorted(cells)
            for m in months[1:-1]:
                for key in self._keys(act, reg, fam):
                    groups[key].monthly_units.learn_one(cells[m])
        built = self._last or datetime.now(timezone.utc)
        return PeerProfiles(groups, built, source, self.min_registrants)


def build_profiles(orders: Iterable[Mapping[str, Any]], source: str, min_registrants: int = 5) -> PeerProfiles:
    """Peer profiles from an iterable of shipped verified-order dicts."""
    b = PeerProfileBuilder(min_registrants)
    for o in orders:
        b.learn_one(o)
    return b.build(source)


def coverage(profiles: PeerProfiles, families: Iterable[str] = ()) -> dict[str, Any]:
    """What the profiles cannot judge: there the monitor falls back to its fixed cold-start ceilings.

    ``families``: the drug families that matter (the product master's).
    Returns ``covered_families``; ``uncovered_families`` (in ``families`` with no
    usable group for any business activity); ``thin_groups`` (business
    activity x family groups, all regions, seen but with fewer than
    ``min_registrants`` registrants: ``(activity, family, registrants)``);
    ``activities`` seen.
    """
    usable = {k for k, g in profiles.groups.items() if g.registrants >= profiles.min_registrants}
    covered = sorted({fam for (_, _, fam) in usable})
    thin = sorted((act, fam, g.registrants) for (act, reg, fam), g in profiles.groups.items()
                  if reg == ANY_REGION and (act, reg, fam) not in usable)
    return {"covered_families": covered,
            "uncovered_families": sorted({f.strip().upper() for f in families} - set(covered)),
            "thin_groups": thin, "activities": sorted({act for (act, _, _) in profiles.groups}),
            "min_registrants": profiles.min_registrants}


def describe_coverage(cov: Mapping[str, Any]) -> str:
    """The coverage report as text for the CLI."""
    lines = [f"covered drug families: {', '.join(cov['covered_families']) or 'none'}"]
    if cov["uncovered_families"]:
        lines.append(f"not covered (no group of >= {cov['min_registrants']} registrants; fixed ceilings apply): "
                     + ", ".join(cov["uncovered_families"]))
    if cov["thin_groups"]:
        lines.append(f"groups too small to be a peer baseline (< {cov['min_registrants']} registrants):")
        lines += [f"  {act} / {fam}: {n} registrant(s)" for act, fam, n in cov["thin_groups"]]
    return "\n".join(lines)


__all__ = ["coverage", "describe_coverage", "LogHistogram", "PeerGroup", "PeerProfiles", "PeerProfileBuilder", "build_profiles", "order_region",
           "ANY_REGION", "BIN_WIDTH", "PROFILE_SCHEMA"]
