"""The monitor: one verified order in, one verdict (RELEASE or HOLD) with its evidence out.

The Faust agent keeps one state dict per registrant (``som.state.RegistrantState``)
and calls, per verified order::

    verdict = monitor.score(state, order)
    if verdict["verdict"] == "RELEASE":
        state = monitor.learn(state, order)

Learning only from released orders is what keeps the baselines honest: a run
of suspicious orders is held and never becomes the "normal" it is judged by.
Scoring is pure (same state + order -> same verdict), so a replay, the
offline CLI and the backtest reach the decisions the stream reached.

Every detector runs on every order and its findings are recorded; only the
detectors named in ``MonitorConfig.hold_detectors`` decide. Each finding says
whether its detector decides (``enforced``), so the learned detectors and the
static reference rules can be compared on the same verdicts.
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from streams.monitoring.baselines import (
    STATE_VERSION, OrderFacts, RegistrantBaselines, migrate_state, new_state as _new_state, order_facts,
)
from streams.monitoring.detectors import (
    DETECTORS_VERSION, Detector, MonitorConfig, default_detectors,
)
from streams.monitoring.anomaly import AnomalyCombiner
from streams.monitoring.evidence import verdict
from streams.monitoring.peers import PeerProfiles
from streams.monitoring import open_cases
from streams.monitoring.onboarding import NewCustomerDetector, NewCustomerOrderDetector
from streams.monitoring.strength import default_high_strength_ndcs, high_strength_ndcs
from streams.domain.products import Product


def load_peers(path: str) -> PeerProfiles:
    """Peer profiles from ``SOM_PEER_PROFILES``; a named file that is missing stops the worker.

    Failing at start is deliberate: a worker that silently fell back to the
    fixed ceilings would judge new customers differently from its siblings.
    """
    try:
        return PeerProfiles.load(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"SOM_PEER_PROFILES={path}: no such file (build it with `csos peers build`)") from None


class Monitor:
    """Suspicious order monitoring for one configuration of detectors and thresholds."""

    def __init__(self, config: MonitorConfig | None = None, detectors: list[Detector] | None = None,
                 peers: PeerProfiles | None = None, high_ndcs: frozenset[str] | None = None) -> None:
        self.config = config or MonitorConfig()
        #: NDCs of the families' high-strength products (strength_shift's share; reference data from the product
        #: master, ``streams.monitoring.strength``). None: from CSOS_PRODUCTS (else the bundled master).
        self.high_ndcs = (high_ndcs if high_ndcs is not None
                          else default_high_strength_ndcs(self.config.strength_high_fraction))
        self.settings = self.config.baseline_settings()
        if peers is None and self.config.peer_profiles:
            peers = load_peers(self.config.peer_profiles)
        #: Peer profiles (reference data, read-only): cold start and peer deviation. None = fixed ceilings.
        self.peers = peers
        self.detectors = detectors if detectors is not None else (
            default_detectors(self.config, peers) + [NewCustomerDetector(self.config, peers),
                                                     NewCustomerOrderDetector(self.config, peers)])
        #: Combines the learned findings of each order into ``anomaly`` findings (after the detectors run).
        self.combiner: AnomalyCombiner | None = AnomalyCombiner(self.config)
        names = [d.name for d in self.detectors] + ([self.combiner.name] if self.combiner else [])
        unknown = sorted(set(self.config.hold_detectors) - set(names))
        if unknown:
            # A misspelt name would silently stop that detector from holding anything.
            raise ValueError(f"SOM_HOLD_DETECTORS names unknown detector(s) {', '.join(unknown)}; "
                             f"known: {', '.join(names)}")
        self.hold_detectors = frozenset(self.config.hold_detectors)
        #: Whose findings are ``enforced``: the deciding detectors and the due-diligence rules (never ``replay``).
        self._deciding = self.hold_detectors | frozenset(open_cases.DUE_DILIGENCE_RULES)
        if not self.config.record_all:
            # Only what decides runs. The anomaly score combines every learned finding, so when it
            # decides everything still runs; otherwise the recorded-only detectors are skipped.
            if self.combiner is None or self.combiner.name not in self.hold_detectors:
                self.detectors = [d for d in self.detectors if d.name in self.hold_detectors]
                self.combiner = None
        #: Names the detector logic, the state layout and every threshold (the decisive detectors
        #: and the customer limits in force included); carried by each verdict.
        tags = "".join(f".{t}" for d in self.detectors if (t := getattr(d, "version_tag", "")))
        if peers is not None:
            tags += f".{peers.digest()}"
        if self.high_ndcs:  # another product master can make other products high-strength
            tags += ".h" + hashlib.sha256(",".join(sorted(self.high_ndcs)).encode()).hexdigest()[:6]
        self._last_facts: tuple[Any, ...] | None = None  # (order, (id, received_at), lines, facts)
        self._score_plan: tuple[Any, Any, list[tuple[Any, bool]]] | None = None  # see _plan()
        self.model_version = f"som/{DETECTORS_VERSION}.s{STATE_VERSION}+{self.config.fingerprint()}{tags}"

    def _plan(self) -> list[tuple[Any, bool]]:
        """(bound ``score_one``, whether the anomaly score combines its findings) per detector, in order.

        Built once per detector list (tests and benchmarks may replace ``detectors``), not looked up per order.
        """
        detectors, combiner = self.detectors, self.combiner
        plan = self._score_plan
        if plan is None or plan[0] is not detectors or plan[1] is not combiner or len(plan[2]) != len(detectors):
            combined = combiner.inputs if combiner is not None else frozenset()
            plan = self._score_plan = (detectors, combiner, [(d.score_one, d.name in combined) for d in detectors])
        return plan[2]

    def _facts(self, order: Mapping[str, Any]) -> OrderFacts:
        """``order_facts(order)``, reused when ``learn_into`` follows ``score`` on the same, unchanged order.

        Reusing the very object also lets the baselines reuse the windows scoring computed for it.
        """
        key = (order["order_id"], order["received_at"], order["lines"])
        cached = self._last_facts
        if cached is not None and cached[0] is order and cached[1] == key[:2] and cached[2] is key[2]:
            return cached[3]
        facts = order_facts(order, self.high_ndcs)
        self._last_facts = (order, key[:2], key[2], facts)
        return facts

    @classmethod
    def from_env(cls, products: Iterable[Product] | None = None) -> "Monitor":
        """The monitor the worker runs: thresholds from ``SOM_*``; ``products``, the product master the
        verifier already loaded, so that strength_shift's high-strength products come from the same copy
        (None: read ``CSOS_PRODUCTS`` again)."""
        cfg = MonitorConfig.from_env()
        high = None if products is None else high_strength_ndcs(products, cfg.strength_high_fraction)
        return cls(cfg, high_ndcs=high)

    def new_state(self, purchaser_dea: str) -> dict[str, Any]:
        """State of a registrant with no learned orders."""
        return _new_state(purchaser_dea)

    def baselines(self, state: Mapping[str, Any] | None, purchaser_dea: str) -> RegistrantBaselines:
        """Live baselines of one registrant, for a caller that keeps them between orders.

        The stream agent caches these objects and passes them to ``score`` and
        ``learn_into``, so a busy registrant's river statistics are parsed once
        per batch, not once per order.
        """
        if state is None:
            return RegistrantBaselines.new(purchaser_dea, self.settings)
        return self._baselines(state, {"purchaser_dea": purchaser_dea})

    def _baselines(self, state: Mapping[str, Any] | RegistrantBaselines | None,
                   order: Mapping[str, Any]) -> RegistrantBaselines:
        if isinstance(state, RegistrantBaselines):
            if state.purchaser_dea != order["purchaser_dea"]:
                raise ValueError(f"state of {state.purchaser_dea} used for an order of {order['purchaser_dea']}")
            return state
        if state is None:
            return RegistrantBaselines.new(str(order["purchaser_dea"]), self.settings)
        state = migrate_state(state)
        if state["purchaser_dea"] != order["purchaser_dea"]:
            # A mis-keyed table entry would judge one pharmacy by another's history.
            raise ValueError(f"state of {state['purchaser_dea']} used for an order of {order['purchaser_dea']}")
        return RegistrantBaselines(state, self.settings)

    def score(self, state: Mapping[str, Any] | RegistrantBaselines | None, order: Mapping[str, Any],
              decided_at: datetime | None = None) -> dict[str, Any]:
        """Judge a verified order against the registrant's baselines; the state is not changed.

        Returns a ``som.Verdict`` dict. HOLD if a detector in ``hold_detectors`` fired;
        the others' findings are recorded with ``enforced`` false. An order
        already learned (a redelivery after its RELEASE was acted on) gets
        RELEASE again: the first decision stands and was already shipped on.
        """
        facts = self._facts(order)
        base = self._baselines(state, order)
        # Every detector, the anomaly score, then the decisions already taken (open case, report, analyst
        # limit, termination: always enforced, _deciding), the evidence and the decision: evidence.verdict.
        return verdict(self._plan(), self.combiner, self._deciding, base, facts, order,
                       decided_at or datetime.now(timezone.utc), self.model_version)

    def learn(self, state: Mapping[str, Any] | None, order: Mapping[str, Any]) -> dict[str, Any]:
        """Fold a RELEASED order into the baselines and return the new state (the input is not modified).

        Call it only for released orders. Learning the same order twice is a no-op.
        """
        if isinstance(state, RegistrantBaselines):
            raise TypeError("learn() returns a new state; use learn_into() for live baselines")
        base = self._baselines(state, order)
        base.learn(order_facts(order, self.high_ndcs))
        return base.to_state()

    def learn_into(self, base: RegistrantBaselines, order: Mapping[str, Any]) -> None:
        """Fold a RELEASED order into live baselines (mutates ``base``); export with ``base.to_state()``."""
        self._baselines(base, order).learn(self._facts(order))

    def note_verdict(self, base: RegistrantBaselines, order: Mapping[str, Any], verdict: Mapping[str, Any]) -> bool:
        """Record a verdict in the registrant's due-diligence state (a HOLD opens a case); True if it changed.

        Call it for every verdict the caller acts on (after ``score``, and after ``learn_into`` for a release).
        """
        return open_cases.note_verdict(self._baselines(base, order).due_diligence, order, verdict)

    def apply_outcome(self, base: RegistrantBaselines, outcome: Mapping[str, Any]) -> bool:
        """Apply a due-diligence outcome (``som.ClearedOrder``) to live baselines; False if already applied."""
        return open_cases.apply_outcome(base.due_diligence, outcome)

    @staticmethod
    def summary(verdict: Mapping[str, Any]) -> str:
        """One plain-language sentence for the hold notice: the fired findings, or why it was released.

        Findings of detectors that do not decide (``enforced`` false) are named after the deciding ones.
        """
        rs = verdict["reasons"]
        deciding = [r["explanation"] for r in rs if r["fired"] and r.get("enforced", True)]
        recorded = [r["explanation"] for r in rs if r["fired"] and not r.get("enforced", True)]
        extra = f" Recorded, not deciding: {' '.join(recorded)}" if recorded else ""
        if verdict["verdict"] == "HOLD":
            return f"Held for due diligence: {' '.join(deciding)}{extra}"
        if deciding:  # a replayed order: the earlier RELEASE stands
            return f"Released: {' '.join(deciding)}{extra}"
        return f"Released: no deciding detector fired.{extra}" if recorded else "Released: no detector fired."
