"""Monitoring cost: scoring time per order and state size per registrant and drug family.

Not a test: it prints figures. It runs the monitor exactly as the agent does
(live baselines per registrant, learn only what is released) over the labeled
scenarios, times score + learn per order, then encodes every registrant's
state with the changelog's Avro schema and reports its size.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any

from streams.core.avro_codec import default_codec
from streams.monitoring.detectors import MonitorConfig
from streams.monitoring.monitor import Monitor


def run(registrants: int = 150, seed: int = 7, peers: bool = True, record_all: bool = True,
        without: tuple[str, ...] = (), score: bool = True) -> dict[str, Any]:
    """Time the monitor over the seed's scenarios; ``peers``: with peer profiles learned from seed + 1000.

    Peers are on by default because the evaluation's learned policy uses them
    (cold start and the focused trend look them up on every order).
    ``record_all=False`` runs only the deciding detectors (``SOM_RECORD_ALL=0``).
    ``without`` leaves those detectors out (not run, not deciding): the "before" of a
    cost comparison, e.g. without the issue-11 detectors, measured in the same process.
    ``score=False`` builds everything and scores nothing (the set-up an instruction count subtracts).
    """
    from streams.tools.scenarios import generate

    from streams.tools.evaluation import PEER_TRAINING_SEED_OFFSET, train_peers

    orders = sorted(generate(seed=seed, n_registrants=registrants).orders, key=lambda o: o["received_at"])
    profiles = train_peers(seed + PEER_TRAINING_SEED_OFFSET, n_registrants=registrants) if peers else None
    monitor = _monitor(MonitorConfig(record_all=record_all), profiles, without)
    if not score:
        return {"orders": len(orders), "lines": sum(len(o["lines"]) for o in orders)}
    live: dict[str, Any] = {}
    t0 = time.process_time()  # CPU time of this process: a loaded shared machine inflates wall time
    for o in orders:
        dea = o["purchaser_dea"]
        base = live.get(dea)
        if base is None:
            base = live[dea] = monitor.baselines(None, dea)
        if monitor.score(base, o)["verdict"] == "RELEASE":
            monitor.learn_into(base, o)
    elapsed = time.process_time() - t0
    codec = default_codec()
    sizes, per_family = [], []
    for base in live.values():
        state = base.to_state()
        n = len(codec.encode("som.state.RegistrantState", state))
        sizes.append(n)
        if state["families"]:
            per_family.append(n / len(state["families"]))
    sizes.sort()
    per_family.sort()
    lines = sum(len(o["lines"]) for o in orders)
    return {
        "orders": len(orders), "lines": lines, "registrants": len(live), "seconds": elapsed,
        "us_per_order": elapsed / len(orders) * 1e6, "us_per_line": elapsed / lines * 1e6,
        "state_bytes_median": sizes[len(sizes) // 2], "state_bytes_max": sizes[-1],
        "bytes_per_family_median": per_family[len(per_family) // 2], "bytes_per_family_max": per_family[-1],
        "model_version": monitor.model_version,
        "peer_groups": len(profiles.groups) if profiles else 0,
    }


def _monitor(cfg: MonitorConfig, profiles: Any, without: tuple[str, ...]) -> Monitor:
    """The default monitor, or one without the named detectors (which then do not decide either)."""
    if not without:
        return Monitor(cfg, peers=profiles)
    full = Monitor(cfg, peers=profiles)
    unknown = sorted(set(without) - {d.name for d in full.detectors})
    if unknown:
        raise ValueError(f"no detector named {', '.join(unknown)}; known: {', '.join(d.name for d in full.detectors)}")
    cfg = dataclasses.replace(cfg, hold_detectors=tuple(n for n in cfg.hold_detectors if n not in without))
    return Monitor(cfg, [d for d in full.detectors if d.name not in without], peers=profiles)


def compare_without(registrants: int, seed: int, peers: bool, without: tuple[str, ...],
                    rounds: int = 3) -> tuple[dict[str, Any], dict[str, Any]]:
    """(with every detector, without ``without``): the fastest of ``rounds`` interleaved runs of each.

    Interleaved and best-of, so a neighbour's load on a shared machine hits both
    sides alike instead of whichever ran second.
    """
    best: dict[bool, dict[str, Any]] = {}
    for _ in range(rounds):
        for leave_out in (False, True):
            r = run(registrants, seed, peers, without=without if leave_out else ())
            if leave_out not in best or r["us_per_order"] < best[leave_out]["us_per_order"]:
                best[leave_out] = r
    return best[False], best[True]


def count_instructions(registrants: int, seed: int, peers: bool,
                       without: tuple[str, ...]) -> dict[str, float]:
    """Instructions per order (score + learn) with every detector and without ``without``, counted by valgrind.

    Why: on a shared 2-core machine the CPU time of the same run swings by
    +-20 %, as much as the cost being measured; the instructions a process
    executes do not depend on its neighbours. Three runs under callgrind (the
    set-up alone, then scoring without and with the detectors), same seed and
    ``PYTHONHASHSEED``; a side's count is its run minus the set-up, per order.
    Slow (callgrind runs Python ~50x slower): use a few registrants.
    """
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise RuntimeError("--instructions counts with valgrind's callgrind, which is not installed "
                           "(Debian/Ubuntu: apt install valgrind)")

    def one(score: bool, leave_out: tuple[str, ...]) -> tuple[int, int]:
        cmd = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
               "streams.tools.bench_monitor", "--registrants", str(registrants), "--seed", str(seed)]
        cmd += [] if peers else ["--no-peers"]
        cmd += ["--without", ",".join(leave_out)] if leave_out else []
        cmd += [] if score else ["--setup-only"]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        found = re.search(r"Collected\s*:\s*(\d+)", done.stderr)
        if done.returncode != 0 or found is None:
            raise RuntimeError(f"callgrind run failed ({done.returncode}): {done.stderr[-2000:]}")
        return int(found.group(1)), int(json.loads(done.stdout.strip().splitlines()[-1])["orders"])

    setup, orders = one(False, ())
    before, _ = one(True, without)
    full, _ = one(True, ())
    return {"orders": orders, "without": (before - setup) / orders, "with": (full - setup) / orders}


def main(argv: list[str] | None = None) -> None:
    """One bench run as a child process (what :func:`count_instructions` runs under valgrind): prints JSON."""
    ap = argparse.ArgumentParser(prog="python -m streams.tools.bench_monitor")
    ap.add_argument("--registrants", type=int, default=150)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--without", default="")
    ap.add_argument("--setup-only", action="store_true")
    a = ap.parse_args(argv)
    without = tuple(n for n in a.without.split(",") if n)
    r = run(a.registrants, a.seed, not a.no_peers, without=without, score=not a.setup_only)
    print(json.dumps({k: v for k, v in r.items() if isinstance(v, (int, float, str))}))


def render(r: dict[str, Any]) -> str:
    return "\n".join([
        f"monitor {r['model_version']}: {r['orders']} orders ({r['lines']} lines), {r['registrants']} registrants",
        f"score + learn: {r['us_per_order']:.0f} us per order, {r['us_per_line']:.0f} us per line (one core, "
        f"{r['orders'] / r['seconds']:,.0f} orders/s)",
        f"state (Avro, as on the changelog): median {r['state_bytes_median']} B, max {r['state_bytes_max']} B "
        f"per registrant; median {r['bytes_per_family_median']:.0f} B, max {r['bytes_per_family_max']:.0f} B "
        "per registrant-family",
    ])


if __name__ == "__main__":
    main()
