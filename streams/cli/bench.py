"""``csos`` measurements and soaks, each on a pipeline of its own: benchmarks, the crash soak (chaos) and
hostile input.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from streams.cli.root import settings


@click.command()
@click.option("--orders", default=10_000, show_default=True, help="About this many simulated orders.")
@click.option("--kills", default=10, show_default=True, help="SIGKILLs of the single busy worker.")
@click.option("--seed", default=5, show_default=True)
@click.option("--dir", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Working directory (broker, store, logs); default a new temporary one, kept.")
def chaos(orders: int, kills: int, seed: int, out_dir: str | None) -> None:
    """Crash soak: kill -9 a busy worker again and again, then check every order's outcome (exit 1 on any problem).

    Runs its own broker, sink and workers (nothing of yours is touched): a single worker killed
    --kills times while busy, each kill after its own progress, then one of two workers killed
    for good. Prints a table of counts (conflicting outcomes, contradicting hold/release
    messages, ClickHouse against the topics, summary against the feed, audit chain, holds
    against an unfaulted replay) and the restart and takeover times.
    """
    import tempfile

    from streams.tools.chaos import problems, render, soak

    where = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="csos-chaos-"))
    result = soak(where, orders=orders, kills=kills, seed=seed, say=click.echo)
    click.echo(render(result.counts, result.restarts, result.takeovers))
    click.echo(f"(logs and store in {where})")
    sys.exit(1 if problems(result.counts) else 0)


@click.command()
@click.option("--registrants", default=200, show_default=True, help="Simulated customers (orders scale with it).")
@click.option("--days", default=120, show_default=True, help="Days of order history to stream.")
@click.option("--seed", default=1, show_default=True)
@click.option("--rate", type=float, default=None,
              help="Publish at this many orders/s (latency below saturation); default: all at once (throughput).")
@click.option("--compare-bare", is_flag=True,
              help="Then run the same feed through a worker on the confluent-kafka runtime alone (no sink; the same "
                   "processors, tables and batch order, no Faust) and print the worker's lines per CPU-second as a "
                   "ratio of it.")
@click.option("--runtime", type=click.Choice(["faust", "kafka"]), default=None,
              help="The worker's runtime (default CSOS_RUNTIME, else faust).")
@click.option("--workers", default=1, show_default=True,
              help="Worker processes in the group. Above 1, the same feed first runs through one worker (fresh "
                   "broker each time) and the scale-out is printed as ratios: summed CPU per line, and capacity "
                   "(lines over the busiest worker's CPU-seconds: each worker on a core of its own).")
@click.option("--latency-csv", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write each timed order's broker receipt time (Unix seconds) and received -> decision "
                   "latency (ms) to this CSV: where in the run the tail happened.")
def bench(registrants: int, days: int, seed: int, rate: float | None, compare_bare: bool, runtime: str | None,
          workers: int, latency_csv: Path | None) -> None:
    """Measure end-to-end throughput and latency of one worker on the local broker.

    Uses its own data directory (CSOS_DATA_DIR/bench) and a fresh broker on
    KAFKA_BOOTSTRAP's port. Prints order lines per second (produce to verdict
    in ClickHouse), received-to-verdict latency percentiles, and the worker's
    and sink's CPU time (lines per CPU-second: comparable on a shared machine).
    With --rate the feed is paced, so the latency is that of an unsaturated pipeline.
    With --compare-bare the framework's cost is measured against the worker without Faust, on the same feed.
    """
    from streams.tools.bench import run_bench, scale_out_summary

    s = settings()
    if runtime:
        s = s.with_(runtime=runtime)
    s = s.with_(data_dir=s.data_dir / "bench", pki_dir=s.data_dir / "bench" / "pki")
    if workers <= 1:
        click.echo(run_bench(s, registrants=registrants, days=days, seed=seed, rate=rate,
                             compare_bare=compare_bare, workers=1, latency_csv=latency_csv).render())
        return
    click.echo("one worker first, for the scale-out ratio ...")
    one = run_bench(s, registrants=registrants, days=days, seed=seed, rate=rate, workers=1)
    click.echo(one.render())
    click.echo(f"then {workers} workers in one group ...")
    many = run_bench(s, registrants=registrants, days=days, seed=seed, rate=rate, compare_bare=compare_bare,
                     workers=workers)
    click.echo(many.render())
    click.echo(scale_out_summary(one, many))


@click.group()
def hostile() -> None:
    """Hostile input against a pipeline of its own (issue 9): test tooling, not a test."""


@hostile.command("soak")
@click.option("--count", default=10_000, show_default=True, help="Hostile messages to send (normal orders included).")
@click.option("--seed", default=1, show_default=True, help="Same seed, same messages.")
@click.option("--registrants", default=30, show_default=True, help="Simulated customers (signers of valid orders).")
@click.option("--timeout", default=900.0, show_default=True, help="Seconds to wait for every message's trace.")
def hostile_soak(count: int, seed: int, registrants: int, timeout: float) -> None:
    """Send COUNT hostile messages of every class and check the bar: no crash, 0 released, one trace each.

    Starts its own broker, sink and worker on free ports with data in
    CSOS_DATA_DIR/hostile, publishes a normal history, the hostile messages
    (normal orders mixed in) and a sentinel order, waits for every trace, then
    prints per class: sent, traced, released, dead-lettered, rejected, held,
    parked, failing; exits 1 if a check fails.
    """
    from streams.tools.hostile_soak import run_soak

    s = settings()
    s = s.with_(data_dir=s.data_dir / "hostile", pki_dir=s.data_dir / "hostile" / "pki")
    if not run_soak(s, count=count, seed=seed, registrants=registrants, timeout=timeout, echo=click.echo):
        sys.exit(1)


@click.command("bench-monitor")
@click.option("--registrants", default=150, show_default=True)
@click.option("--seed", default=7, show_default=True)
@click.option("--peers/--no-peers", default=True, show_default=True,
              help="With peer profiles learned from another scenario run (seed + 1000), as the evaluation.")
@click.option("--compare-lean", is_flag=True,
              help="Also run with only the deciding detectors (SOM_RECORD_ALL=0) and print the cost ratio.")
@click.option("--compare-without", default="", metavar="DETECTORS",
              help="Comma list of detectors (e.g. ramp,strength_shift,new_customer): also time the monitor "
                   "without them, interleaved with the full one (best of 3 each), and print the cost increase.")
@click.option("--instructions", is_flag=True,
              help="With --compare-without: count instructions per order under valgrind's callgrind instead of "
                   "timing (deterministic on a loaded machine; slow: use --registrants 10 or so).")
def bench_monitor(registrants: int, seed: int, peers: bool, compare_lean: bool, compare_without: str,
                  instructions: bool) -> None:
    """Monitoring cost: score + learn per order, and state bytes per registrant and drug family."""
    from streams.tools.bench_monitor import compare_without as compare, count_instructions, render, run

    if instructions and not compare_without:
        raise click.UsageError("--instructions goes with --compare-without DETECTORS")
    if instructions:
        without = tuple(n.strip() for n in compare_without.split(",") if n.strip())
        r = count_instructions(registrants, seed, peers, without)
        click.echo(f"{r['orders']} orders, instructions per order (score + learn, valgrind callgrind): without "
                   f"{', '.join(without)} {r['without']:,.0f}; with them {r['with']:,.0f}: "
                   f"{100 * (r['with'] / r['without'] - 1):+.1f} %")
        return
    if compare_without:
        without = tuple(n.strip() for n in compare_without.split(",") if n.strip())
        full, before = compare(registrants, seed, peers, without)
        click.echo(render(full))
        click.echo(f"without {', '.join(without)}: {before['us_per_order']:.0f} us per order; with them "
                   f"{full['us_per_order']:.0f} us: {100 * (full['us_per_order'] / before['us_per_order'] - 1):+.1f} % "
                   "(best of 3 interleaved runs each)")
        return
    full = run(registrants, seed, peers)
    click.echo(render(full))
    if compare_lean:
        lean = run(registrants, seed, peers, record_all=False)
        click.echo(f"only the deciding detectors (SOM_RECORD_ALL=0): {lean['us_per_order']:.0f} us per order, "
                   f"{full['us_per_order'] / lean['us_per_order']:.2f}x faster than recording every detector")


@click.command("bench-verify")
@click.option("-n", "n", default=2000, show_default=True, help="Orders per timed round.")
@click.option("--rounds", default=5, show_default=True, help="Interleaved rounds; the best of each is kept.")
def bench_verify(n: int, rounds: int) -> None:
    """Verification cost: orders/s through the verifier next to bare RSA verifies/s, in one run."""
    from streams.tools.bench_verify import render, run

    click.echo(render(run(n, rounds=rounds)))


@click.command("bench-dashboards")
@click.option("--lines", default=10_000_000, show_default=True, help="Order lines generated inside ClickHouse.")
@click.option("--registrants", default=5000, show_default=True)
@click.option("--days", default=365, show_default=True, help="Days of history, ending now.")
@click.option("--runs", default=5, show_default=True, help="Timed runs per query (the median is shown).")
@click.option("--path", type=click.Path(path_type=Path), default=Path("var/bench-dashboards"), show_default=True,
              help="Scratch embedded ClickHouse (deleted first, and after the run unless --keep).")
@click.option("--keep", is_flag=True, help="Keep the scratch store (e.g. to run `csos sql` against it).")
def bench_dashboards(lines: int, registrants: int, days: int, runs: int, path: Path, keep: bool) -> None:
    """Every dashboard query timed against generated order lines on the embedded engine (target: 200 ms each)."""
    from streams.tools.bench_dashboards import render, run

    click.echo(render(run(lines, registrants=registrants, days=days, runs=runs, path=path, keep=keep)))


@click.command("bench-sink")
@click.option("--registrants", default=40, show_default=True, help="Simulated customers (messages scale with it).")
@click.option("--days", default=120, show_default=True, help="Days of order history.")
@click.option("--seed", default=3, show_default=True)
@click.option("--batch-size", type=int, default=None, help="Messages per batch (default CSOS_SINK_BATCH_SIZE).")
@click.option("--profile", is_flag=True, help="Print the 25 costliest functions (cProfile, own time).")
@click.option("--messages", "messages_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Pickle of the generated messages: loaded if it exists, else written (same input run to run).")
def bench_sink(registrants: int, days: int, seed: int, batch_size: int | None, profile: bool,
               messages_file: Path | None) -> None:
    """The sink alone: order lines per sink CPU-second through decode -> rows -> insert (target: 20,000).

    Every message a simulated run publishes on the sink's topics, pre-encoded, fed in batches to the
    sink's own code against a scratch embedded ClickHouse; no broker.
    """
    from streams.tools.bench_sink import run

    click.echo(run(registrants=registrants, days=days, seed=seed, batch_size=batch_size, profile=profile,
                   messages_file=messages_file).render())


#: The top-level commands of this module, added to ``csos`` by ``streams.cli``.
COMMANDS = [chaos, bench, hostile, bench_monitor, bench_verify, bench_dashboards, bench_sink]
