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
  (:mod:`connectors.scenarios`) and evaluate them;
* :func:`run_arcos` (path, out_dir) -> dict: replay an ARCOS file
  (:mod:`connectors.arcos_replay`); no labels, so hold rates per policy and the
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
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from streams.monitoring import Monitor, MonitorConfig
from streams.monitoring.detectors import RECORDED_DETECTORS
from streams.monitoring.open_cases import DUE_DILIGENCE_RULES, SimulatedDueDiligence, label_index
from streams.monitoring.peers import PeerProfiles, build_profiles

LEARNED = "learned"
STATIC_PREFIX = "static_"
STATIC_ANY = "static_any"

SUSPICIOUS, NORMAL, GREY = "suspicious", "normal", "grey"


# --------------------------------------------------------------------------- running policies
def supports_hold_detectors() -> bool:
    """True when ``MonitorConfig`` has the ``hold_detectors`` field (each policy can be a real run)."""
    return any(f.name == "hold_detectors" for f in dataclasses.fields(MonitorConfig))


def _sorted_stream(stream: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(stream, key=lambda o: o["received_at"])


def run_policy(orders: Sequence[Mapping[str, Any]], monitor: Monitor, labels: Any = None,
               review_days: float = 2.0) -> list[dict[str, Any]]:
    """Replay ``orders`` (time order) through ``monitor``; learn only from released orders.

    Returns one decision per order: ``{order_id, held, fired}`` where ``fired`` is
    the set of detector names that fired (held or not). An order the monitor
    cannot score is held (``monitor_error``), as in the agent. The open-case rule
    applies with a simulated analyst deciding each held order ``review_days``
    after its hold, from ``labels`` when given (see
    :class:`streams.monitoring.open_cases.SimulatedDueDiligence`).
    """
    live: dict[str, Any] = {}
    out = []
    analyst = SimulatedDueDiligence(monitor, label_index(labels), review_days)
    for o in orders:
        dea = str(o["purchaser_dea"])
        base = live.get(dea)
        if base is None:
            base = live[dea] = monitor.baselines(None, dea)
        analyst.before(o, base)
        v = None
        try:
            v = monitor.score(base, o, decided_at=o["received_at"])
            fired = {r["detector"] for r in v["reasons"] if r["fired"]}
            seen = {r["detector"] for r in v["reasons"]}
            held = v["verdict"] == "HOLD"
        except Exception:  # noqa: BLE001 - same rule as the agent: cannot score -> hold
            fired, seen, held = {"monitor_error"}, {"monitor_error"}, True
        if not held:
            monitor.learn_into(base, o)
        analyst.after(o, base, v)
        out.append({"order_id": o["order_id"], "held": held, "fired": fired, "seen": seen})
    return out


def released_orders(orders: Sequence[Mapping[str, Any]], monitor: Monitor) -> list[Mapping[str, Any]]:
    """The orders ``monitor`` releases when it runs over ``orders``: what a peer profile may learn from."""
    return [o for o, d in zip(orders, run_policy(orders, monitor)) if not d["held"]]


def train_peers(seed: int, config: MonitorConfig | None = None, **scenario_overrides: Any) -> PeerProfiles:
    """Peer profiles learned from a *different* scenario run (seed ``seed``), as production would.

    The training population is another set of registrants; the default
    monitor (no peers) runs over it and only the orders it releases are
    learned, so the evaluation never sees its own test orders in the peers.
    """
    from connectors.scenarios import generate
    train = generate(seed=seed, **scenario_overrides)
    shipped = released_orders(train.orders, Monitor(config or MonitorConfig()))
    return build_profiles(shipped, f"scenarios seed {seed}: {len(shipped)} released orders")


def run_policies(orders: Sequence[Mapping[str, Any]], config: MonitorConfig | None = None,
                 peers: PeerProfiles | None = None, labels: Any = None,
                 review_days: float = 2.0) -> tuple[dict[str, list[bool]], dict[str, Any]]:
    """Decisions (held flags aligned with ``orders``) per policy, and how they were obtained.

    ``peers``: peer profiles every policy's monitor uses (cold start, ``peer_volume``).
    """
    cfg = config or MonitorConfig()
    t0 = time.perf_counter()
    base_run = run_policy(orders, Monitor(cfg, peers=peers), labels, review_days)
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
            run = run_policy(orders, Monitor(dataclasses.replace(cfg, hold_detectors=dets), peers=peers), labels,
                             review_days)
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
    (see :mod:`connectors.scenarios`). Returns ``{"policies": {name: metrics}, "info": ...,
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


def run_scenarios(out_dir: str | Path, seed: int = 7, peers: bool = True,
                  **scenario_overrides: Any) -> dict[str, Any]:
    """Generate the default labeled scenarios (:func:`connectors.scenarios.generate`) and evaluate them.

    ``peers``: learn peer profiles from another scenario run (seed +
    :data:`PEER_TRAINING_SEED_OFFSET`, see :func:`train_peers`) and give them to
    every policy; they are written to ``peers.avro`` in ``out_dir``.
    ``scenario_overrides`` are ``ScenarioConfig`` fields (e.g. ``n_registrants=60``).
    """
    from connectors.scenarios import LEGIT_KINDS, episodes_table, generate
    scn = generate(seed=seed, **scenario_overrides)
    profiles = train_peers(seed + PEER_TRAINING_SEED_OFFSET, **scenario_overrides) if peers else None
    res = evaluate(scn.orders, scn.labels, out_dir, title=f"SOM evaluation: labeled scenarios (seed {seed})",
                   legit_kinds=LEGIT_KINDS, episodes=episodes_table(scn), peers=profiles)
    if profiles is not None:
        profiles.save(Path(out_dir) / "peers.avro")
        res["files"]["peers"] = str(Path(out_dir) / "peers.avro")
    res["scenario"] = {"orders": len(scn.orders), "registrants": len({o["purchaser_dea"] for o in scn.orders}),
                       "episodes": len(scn.episodes), "start": scn.start.isoformat(), "end": scn.end.isoformat()}
    return res


def run_arcos(path: str | Path, out_dir: str | Path, *, config: MonitorConfig | None = None,
              product_master: Any = None, peers: PeerProfiles | None = None) -> dict[str, Any]:
    """Replay an ARCOS file through every policy. ARCOS has no labels: no recall or precision.

    Reports per policy the orders held, the hold rate and the buyers with a hold,
    and writes ``arcos_policies.csv``, ``arcos_held_by_both.csv`` (orders held by
    the learned policy **and** by at least one static rule: the ones both agree
    are suspicious), ``arcos.md`` and ``arcos_report.html``.
    """
    from connectors.arcos_replay import read_arcos
    orders = _sorted_stream(read_arcos(path, product_master=product_master))
    decisions, info = run_policies(orders, config, peers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(orders)
    rows = []
    for name, held in decisions.items():
        k = sum(held)
        rows.append({"policy": name, "orders": n, "held": k, "hold_rate": k / n if n else None,
                     "holds_per_1000": 1000.0 * k / n if n else None,
                     "buyers_held": len({o["purchaser_dea"] for o, x in zip(orders, held) if x})})
    cols = ("policy", "orders", "held", "hold_rate", "holds_per_1000", "buyers_held")
    _write_csv(out / "arcos_policies.csv", rows, cols)
    static = [p for p in decisions if p.startswith(STATIC_PREFIX) and p != STATIC_ANY]
    both = []
    for i, o in enumerate(orders):
        if decisions[LEARNED][i]:
            agree = [p for p in static if decisions[p][i]]
            if agree:
                both.append({"order_id": o["order_id"], "purchaser_dea": o["purchaser_dea"],
                             "business_activity": o.get("business_activity") or "",
                             "received_at": o["received_at"].isoformat(), "order_number": o["order_number"],
                             "dosage_units": sum(int(l["dosage_units"]) for l in o["lines"]),
                             "static_rules": ",".join(agree)})
    bcols = ("order_id", "purchaser_dea", "business_activity", "received_at", "order_number", "dosage_units",
             "static_rules")
    _write_csv(out / "arcos_held_by_both.csv", both, bcols)
    note = ("ARCOS carries no labels (these are shipped orders): recall and precision cannot be computed; "
            "the table shows how often each policy would have held. Verification was skipped (ARCOS has no "
            "signatures).")
    if not static:
        note += (" No static_* detector was found in the verdict reasons yet, so 'held by both' is empty.")
    md = ["# SOM on ARCOS replay\n", f"Source: `{path}`; {n} orders, "
          f"{len({o['purchaser_dea'] for o in orders})} buyers.\n", note + "\n",
          f"Mode: **{info['mode']}**: {info['mode_note']}.\n", markdown_table(rows, cols),
          f"\nOrders held by both the learned policy and a static rule: {len(both)}.\n"]
    (out / "arcos.md").write_text("\n".join(md), encoding="utf-8")
    charts = [_bar_chart("Holds per 1,000 ARCOS orders", [(r["policy"], r["holds_per_1000"]) for r in rows],
                         "{:.1f}"),
              _bar_chart("Buyers with at least one hold", [(r["policy"], r["buyers_held"]) for r in rows], "{:.0f}")]
    _write_html(out / "arcos_report.html", "SOM on ARCOS replay", info, rows, cols, both[:200], bcols, charts,
                notes=[note, f"Orders held by both the learned policy and a static rule: {len(both)} "
                             f"(first 200 listed)."])
    return {"policies": {r["policy"]: r for r in rows}, "held_by_both": both, "info": info,
            "orders": n, "buyers": len({o["purchaser_dea"] for o in orders}), "note": note,
            "files": {k: str(out / v) for k, v in (("policies_csv", "arcos_policies.csv"),
                                                    ("held_by_both_csv", "arcos_held_by_both.csv"),
                                                    ("md", "arcos.md"), ("report_html", "arcos_report.html"))}}


__all__ = ["evaluate", "run_scenarios", "run_arcos", "run_policy", "run_policies", "policy_metrics",
           "supports_hold_detectors", "markdown_table", "LEARNED", "STATIC_ANY"]
