"""Evaluation harness: the learned monitor against the static reference rules, offline.

The same :class:`streams.monitoring.Monitor` the stream agent runs is replayed
over a stream of verified-order dicts, once per *policy*. A policy is the set of
detectors whose firing decides HOLD:

* ``learned``: the default monitor (``MonitorConfig()`` as it ships);
* one policy per detector name found in the verdict reasons (every detector is
  always recorded with ``fired``), so the static rules (``static_2x_12m``,
  ``static_3x_12m``, ``static_6m_max``, ``static_8000_du``,
  ``static_customer_limit``) appear as soon as the monitor carries them; plus
  ``static_any`` (any static rule) when there are static rules;
* ``learned+<detector>`` for each learned detector that is recorded but does not
  decide by default (``peer_volume``, ``timing``, ``anomaly``): what enforcing it
  as well would do.

As in production, a policy's monitor **learns only from the orders that policy
releases**. When ``MonitorConfig`` has ``hold_detectors`` every policy is a real
run of its own. Otherwise (older monitor) a single-detector policy is *derived*
from that detector's ``fired`` flags in the learned run, whose baselines learned
from the learned policy's releases; the result says which mode was used.

Entry points (the ``csos evaluate`` CLI wires them):

* :func:`evaluate` (stream, labels, out_dir) -> dict: metrics per policy, and the
  files ``metrics.csv``, ``metrics.md``, ``report.html`` (inline SVG charts),
  ``kinds.csv`` (per episode kind), ``episodes.csv``;
* :func:`run_scenarios` (out_dir, seed) -> dict: generate the labeled scenarios
  (:mod:`streams.tools.scenarios`) and evaluate them;
* :func:`run_arcos` (path, out_dir) -> dict: replay an ARCOS file
  (:mod:`connectors.sources.arcos_replay`); no labels, so hold rates per policy and the
  orders held by both the learned policy and a static rule.
"""
from __future__ import annotations

import csv
import dataclasses
import html
import math
import statistics
import time
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from streams.monitoring import Monitor, MonitorConfig
from streams.monitoring.detectors import RECORDED_DETECTORS, STATIC_DETECTORS
from streams.monitoring.open_cases import DUE_DILIGENCE_RULES, SimulatedDueDiligence, label_index
from streams.monitoring.peers import PeerProfiles, build_profiles

LEARNED = "learned"
STATIC_PREFIX = "static_"
STATIC_ANY = "static_any"

SUSPICIOUS, NORMAL, GREY = "suspicious", "normal", "grey"
#: Verdict CSV value of an order from before go-live: learned as history, not scored.
HISTORY = "HISTORY"


# --------------------------------------------------------------------------- running policies
def supports_hold_detectors() -> bool:
    """True when ``MonitorConfig`` has the ``hold_detectors`` field (each policy can be a real run)."""
    return any(f.name == "hold_detectors" for f in dataclasses.fields(MonitorConfig))


def _sorted_stream(stream: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(stream, key=lambda o: o["received_at"])


class Reviewer(Protocol):
    """A simulated analyst plugged into :func:`run_policy` (one per policy run).

    The backtest calls :meth:`before_order` before each order is scored (in time
    order: decide the cases that are due by then, e.g. release after N days and
    ``monitor.learn_into(base, order)`` the released orders) and :meth:`held`
    after each HOLD (open or join a case; return its case id, or None to keep
    the verdict's own). :func:`run_policy` uses :class:`DueDiligenceReviewer`
    (the open-case rule's simulated analyst) when none is given.
    """

    def before_order(self, order: Mapping[str, Any], base: Any, monitor: Monitor) -> None: ...

    def held(self, order: Mapping[str, Any], verdict: Mapping[str, Any], base: Any,
             monitor: Monitor) -> str | None: ...


#: Makes the reviewer of one policy run (called with the policy name), e.g. an analyst who reads the labels.
ReviewerFactory = Callable[[str], Reviewer]
#: Called with the number of orders just scored (drives a progress bar).
Progress = Callable[[int], None]


class DueDiligenceReviewer:
    """The default :class:`Reviewer`: the simulated analyst of the open-case rule.

    It decides each held order ``review_days`` after its hold: from ``labels``
    when given (a legitimate order is released and learned, a suspicious one
    reported and the registrant limited), else it releases every case (see
    :class:`streams.monitoring.open_cases.SimulatedDueDiligence`). Without an
    analyst a registrant's first hold would hold all its later orders of the
    family for good, which measures nothing a distributor would run.
    """

    def __init__(self, labels: Any = None, review_days: float = 2.0) -> None:
        self.labels = label_index(labels) if labels is not None else None
        self.review_days = review_days
        self.analyst: SimulatedDueDiligence | None = None

    def _for(self, monitor: Monitor) -> SimulatedDueDiligence:
        if self.analyst is None:
            self.analyst = SimulatedDueDiligence(monitor, self.labels, self.review_days)
        return self.analyst

    def before_order(self, order: Mapping[str, Any], base: Any, monitor: Monitor) -> None:
        self._for(monitor).before(order, base)

    def held(self, order: Mapping[str, Any], verdict: Mapping[str, Any], base: Any, monitor: Monitor) -> str | None:
        self._for(monitor).schedule(order)
        return None


class NoReview:
    """A :class:`Reviewer` that never decides: every case stays open, as in a pipeline no analyst works.

    What a live run without due diligence does (e.g. a crash test's unfaulted
    reference): a family held once holds its later orders for good.
    """

    def before_order(self, order: Mapping[str, Any], base: Any, monitor: Monitor) -> None:
        return None

    def held(self, order: Mapping[str, Any], verdict: Mapping[str, Any], base: Any, monitor: Monitor) -> str | None:
        return None


def analyst_factory(labels: Any = None, review_days: float = 2.0) -> ReviewerFactory:
    """A fresh simulated analyst for each policy run."""
    return lambda _policy: DueDiligenceReviewer(labels, review_days)


def _case_id(verdict: Mapping[str, Any]) -> str | None:
    """The case a held verdict belongs to, when the monitor names one (``case_id``, or an ``open_case`` finding)."""
    if verdict.get("case_id"):
        return str(verdict["case_id"])
    for r in verdict.get("reasons", ()):
        if r.get("fired") and r.get("case_id"):
            return str(r["case_id"])
    return None


def _fired_by_family(reasons: Iterable[Mapping[str, Any]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for r in reasons:
        if r["fired"]:
            out[str(r.get("drug_family") or "*")].add(r["detector"])
    return dict(out)


#: Who the go-live onboarding is recorded as (``cleared_by`` of the ONBOARDED outcome).
GO_LIVE_BY = "go-live: existing customer"


def go_live_onboarding(dea: str, at: datetime) -> dict[str, Any]:
    """The ONBOARDED outcome of an existing customer at go-live: its due diligence predates the system.

    Why: a distributor that starts the monitor already knows the customers it
    has been shipping to (its onboarding due diligence was done before); only
    registrants that first order after go-live are new customers.
    """
    return {"decision_id": f"go-live:{dea}", "outcome": "ONBOARDED", "order_id": "", "drug_families": [],
            "cleared_at": at, "cleared_by": GO_LIVE_BY}


def history_row(o: Mapping[str, Any]) -> dict[str, Any]:
    """The decision row of an order from before go-live: learned as shipped, never scored."""
    return {"order_id": o["order_id"], "held": False, "fired": set(), "seen": set(), "by_family": {},
            "case_id": None, "history": True}


def run_policy(orders: Sequence[Mapping[str, Any]], monitor: Monitor, *, reviewer: Reviewer | None = None,
               progress: Progress | None = None, progress_every: int = 500,
               go_live: datetime | None = None) -> list[dict[str, Any]]:
    """Replay ``orders`` (time order) through ``monitor``; learn only from released orders.

    Returns one decision per order: ``{order_id, held, fired, seen, by_family, case_id}``:
    ``fired`` the detector names that fired (held or not), ``by_family`` the same
    per drug family (``*`` = order-wide findings), ``case_id`` the case of a held
    order (the verdict's, the reviewer's, else the order's own id: one case per
    held order, as the case agent opens them). An order the monitor cannot score
    is held (``monitor_error``), as in the agent.

    ``go_live``: orders received before it are the distributor's order history
    from before the system: every one is learned as shipped (row ``history``
    true, never scored), and a registrant with history is an existing customer,
    onboarded at go-live (:func:`go_live_onboarding`), so no new-customer period.
    """
    live: dict[str, Any] = {}
    existing: set[str] = set()
    out = []
    pending = 0
    if reviewer is None:
        reviewer = DueDiligenceReviewer()
    for o in orders:
        if progress is not None and pending >= progress_every:
            progress(pending)
            pending = 0
        pending += 1
        dea = str(o["purchaser_dea"])
        base = live.get(dea)
        if base is None:
            base = live[dea] = monitor.baselines(None, dea)
        if go_live is not None:
            if o["received_at"] < go_live:
                monitor.learn_into(base, o)
                existing.add(dea)
                out.append(history_row(o))
                continue
            if dea in existing:
                existing.discard(dea)
                monitor.apply_outcome(base, go_live_onboarding(dea, go_live))
        reviewer.before_order(o, base, monitor)
        case = None
        try:
            v = monitor.score(base, o, decided_at=o["received_at"])
            fired = {r["detector"] for r in v["reasons"] if r["fired"]}
            seen = {r["detector"] for r in v["reasons"]}
            by_family = _fired_by_family(v["reasons"])
            held = v["verdict"] == "HOLD"
        except Exception:  # noqa: BLE001 - same rule as the agent: cannot score -> hold
            v = {"verdict": "HOLD", "reasons": []}
            fired, seen, held = {"monitor_error"}, {"monitor_error"}, True
            by_family = {"*": {"monitor_error"}}
        if held:
            case = _case_id(v)
            case = reviewer.held(o, v, base, monitor) or case
            case = case or str(o["order_id"])
        else:
            monitor.learn_into(base, o)
        try:  # the monitor's own case bookkeeping, as in the agent: a HOLD opens or joins the family's case
            monitor.note_verdict(base, o, dict(v, received_at=o["received_at"]))
        except Exception:  # noqa: BLE001 - an order that could not be scored opens no case of its own
            pass
        out.append({"order_id": o["order_id"], "held": held, "fired": fired, "seen": seen,
                    "by_family": by_family, "case_id": case})
    if progress is not None and pending:
        progress(pending)
    return out


def released_orders(orders: Sequence[Mapping[str, Any]], monitor: Monitor) -> list[Mapping[str, Any]]:
    """The orders ``monitor`` releases when it runs over ``orders``: what a peer profile may learn from."""
    return [o for o, d in zip(orders, run_policy(orders, monitor)) if not d["held"]]


def released_order_ids(verdicts_csv: str | Path) -> set[str]:
    """Order ids a backtest verdict CSV (``verdicts-<policy>.csv``) released: no transaction of theirs held.

    What ``csos peers build --released-from`` learns from: peers must describe
    what shipped, not what a policy would have stopped.
    """
    released, held = set(), set()
    with open(verdicts_csv, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"order_id", "verdict"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{verdicts_csv}: not a verdict CSV (lacks {sorted(missing)})")
        for row in reader:
            (held if row["verdict"] == "HOLD" else released).add(row["order_id"])
    return released - held


def train_peers(seed: int, config: MonitorConfig | None = None, **scenario_overrides: Any) -> PeerProfiles:
    """Peer profiles learned from a *different* scenario run (seed ``seed``), as production would.

    The training population is another set of registrants; the default
    monitor (no peers) runs over it and only the orders it releases are
    learned, so the evaluation never sees its own test orders in the peers.
    """
    from streams.tools.scenarios import generate
    train = generate(seed=seed, **scenario_overrides)
    shipped = released_orders(train.orders, Monitor(config or MonitorConfig()))
    return build_profiles(shipped, f"scenarios seed {seed}: {len(shipped)} released orders")


#: The policies ``csos evaluate arcos`` runs by default: the learned monitor and the static reference rules.
DEFAULT_POLICIES = (LEARNED, "static_2x_12m", "static_3x_12m", "static_6m_max", "static_8000_du", STATIC_ANY)


def policy_detectors(name: str, config: MonitorConfig | None = None) -> tuple[str, ...]:
    """The deciding detectors of a policy name.

    ``learned`` (the default monitor), ``static_any`` (any static rule),
    ``learned+<detector>`` (the default monitor enforcing one more detector),
    ``a,b,...`` (exactly these detectors), or one detector name.
    """
    cfg = config or MonitorConfig()
    name = name.strip()
    if name == LEARNED:
        return tuple(cfg.hold_detectors)
    if name == STATIC_ANY:
        return tuple(STATIC_DETECTORS)
    if name.startswith(LEARNED + "+"):
        return tuple(cfg.hold_detectors) + tuple(d for d in name[len(LEARNED) + 1:].split("+") if d)
    return tuple(d.strip() for d in name.split(",") if d.strip())


def decide_policies(orders: Sequence[Mapping[str, Any]], policies: Sequence[str], *,
                    config: MonitorConfig | None = None, peers: PeerProfiles | None = None,
                    reviewer_factory: ReviewerFactory | None = None,
                    progress: Progress | None = None,
                    go_live: datetime | None = None) -> dict[str, list[dict[str, Any]]]:
    """Each named policy as a real run of its own (learning only from its own releases): its decisions.

    ``reviewer_factory``: a simulated analyst per run (see :class:`Reviewer`).
    ``go_live``: every policy learns the orders before it as history (see :func:`run_policy`).
    Raises ``ValueError`` for a policy naming an unknown detector.
    """
    cfg = config or MonitorConfig()
    runs = {}
    for name in policies:
        monitor = Monitor(dataclasses.replace(cfg, hold_detectors=policy_detectors(name, cfg)), peers=peers)
        runs[name] = run_policy(orders, monitor, reviewer=reviewer_factory(name) if reviewer_factory else None,
                                progress=progress, go_live=go_live)
    return runs


def run_policies(orders: Sequence[Mapping[str, Any]], config: MonitorConfig | None = None,
                 peers: PeerProfiles | None = None, labels: Any = None,
                 review_days: float = 2.0) -> tuple[dict[str, list[bool]], dict[str, Any]]:
    """Decisions (held flags aligned with ``orders``) per policy, and how they were obtained.

    ``peers``: peer profiles every policy's monitor uses (cold start, ``peer_volume``).
    """
    cfg = config or MonitorConfig()
    t0 = time.perf_counter()
    analysts = analyst_factory(labels, review_days)
    base_run = run_policy(orders, Monitor(cfg, peers=peers), reviewer=analysts(LEARNED))
    # The open-case findings follow decisions; every policy applies them, none is a policy of its own.
    detectors = sorted({d for x in base_run for d in x["seen"]} - {"replay", "monitor_error"}
                       - set(DUE_DILIGENCE_RULES))
    static = [d for d in detectors if d.startswith(STATIC_PREFIX)]
    decisions: dict[str, list[bool]] = {LEARNED: [x["held"] for x in base_run]}
    policies: dict[str, tuple[str, ...]] = {d: (d,) for d in detectors}
    if static:
        policies[STATIC_ANY] = tuple(static)
    # Learned detectors that are only recorded by default: what enforcing each one as well would do.
    for d in RECORDED_DETECTORS:
        if d in detectors:
            policies[f"{LEARNED}+{d}"] = tuple(cfg.hold_detectors) + (d,)
    real = supports_hold_detectors()
    for name, dets in policies.items():
        if real:
            run = run_policy(orders, Monitor(dataclasses.replace(cfg, hold_detectors=dets), peers=peers),
                             reviewer=analysts(name))
            decisions[name] = [x["held"] for x in run]
        else:
            decisions[name] = [bool(x["fired"] & set(dets)) for x in base_run]
    info = {
        "mode": "hold_detectors" if real else "derived",
        "mode_note": ("each policy is its own run with MonitorConfig(hold_detectors=...), learning only from "
                      "its own releases" if real else
                      "MonitorConfig has no hold_detectors yet: single-detector policies are derived from that "
                      "detector's `fired` flags in the learned run, whose baselines learned from the learned "
                      "policy's releases (an approximation of running each rule alone)"),
        "detectors": detectors, "static_detectors": static,
        "policies": {LEARNED: "default MonitorConfig", **{k: ",".join(v) for k, v in policies.items()}},
        "seconds": round(time.perf_counter() - t0, 2),
        "peers": peers.source if peers is not None else "none",
    }
    return decisions, info


# --------------------------------------------------------------------------- metrics
def _days(a: datetime, b: datetime) -> float:
    return (a - b).total_seconds() / 86400.0


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def policy_metrics(orders: Sequence[Mapping[str, Any]], labels: Sequence[Mapping[str, Any]],
                   held: Sequence[bool]) -> dict[str, Any]:
    """Metrics of one policy's decisions against labels (all aligned with ``orders``).

    * ``recall_orders``: held suspicious orders / suspicious orders;
    * ``recall_episodes``: suspicious episodes with >= 1 held order (any order of the
      episode, its early ``grey`` orders included) / suspicious episodes;
    * ``precision``: held suspicious / (held suspicious + held normal); grey orders excluded;
    * ``false_holds_per_1000``: held normal orders per 1,000 normal orders;
    * ``ttfh_median_days`` / ``ttfh_p90_days``: days from the episode start (first
      suspicious order) to its first hold, over detected episodes, clipped at 0
      (a ramp held while still grey counts as 0);
    * ``legit_held``: per legitimate episode kind (surges, new registrants): orders, held.
    """
    n = {SUSPICIOUS: 0, NORMAL: 0, GREY: 0}
    h = {SUSPICIOUS: 0, NORMAL: 0, GREY: 0}
    ep_start: dict[str, datetime] = {}
    ep_kind: dict[str, str] = {}
    ep_susp: dict[str, bool] = {}
    first_hold: dict[str, datetime] = {}
    kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for o, lab, x in zip(orders, labels, held):
        if lab["order_id"] != o["order_id"]:
            raise ValueError(f"labels are not aligned with orders at {o['order_id']}")
        c = lab["label"]
        n[c] += 1
        h[c] += bool(x)
        k = kinds[lab.get("kind") or c]
        k[0] += 1
        k[1] += bool(x)
        ep = lab.get("episode")
        if ep:
            ep_kind[ep] = lab.get("kind") or ""
            if lab.get("episode_start") is not None:
                ep_start[ep] = lab["episode_start"]
            ep_susp[ep] = ep_susp.get(ep, False) or c in (SUSPICIOUS, GREY)
            if x and c != NORMAL and ep not in first_hold:
                first_hold[ep] = o["received_at"]
    susp_eps = [e for e, s in ep_susp.items() if s]
    detected = [e for e in susp_eps if e in first_hold]
    ttfh = [max(0.0, _days(first_hold[e], ep_start[e])) for e in detected if e in ep_start]
    per_kind_eps: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    per_kind_ttfh: dict[str, list[float]] = defaultdict(list)
    for e in susp_eps:
        per_kind_eps[ep_kind[e]][0] += 1
        if e in first_hold:
            per_kind_eps[ep_kind[e]][1] += 1
            if e in ep_start:
                per_kind_ttfh[ep_kind[e]].append(max(0.0, _days(first_hold[e], ep_start[e])))
    held_total = h[SUSPICIOUS] + h[NORMAL]
    return {
        "orders": len(orders), "suspicious_orders": n[SUSPICIOUS], "normal_orders": n[NORMAL],
        "grey_orders": n[GREY], "held": sum(bool(x) for x in held),
        "held_suspicious": h[SUSPICIOUS], "held_normal": h[NORMAL], "held_grey": h[GREY],
        "recall_orders": h[SUSPICIOUS] / n[SUSPICIOUS] if n[SUSPICIOUS] else None,
        "suspicious_episodes": len(susp_eps), "detected_episodes": len(detected),
        "recall_episodes": len(detected) / len(susp_eps) if susp_eps else None,
        "precision": h[SUSPICIOUS] / held_total if held_total else None,
        "false_holds_per_1000": 1000.0 * h[NORMAL] / n[NORMAL] if n[NORMAL] else None,
        "ttfh_median_days": statistics.median(ttfh) if ttfh else None,
        "ttfh_p90_days": _pct(ttfh, 0.9),
        "per_kind": {k: {"orders": v[0], "held": v[1]} for k, v in sorted(kinds.items())},
        "per_kind_episodes": {k: {"episodes": v[0], "detected": v[1],
                                  "ttfh_median_days": statistics.median(per_kind_ttfh[k])
                                  if per_kind_ttfh[k] else None}
                              for k, v in sorted(per_kind_eps.items())},
        "first_hold": {e: first_hold[e] for e in detected},
    }


def _align(orders: list[Mapping[str, Any]], labels: Any) -> list[Mapping[str, Any]]:
    if isinstance(labels, Mapping):
        return [labels[o["order_id"]] for o in orders]
    by_id = {lab["order_id"]: lab for lab in labels}
    return [by_id[o["order_id"]] for o in orders]


# --------------------------------------------------------------------------- evaluate
def evaluate(stream: Iterable[Mapping[str, Any]], labels: Any, out_dir: str | Path, *,
             config: MonitorConfig | None = None, title: str = "Suspicious order monitoring: evaluation",
             legit_kinds: Sequence[str] = ("surge_flu", "surge_expansion", "new_registrant"),
             episodes: Sequence[Mapping[str, Any]] | None = None,
             peers: PeerProfiles | None = None, review_days: float = 2.0) -> dict[str, Any]:
    """Evaluate every policy on a labeled stream; write the report files to ``out_dir``.

    ``review_days``: the simulated analyst decides each held order this long after its hold (open-case rule).

    ``stream``: verified-order dicts (any order; replayed in ``received_at`` order).
    ``labels``: a mapping order_id -> label, or a sequence of labels with ``order_id``;
    a label is ``{order_id, label: suspicious|normal|grey, kind, episode, episode_start}``
    (see :mod:`streams.tools.scenarios`). Returns ``{"policies": {name: metrics}, "info": ...,
    "files": {...}}``.
    """
    orders = _sorted_stream(stream)
    labs = _align(orders, labels)
    decisions, info = run_policies(orders, config, peers, labs, review_days)
    metrics = {name: policy_metrics(orders, labs, held) for name, held in decisions.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = _write_labeled(out, metrics, info, title, legit_kinds, episodes)
    return {"policies": metrics, "info": info, "files": files}


_COLS = ("policy", "recall_orders", "recall_episodes", "precision", "false_holds_per_1000",
         "ttfh_median_days", "ttfh_p90_days", "held", "held_suspicious", "held_normal", "held_grey",
         "legit_surge_held", "legit_surge_orders")


def _surge(m: Mapping[str, Any], legit_kinds: Sequence[str]) -> tuple[int, int]:
    pk = m["per_kind"]
    return (sum(pk.get(k, {}).get("held", 0) for k in legit_kinds),
            sum(pk.get(k, {}).get("orders", 0) for k in legit_kinds))


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _rows(metrics: Mapping[str, Mapping[str, Any]], legit_kinds: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for name, m in metrics.items():
        sh, so = _surge(m, legit_kinds)
        rows.append({"policy": name, **{c: m.get(c) for c in _COLS[1:11]},
                     "legit_surge_held": sh, "legit_surge_orders": so})
    return rows


def _write_csv(path: Path, rows: list[Mapping[str, Any]], cols: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(cols), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})


def markdown_table(rows: list[Mapping[str, Any]], cols: Sequence[str]) -> str:
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |\n" for r in rows)


def _write_labeled(out: Path, metrics: Mapping[str, Mapping[str, Any]], info: Mapping[str, Any], title: str,
                   legit_kinds: Sequence[str], episodes: Sequence[Mapping[str, Any]] | None) -> dict[str, str]:
    rows = _rows(metrics, legit_kinds)
    _write_csv(out / "metrics.csv", rows, _COLS)
    kind_rows = []
    for name, m in metrics.items():
        for k, v in m["per_kind"].items():
            e = m["per_kind_episodes"].get(k, {})
            kind_rows.append({"policy": name, "kind": k, "orders": v["orders"], "held": v["held"],
                              "episodes": e.get("episodes"), "detected": e.get("detected"),
                              "ttfh_median_days": e.get("ttfh_median_days")})
    kcols = ("policy", "kind", "orders", "held", "episodes", "detected", "ttfh_median_days")
    _write_csv(out / "kinds.csv", kind_rows, kcols)
    files = {"metrics_csv": str(out / "metrics.csv"), "kinds_csv": str(out / "kinds.csv")}
    if episodes:
        ecols = list(episodes[0].keys())
        ep_rows = [dict(e) for e in episodes]
        for e in ep_rows:
            for name, m in metrics.items():
                t = m["first_hold"].get(e.get("episode"))
                e[f"first_hold_{name}"] = t.isoformat() if t else ""
        _write_csv(out / "episodes.csv", ep_rows, ecols + [f"first_hold_{n}" for n in metrics])
        files["episodes_csv"] = str(out / "episodes.csv")
    md = [f"# {title}\n", f"Mode: **{info['mode']}**: {info['mode_note']}.\n",
          f"Peer profiles: {info.get('peers', 'none')}.\n",
          "Recall = share of suspicious orders held (orders) and of suspicious episodes with at least one "
          "hold (episodes); precision = held suspicious / (held suspicious + held legitimate); time to first "
          "hold in days from the episode start. `legit_surge_*` = orders of legitimate surges and new "
          "registrants (labelled normal, also counted in false holds).\n",
          markdown_table(rows, _COLS), "\n## Per episode kind\n", markdown_table(kind_rows, kcols)]
    (out / "metrics.md").write_text("\n".join(md), encoding="utf-8")
    files["metrics_md"] = str(out / "metrics.md")
    charts = [
        _bar_chart("False holds per 1,000 legitimate orders (lower is better)",
                   [(r["policy"], r["false_holds_per_1000"]) for r in rows], "{:.1f}"),
        _bar_chart("Recall: share of suspicious episodes with at least one hold",
                   [(r["policy"], r["recall_episodes"]) for r in rows], "{:.0%}", vmax=1.0),
        _bar_chart("Recall: share of suspicious orders held",
                   [(r["policy"], r["recall_orders"]) for r in rows], "{:.0%}", vmax=1.0),
        _bar_chart("Median days from episode start to first hold (lower is better)",
                   [(r["policy"], r["ttfh_median_days"]) for r in rows], "{:.1f} d"),
        _bar_chart("p90 days from episode start to first hold",
                   [(r["policy"], r["ttfh_p90_days"]) for r in rows], "{:.1f} d"),
    ]
    _write_html(out / "report.html", title, info, rows, _COLS, kind_rows, kcols, charts)
    files["report_html"] = str(out / "report.html")
    return files


# --------------------------------------------------------------------------- backtest: per transaction, labels
#: ``suspicious`` column values in a labels CSV (anything else is an error).
_TRUE = {"1", "true", "yes", "y", "suspicious"}
_FALSE = {"0", "false", "no", "n", "normal", ""}
#: The static rule a ramp's first hold is compared with (issue: never later than "2x the trailing 12 months").
RAMP_REFERENCE = "static_2x_12m"

#: Columns of the per-transaction verdict CSV.
VERDICT_COLUMNS = ("TRANSACTION_ID", "order_id", "order_number", "buyer_dea", "date", "drug_family", "policy",
                   "verdict", "detectors", "case_id")


def read_labels_csv(path: str | Path) -> dict[str, dict[str, str]]:
    """A labels CSV: ``TRANSACTION_ID, suspicious, episode[, kind]`` -> ``{TRANSACTION_ID: {label, episode, kind}}``.

    ``suspicious`` is 1/0 (true/false, yes/no), or ``grey``: an early order of an
    episode, neither a miss nor a false hold (a ramp below its suspicious level).
    """
    out: dict[str, dict[str, str]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"TRANSACTION_ID", "suspicious", "episode"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: labels lack columns {sorted(missing)} (need TRANSACTION_ID, suspicious, "
                             f"episode[, kind])")
        for n, row in enumerate(reader, start=2):
            v = (row["suspicious"] or "").strip().lower()
            if v in _TRUE:
                label = SUSPICIOUS
            elif v in _FALSE:
                label = NORMAL
            elif v == GREY:
                label = GREY
            else:
                raise ValueError(f"{path} line {n}: suspicious={row['suspicious']!r} (expected 1, 0 or grey)")
            out[row["TRANSACTION_ID"].strip()] = {"label": label, "episode": (row.get("episode") or "").strip(),
                                                  "kind": (row.get("kind") or "").strip()}
    return out


def order_transactions(order: Mapping[str, Any]) -> list[tuple[str, int, str]]:
    """Transactions of an order that has no ARCOS transaction list: one per line, ``<order_number>/<line_no>``."""
    return [(f"{order['order_number']}/{ln['line_no']}", int(ln["line_no"]), str(ln["drug_family"]))
            for ln in order["lines"]]


_RANK = {NORMAL: 0, GREY: 1, SUSPICIOUS: 2}


def order_labels(orders: Sequence[Mapping[str, Any]], transactions: Mapping[str, list[tuple[str, int, str]]],
                 tx_labels: Mapping[str, Mapping[str, str]]) -> list[dict[str, Any]]:
    """Per-order labels (the :func:`policy_metrics` format) from per-transaction labels, aligned with ``orders``.

    An order is as suspicious as its most suspicious transaction (suspicious >
    grey > normal) and belongs to that transaction's episode; an episode starts
    at its first suspicious order. Transactions without a label count as normal.
    ``families``: the drug families of the order's transactions in that episode.
    """
    labs = []
    for o in orders:
        best: dict[str, str] = {"label": NORMAL, "episode": "", "kind": ""}
        txs = transactions.get(o["order_id"]) or order_transactions(o)
        for txid, _, _ in txs:
            lab = tx_labels.get(txid)
            if lab is None:
                continue
            rank, mine = _RANK[lab["label"]], _RANK[best["label"]]
            if rank > mine or (rank == mine and not best["episode"] and lab.get("episode")):
                best = dict(lab)
        families = sorted({fam for txid, _, fam in txs
                           if best["episode"] and (tx_labels.get(txid) or {}).get("episode") == best["episode"]})
        labs.append({"order_id": o["order_id"], "label": best["label"], "episode": best["episode"] or None,
                     "kind": best["kind"] or best["label"], "families": families})
    start: dict[str, datetime] = {}
    for o, lab in zip(orders, labs):
        if lab["episode"] and lab["label"] == SUSPICIOUS and lab["episode"] not in start:
            start[lab["episode"]] = o["received_at"]
    for o, lab in zip(orders, labs):
        ep = lab["episode"]
        if ep and ep not in start and lab["label"] == NORMAL:
            start[ep] = o["received_at"]  # a legitimate episode (growth, season): starts at its first order
        lab["episode_start"] = start.get(ep) if ep else None
    return labs


def _episode_rows(orders: Sequence[Mapping[str, Any]], labels: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    eps: dict[str, dict[str, Any]] = {}
    for o, lab in zip(orders, labels):
        ep = lab.get("episode")
        if not ep:
            continue
        e = eps.setdefault(ep, {"episode": ep, "kind": lab.get("kind") or "", "purchaser_dea": o["purchaser_dea"],
                                "start": lab["episode_start"].isoformat() if lab.get("episode_start") else "",
                                "orders": 0, "suspicious_orders": 0})
        e["orders"] += 1
        e["suspicious_orders"] += lab["label"] == SUSPICIOUS
    return list(eps.values())


def attributed_first_holds(orders: Sequence[Mapping[str, Any]], labels: Sequence[Mapping[str, Any]],
                           run: Sequence[Mapping[str, Any]]) -> dict[str, datetime]:
    """Each suspicious episode's first hold that names one of the episode's drug families.

    Why: an order that carries a ramp's lines may be held for another family (the 2x rule firing on a
    hydromorphone month of an order whose hydrocodone lines ramp); that hold did not see the ramp. A hold
    counts when a detector fired for one of the episode's families on that order (``families`` of the label,
    :func:`order_labels`) or for the whole order; labels without ``families`` count any hold.
    """
    first: dict[str, datetime] = {}
    for o, lab, d in zip(orders, labels, run):
        ep = lab.get("episode")
        if not ep or not d["held"] or lab["label"] == NORMAL or ep in first:
            continue
        fams = lab.get("families")
        by_family = d.get("by_family") or {}
        if not fams or "*" in by_family or any(f in by_family for f in fams):
            first[ep] = o["received_at"]
    return first


def ramp_comparison(metrics: Mapping[str, Mapping[str, Any]], labels: Sequence[Mapping[str, Any]],
                    policy: str = LEARNED, reference: str = RAMP_REFERENCE) -> dict[str, Any] | None:
    """On every ramp episode: is ``policy``'s first hold no later than ``reference``'s (the 2x rule)?

    Why three outcomes: the bar is "never later than the 2x rule on a ramp", and a ramp that
    neither policy holds is a miss for both (it counts against episode recall) but not a ramp
    where ``policy`` came later. So each ramp is one of: ``no_later`` (``policy`` holds it, on
    or before ``reference``'s first hold or where ``reference`` never does), ``later`` (listed
    in ``later_or_missed`` with the days: ``policy`` holds after ``reference``, or only
    ``reference`` holds it) and ``neither`` (listed in ``missed_by_both``).
    """
    if policy not in metrics or reference not in metrics:
        return None
    ramps = sorted({lab["episode"] for lab in labels if lab.get("episode") and "ramp" in (lab.get("kind") or "")
                    and lab["label"] != NORMAL})
    if not ramps:
        return None
    mine, ref = metrics[policy]["first_hold"], metrics[reference]["first_hold"]
    later: list[dict[str, Any]] = []
    neither: list[str] = []
    for e in ramps:
        a, b = mine.get(e), ref.get(e)
        if a is None and b is None:
            neither.append(e)
        elif b is not None and (a is None or a > b):
            later.append({"episode": e, policy: a.isoformat() if a else "", reference: b.isoformat(),
                          "days_later": round(_days(a, b), 1) if a else None})
    return {"policy": policy, "reference": reference, "ramps": len(ramps),
            "no_later": len(ramps) - len(later) - len(neither), "later": len(later), "neither": len(neither),
            "later_or_missed": later, "missed_by_both": neither}


def ramp_comparison_text(r: Mapping[str, Any]) -> str:
    """The metrics.md paragraph for :func:`ramp_comparison`: the bar's test, then the ramps both missed."""
    text = (f"On {r['no_later']} of {r['ramps']} ramp episodes the {r['policy']} policy's first hold is no later "
            f"than {r['reference']}'s; on {r['later']} it is later or missing while {r['reference']} holds")
    if r["later_or_missed"]:
        text += " (" + ", ".join(f"{x['episode']}: " + (f"{x['days_later']:g} days later" if x["days_later"] is not None
                                                          else "never held") for x in r["later_or_missed"]) + ")"
    text += f"; {r['neither']} neither holds"
    if r["missed_by_both"]:
        text += " (" + ", ".join(r["missed_by_both"]) + ")"
    return text + "."


def write_verdicts(path: Path, policy: str, orders: Sequence[Mapping[str, Any]], run: Sequence[Mapping[str, Any]],
                   transactions: Mapping[str, list[tuple[str, int, str]]] | None = None) -> int:
    """One row per transaction (ARCOS row, or order line) with its order's verdict under ``policy``.

    ``detectors``: the detectors that fired for the transaction's drug family and
    the order-wide ones (``;``-separated), whether or not they decided. A row
    dropped from its order (no dosage units) has verdict ``SKIPPED``; an order from before
    go-live, learned as history and not scored, ``HISTORY``. Returns the row count.
    """
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(VERDICT_COLUMNS)
        for o, d in zip(orders, run):
            txs = (transactions or {}).get(o["order_id"]) or order_transactions(o)
            by_family = d.get("by_family") or {}
            for txid, line_no, family in txs:
                fired = sorted(by_family.get(family, set()) | by_family.get("*", set()))
                verdict = ("SKIPPED" if line_no == 0 else HISTORY if d.get("history") else
                           "HOLD" if d["held"] else "RELEASE")
                w.writerow([txid, o["order_id"], o["order_number"], o["purchaser_dea"],
                            o["received_at"].date().isoformat(), family, policy, verdict, ";".join(fired),
                            d.get("case_id") or "" if d["held"] else ""])
                n += 1
    return n


def holds_by_month(orders: Sequence[Mapping[str, Any]], runs: Mapping[str, Sequence[Mapping[str, Any]]]
                   ) -> list[dict[str, Any]]:
    """Per policy, calendar month, buyer and drug family with at least one hold: orders and holds.

    What a user reads without labels: where and when each policy would have
    stopped shipments (an order of two families counts under both).
    """
    rows = []
    for name, run in runs.items():
        cells: dict[tuple[str, str, str], list[int]] = {}
        for o, d in zip(orders, run):
            if d.get("history"):
                continue
            month = o["received_at"].strftime("%Y-%m")
            for fam in sorted({str(ln["drug_family"]) for ln in o["lines"]}):
                c = cells.setdefault((month, o["purchaser_dea"], fam), [0, 0])
                c[0] += 1
                c[1] += bool(d["held"])
        rows += [{"policy": name, "month": m, "buyer_dea": b, "drug_family": f, "orders": c[0], "held": c[1]}
                 for (m, b, f), c in sorted(cells.items()) if c[1]]
    return rows


def backtest(orders: Sequence[Mapping[str, Any]], out_dir: str | Path, *,
             policies: Sequence[str] = DEFAULT_POLICIES,
             transactions: Mapping[str, list[tuple[str, int, str]]] | None = None,
             labels: Sequence[Mapping[str, Any]] | None = None, config: MonitorConfig | None = None,
             peers: PeerProfiles | None = None, reviewer_factory: ReviewerFactory | None = None,
             progress: Progress | None = None, title: str = "SOM backtest",
             legit_kinds: Sequence[str] | None = None,
             episodes: Sequence[Mapping[str, Any]] | None = None,
             go_live: datetime | None = None) -> dict[str, Any]:
    """Run ``policies`` over ``orders`` (time order) and write what a user checks, per transaction.

    Always: ``verdicts-<policy>.csv`` (:data:`VERDICT_COLUMNS`). With ``labels``
    (aligned with ``orders``, :func:`order_labels`): ``metrics.md/.csv``, ``kinds.csv``
    (episodes caught and median days to first hold per kind), ``episodes.csv``
    (first hold per policy) and ``report.html``; the ramp comparison with
    :data:`RAMP_REFERENCE` is in the result and ``metrics.md``. Without labels:
    ``holds_by_month.csv``. Returns ``{runs, policies (metrics), files, ramps, info, scored}``.

    ``go_live``: the orders before it are every policy's history (learned, not
    scored: :func:`run_policy`); metrics count only the orders from go-live on,
    whose indexes in ``orders`` are ``scored``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if reviewer_factory is None:  # the open-case rule's analyst, reading the labels when there are some
        reviewer_factory = analyst_factory(labels)
    runs = decide_policies(orders, policies, config=config, peers=peers, reviewer_factory=reviewer_factory,
                           progress=progress, go_live=go_live)
    info = {"mode": "hold_detectors", "policies": {p: ",".join(policy_detectors(p, config)) for p in policies},
            "mode_note": "each policy is its own run with MonitorConfig(hold_detectors=...), learning only from "
                         "its own releases", "seconds": round(time.perf_counter() - t0, 1),
            "peers": peers.source if peers is not None else "none",
            "reviewer": "simulated analyst: each case decided 2 days after its hold "
                        + ("from the labels" if labels is not None else "(released: no labels)"),
            "go_live": go_live.isoformat() if go_live else "none: every order scored, every buyer new"}
    files = {}
    for name, run in runs.items():
        f = out / f"verdicts-{name.replace(',', '+')}.csv"
        write_verdicts(f, name, orders, run, transactions)
        files[f"verdicts_{name}"] = str(f)
    scored = [i for i, o in enumerate(orders) if go_live is None or o["received_at"] >= go_live]
    res: dict[str, Any] = {"runs": runs, "info": info, "files": files, "orders": len(orders), "scored": scored}
    if labels is None:
        rows = holds_by_month(orders, runs)
        _write_csv(out / "holds_by_month.csv", rows, ("policy", "month", "buyer_dea", "drug_family", "orders", "held"))
        files["holds_by_month_csv"] = str(out / "holds_by_month.csv")
        res["holds_by_month"] = rows
        return res
    s_orders, s_labels = [orders[i] for i in scored], [labels[i] for i in scored]
    metrics = {name: policy_metrics(s_orders, s_labels, [run[i]["held"] for i in scored])
               for name, run in runs.items()}
    if legit_kinds is None:
        bad = {lab.get("kind") for lab in s_labels if lab["label"] != NORMAL}
        legit_kinds = sorted({lab.get("kind") for lab in s_labels if lab.get("episode")} - bad - {None, ""})
    files.update(_write_labeled(out, metrics, info, title, legit_kinds,
                                episodes if episodes is not None else _episode_rows(s_orders, s_labels)))
    # the bar's test reads holds on the ramp's own family (see attributed_first_holds)
    attributed = {name: {"first_hold": attributed_first_holds(s_orders, s_labels, [runs[name][i] for i in scored])}
                  for name in (LEARNED, RAMP_REFERENCE) if name in runs}
    ramps = ramp_comparison(attributed, s_labels)
    if ramps is not None:
        line = f"\n## Ramps against {ramps['reference']}\n\n{ramp_comparison_text(ramps)}\n"
        with open(out / "metrics.md", "a", encoding="utf-8") as fh:
            fh.write(line)
    res.update(policies=metrics, ramps=ramps)
    return res


# --------------------------------------------------------------------------- HTML / SVG
def _bar_chart(title: str, items: list[tuple[str, float | None]], fmt: str, vmax: float | None = None) -> str:
    """A horizontal bar chart as inline SVG (no dependency)."""
    bar_h, gap, label_w, width = 18, 6, 190, 640
    plot_w = width - label_w - 90
    vals = [v for _, v in items if v is not None]
    top = vmax if vmax is not None else (max(vals) if vals and max(vals) > 0 else 1.0)
    height = 30 + len(items) * (bar_h + gap)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="0" y="16" font-size="14" font-weight="bold">{html.escape(title)}</text>']
    for i, (name, v) in enumerate(items):
        y = 28 + i * (bar_h + gap)
        color = "#2b6cb0" if name == LEARNED else ("#c05621" if name.startswith(STATIC_PREFIX) else "#718096")
        parts.append(f'<text x="{label_w - 6}" y="{y + bar_h - 5}" font-size="12" text-anchor="end">'
                     f'{html.escape(name)}</text>')
        if v is None:
            parts.append(f'<text x="{label_w + 4}" y="{y + bar_h - 5}" font-size="12" fill="#888">n/a</text>')
            continue
        w = max(1.0, plot_w * min(1.0, v / top)) if top else 1.0
        parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>')
        parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h - 5}" font-size="12">'
                     f'{html.escape(fmt.format(v))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _html_table(rows: list[Mapping[str, Any]], cols: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _write_html(path: Path, title: str, info: Mapping[str, Any], rows: list[Mapping[str, Any]],
                cols: Sequence[str], extra_rows: list[Mapping[str, Any]] | None, extra_cols: Sequence[str],
                charts: list[str], notes: Sequence[str] = ()) -> None:
    style = ("body{font-family:sans-serif;margin:24px;max-width:1100px}table{border-collapse:collapse;"
             "font-size:12px;margin:12px 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "th{background:#f0f0f0}td:first-child{text-align:left}.note{color:#444}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='note'>Policy mode: <b>{html.escape(info.get('mode', ''))}</b>: "
             f"{html.escape(info.get('mode_note', ''))}. Blue = learned monitor, orange = static rules, "
             f"grey = a single learned detector.</p>"]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    parts += [f"<div>{c}</div>" for c in charts]
    parts.append(_html_table(rows, cols))
    if extra_rows:
        parts.append("<h2>Detail</h2>" + _html_table(extra_rows, extra_cols))
    parts.append("</body></html>")
    path.write_text("".join(parts), encoding="utf-8")


# --------------------------------------------------------------------------- scenarios and ARCOS
#: Offset of the seed of the scenario run the peer profiles are learned from (another population).
PEER_TRAINING_SEED_OFFSET = 1000


def all_policies(peers: bool = True) -> tuple[str, ...]:
    """Every policy worth a row: learned, each detector alone, the static rules, learned + each recorded detector."""
    from streams.monitoring.detectors import LEARNED_DETECTORS
    recorded = tuple(d for d in RECORDED_DETECTORS if peers or d != "peer_volume")
    return ((LEARNED,) + tuple(LEARNED_DETECTORS) + recorded + tuple(STATIC_DETECTORS) + (STATIC_ANY,)
            + tuple(f"{LEARNED}+{d}" for d in recorded))


def run_scenarios(out_dir: str | Path, seed: int = 7, peers: bool = True, *,
                  policies: Sequence[str] | None = None, progress: Callable[[int], Progress] | None = None,
                  reviewer_factory: ReviewerFactory | None = None, history_days: int = 0,
                  config: MonitorConfig | None = None, **scenario_overrides: Any) -> dict[str, Any]:
    """Generate the default labeled scenarios (:func:`streams.tools.scenarios.generate`) and backtest them.

    ``peers``: learn peer profiles from another scenario run (seed +
    :data:`PEER_TRAINING_SEED_OFFSET`, see :func:`train_peers`) and give them to
    every policy; they are written to ``peers.avro`` in ``out_dir``.
    ``policies``: default :func:`all_policies`. Writes the files of :func:`backtest`
    (``verdicts-<policy>.csv`` per order line, metrics, kinds, episodes).
    ``scenario_overrides`` are ``ScenarioConfig`` fields (e.g. ``n_registrants=60``).
    ``config``: the monitor's settings (default ``MonitorConfig()``; the CLI reads ``SOM_*``).
    These scenarios are the data the thresholds were tuned on. ``history_days``:
    as in :func:`run_arcos`, the first days are history before go-live.
    """
    from streams.tools.scenarios import LEGIT_KINDS, episodes_table, generate
    scn = generate(seed=seed, **scenario_overrides)
    profiles = train_peers(seed + PEER_TRAINING_SEED_OFFSET, config, **scenario_overrides) if peers else None
    names = tuple(policies) if policies else all_policies(peers)
    res = backtest(scn.orders, out_dir, policies=names, labels=scn.labels, peers=profiles, config=config,
                   reviewer_factory=reviewer_factory,
                   progress=progress(len(scn.orders) * len(names)) if progress else None,
                   title=f"SOM evaluation: labeled scenarios (seed {seed})", legit_kinds=LEGIT_KINDS,
                   episodes=episodes_table(scn), go_live=go_live_after(scn.orders, history_days))
    if profiles is not None:
        profiles.save(Path(out_dir) / "peers.avro")
        res["files"]["peers"] = str(Path(out_dir) / "peers.avro")
    res["scenario"] = {"orders": len(scn.orders), "registrants": len({o["purchaser_dea"] for o in scn.orders}),
                       "episodes": len(scn.episodes), "start": scn.start.isoformat(), "end": scn.end.isoformat()}
    return res


def sample_buyers(orders: Sequence[Mapping[str, Any]], n: int | None, seed: int = 0) -> list[Mapping[str, Any]]:
    """The orders of ``n`` buyers drawn at random (deterministic in ``seed``); all orders when ``n`` is None.

    A backtest's cost is orders x policies; sampling whole buyers keeps every
    sampled buyer's history (and so its baselines and episodes) intact.
    """
    buyers = sorted({str(o["purchaser_dea"]) for o in orders})
    if n is None or n >= len(buyers):
        return list(orders)
    import random
    keep = set(random.Random(f"sample-buyers:{seed}").sample(buyers, n))
    return [o for o in orders if o["purchaser_dea"] in keep]


def run_arcos(path: str | Path, out_dir: str | Path, *, config: MonitorConfig | None = None,
              product_master: Any = None, peers: PeerProfiles | None = None, labels: str | Path | None = None,
              policies: Sequence[str] = DEFAULT_POLICIES, reviewer_factory: ReviewerFactory | None = None,
              progress: Callable[[int], Progress] | None = None, buyers: int | None = None,
              seed: int = 0, history_days: int = 0, peers_from_history: bool = False) -> dict[str, Any]:
    """Backtest an ARCOS file: every policy's verdict per transaction, and scores when labels are given.

    ``labels``: a CSV ``TRANSACTION_ID, suspicious, episode[, kind]`` (see
    :func:`read_labels_csv`): recall, precision, false holds per 1,000
    legitimate orders, episodes caught and days to first hold per kind.
    Without labels: hold rates per policy, ``holds_by_month.csv`` and
    ``arcos_held_by_both.csv`` (orders held by the learned policy **and** a
    static rule). ``buyers``: sample that many buyers (seed ``seed``) to bound
    the run time. ``progress(total_orders)`` returns a callback advanced by
    the orders scored (a progress bar). Writes ``arcos.md`` (what was read,
    the ARCOS quirks met, the tables) and the files of :func:`backtest`.
    ``history_days``: the file's first days are the distributor's history before
    go-live (:func:`go_live_after`): learned by every policy, buyers in them
    onboarded as existing customers, not scored. ``peers_from_history``: peer
    profiles built from those history orders (what a distributor has at go-live,
    ``csos peers build`` over its own order history) instead of ``peers``.
    """
    from connectors.sources.arcos_replay import read_arcos_detailed
    data = read_arcos_detailed(path, product_master=product_master)
    orders = _sorted_stream(sample_buyers(data.orders, buyers, seed))
    labs = order_labels(orders, data.transactions, read_labels_csv(labels)) if labels else None
    go_live = go_live_after(orders, history_days)
    if peers_from_history:
        if go_live is None:
            raise ValueError("peers from history need a history: give history_days > 0")
        history_orders = [o for o in orders if o["received_at"] < go_live]
        peers = build_profiles(history_orders, f"the {len(history_orders)} orders before go-live "
                                               f"{go_live.date().isoformat()} ({history_days} days of history)")
    n, n_buyers = len(orders), len({o["purchaser_dea"] for o in orders})
    res = backtest(orders, out_dir, policies=policies, transactions=data.transactions, labels=labs, config=config,
                   peers=peers, reviewer_factory=reviewer_factory,
                   progress=progress(n * len(policies)) if progress else None,
                   title=f"SOM backtest: {Path(path).name}", go_live=go_live)
    scored = res["scored"]
    history = n - len(scored)
    orders = [orders[i] for i in scored]
    runs = {k: [run[i] for i in scored] for k, run in res["runs"].items()}
    n = len(orders)
    out = Path(out_dir)
    rows = []
    for name, run in runs.items():
        k = sum(d["held"] for d in run)
        rows.append({"policy": name, "orders": n, "held": k, "hold_rate": k / n if n else None,
                     "holds_per_1000": 1000.0 * k / n if n else None,
                     "buyers_held": len({o["purchaser_dea"] for o, d in zip(orders, run) if d["held"]})})
    cols = ("policy", "orders", "held", "hold_rate", "holds_per_1000", "buyers_held")
    _write_csv(out / "arcos_policies.csv", rows, cols)
    both = _held_by_both(orders, runs)
    bcols = ("order_id", "purchaser_dea", "business_activity", "received_at", "order_number", "dosage_units",
             "static_rules")
    _write_csv(out / "arcos_held_by_both.csv", both, bcols)
    sampled = f" (a sample of {n_buyers} buyers, seed {seed})" if buyers else ""
    read_note = f"Read: {data.describe()}."
    note = ("Scored against the labels given." if labs is not None else
            "No labels: recall and precision cannot be computed; the tables show how often each policy would "
            "have held.") + " Verification was skipped (ARCOS has no signatures)."
    live = (f"Go-live {go_live.date().isoformat()}: the {history} orders before it ({history_days} days) are "
            f"history, learned by every policy and not scored; their buyers are existing customers.\n"
            if go_live else "")
    md = ["# SOM on ARCOS replay\n", f"Source: `{Path(path).name}`; {n} orders scored, {n_buyers} buyers{sampled}.\n",
          read_note + "\n", live, note + "\n", f"Peer profiles: {res['info']['peers']}.\n", markdown_table(rows, cols),
          f"\nOrders held by both the learned policy and a static rule: {len(both)}.\n"]
    if labs is not None:
        md.append("\n" + (out / "metrics.md").read_text(encoding="utf-8").split("\n", 1)[1])
    (out / "arcos.md").write_text("\n".join(md), encoding="utf-8")
    charts = [_bar_chart("Holds per 1,000 ARCOS orders", [(r["policy"], r["holds_per_1000"]) for r in rows],
                         "{:.1f}"),
              _bar_chart("Buyers with at least one hold", [(r["policy"], r["buyers_held"]) for r in rows], "{:.0f}")]
    _write_html(out / "arcos_report.html", "SOM on ARCOS replay", res["info"], rows, cols, both[:200], bcols, charts,
                notes=[read_note, note, f"Orders held by both the learned policy and a static rule: {len(both)} "
                                        f"(first 200 listed)."])
    res["files"].update({k: str(out / v) for k, v in (("policies_csv", "arcos_policies.csv"),
                                                       ("held_by_both_csv", "arcos_held_by_both.csv"),
                                                       ("md", "arcos.md"), ("report_html", "arcos_report.html"))})
    res.update(held=rows, held_by_both=both, buyers=n_buyers, note=note, read=data.stats, read_note=read_note,
               history_orders=history)
    return res


def go_live_after(orders: Sequence[Mapping[str, Any]], history_days: int) -> datetime | None:
    """Go-live ``history_days`` after the first order's day (midnight UTC), or None for no history."""
    if history_days <= 0 or not orders:
        return None
    first = min(o["received_at"] for o in orders)
    return first.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=history_days)


def _held_by_both(orders: Sequence[Mapping[str, Any]], runs: Mapping[str, Sequence[Mapping[str, Any]]]
                  ) -> list[dict[str, Any]]:
    """Orders held by the learned policy and by at least one single static rule."""
    if LEARNED not in runs:
        return []
    static = [p for p in runs if p.startswith(STATIC_PREFIX) and p != STATIC_ANY]
    both = []
    for i, o in enumerate(orders):
        if runs[LEARNED][i]["held"]:
            agree = [p for p in static if runs[p][i]["held"]]
            if agree:
                both.append({"order_id": o["order_id"], "purchaser_dea": o["purchaser_dea"],
                             "business_activity": o.get("business_activity") or "",
                             "received_at": o["received_at"].isoformat(), "order_number": o["order_number"],
                             "dosage_units": sum(int(ln["dosage_units"]) for ln in o["lines"]),
                             "static_rules": ",".join(agree)})
    return both


__all__ = ["evaluate", "run_scenarios", "run_arcos", "run_policy", "run_policies", "policy_metrics",
           "backtest", "decide_policies", "released_order_ids", "policy_detectors", "read_labels_csv", "order_labels", "write_verdicts",
           "holds_by_month", "ramp_comparison", "ramp_comparison_text", "sample_buyers", "all_policies", "Reviewer", "ReviewerFactory", "DEFAULT_POLICIES",
           "VERDICT_COLUMNS", "RAMP_REFERENCE",
           "supports_hold_detectors", "markdown_table", "LEARNED", "STATIC_ANY"]
