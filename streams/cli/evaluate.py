"""``csos`` offline evaluation of the monitor's detectors, and the peer profiles they use.
"""
from __future__ import annotations

import sys
from typing import Any
from pathlib import Path

import click

from streams.cli.root import settings


@click.group()
def evaluate() -> None:
    """Evaluate the monitor's detectors (learned and static rules) offline, with reports to files."""


class _Progress:
    """A click progress bar on stderr whose length is known only once the data is read (``start(total)``)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar = None

    def start(self, total: int):
        self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, show_pos=True)
        self.bar.__enter__()
        return self.bar.update

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


_POLICY_HELP = ("Policy to run (repeatable): learned, static_2x_12m, static_3x_12m, static_6m_max, static_8000_du, "
                "static_customer_limit, static_any, a detector name, learned+<detector>, or a,b (these detectors).")


@evaluate.command("scenarios")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="var/evaluation", show_default=True)
@click.option("--seed", default=7, show_default=True)
@click.option("--registrants", default=150, show_default=True)
@click.option("--peers/--no-peers", default=True, show_default=True,
              help="Learn peer profiles from another scenario run (seed + 1000) and use them.")
@click.option("--policy", "policies", multiple=True, help=_POLICY_HELP + " Default: every policy.")
@click.option("--history-days", type=click.IntRange(min=0), default=0, show_default=True,
              help="The first N days are the order history before go-live (learned, buyers onboarded, not scored).")
def evaluate_scenarios(out_dir: str, seed: int, registrants: int, peers: bool, policies: tuple[str, ...],
                       history_days: int) -> None:
    """Labeled scenarios (spikes, bursts, ramp-ups, MME shifts, legitimate surges, new customers), every policy.

    These are the scenarios the thresholds were tuned on. Writes
    verdicts-<policy>.csv (one row per order line), metrics.md/.csv (recall,
    precision, false holds per 1,000, time to first hold), kinds.csv,
    episodes.csv and report.html with charts. Takes a few minutes.
    """
    from streams.tools.evaluation import run_scenarios

    with _Progress("scoring orders") as bar:
        run_scenarios(out_dir, seed=seed, peers=peers, n_registrants=registrants, policies=policies or None,
                      progress=bar.start, history_days=history_days, config=_monitor_config())
    click.echo((Path(out_dir) / "metrics.md").read_text())
    click.echo(f"report: {Path(out_dir) / 'report.html'}")


def _monitor_config() -> Any:
    """The monitor's settings from the ``SOM_*`` environment, as the worker reads them.

    A distributor backtests the monitor it runs: thresholds set in the environment must count here too.
    """
    from streams.monitoring import MonitorConfig
    try:
        return MonitorConfig.from_env()
    except ValueError as e:
        raise click.ClickException(str(e)) from None


@evaluate.command("arcos")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="var/evaluation-arcos", show_default=True)
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False),
              help="Labels CSV: TRANSACTION_ID, suspicious (1/0/grey), episode[, kind]: score against them.")
@click.option("--policy", "policies", multiple=True,
              help=_POLICY_HELP + " Default: learned and the static rules.")
@click.option("--peers", "peers_path", type=click.Path(exists=True, dir_okay=False),
              help="Peer profiles (csos peers build) for every policy's monitor.")
@click.option("--buyers", type=int, default=None, help="Backtest a random sample of this many buyers (faster).")
@click.option("--seed", default=0, show_default=True, help="Seed of the buyer sample.")
@click.option("--history-days", type=click.IntRange(min=0), default=0, show_default=True,
              help="The file's first N days are the order history before go-live: every policy learns them "
                   "as shipped, their buyers are existing customers (onboarded), and scoring starts after them.")
@click.option("--peers-from-history", is_flag=True,
              help="Build the peer profiles from the history before go-live (needs --history-days), as a "
                   "distributor would from its own order history.")
def evaluate_arcos(path: str, out_dir: str, labels_path: str | None, policies: tuple[str, ...],
                   peers_path: str | None, buyers: int | None, seed: int, history_days: int,
                   peers_from_history: bool) -> None:
    """Backtest an ARCOS transaction file (Washington Post layout): a verdict per transaction and policy.

    Writes verdicts-<policy>.csv (TRANSACTION_ID, order id, buyer, family,
    verdict, detectors that fired, case id). With --labels: recall, precision,
    false holds per 1,000 legitimate orders, episodes caught and days to first
    hold per episode kind (metrics.md, kinds.csv, episodes.csv). Without:
    holds per month, buyer and family (holds_by_month.csv). ARCOS records are
    shipped orders without signatures, so verification is skipped explicitly.
    """
    from streams.tools.evaluation import DEFAULT_POLICIES, run_arcos
    from streams.monitoring.peers import PeerProfiles

    if peers_path and peers_from_history:
        raise click.UsageError("give --peers or --peers-from-history, not both")
    with _Progress("scoring orders") as bar:
        try:
            res = run_arcos(path, out_dir, peers=PeerProfiles.load(peers_path) if peers_path else None,
                            labels=labels_path, policies=policies or DEFAULT_POLICIES, progress=bar.start,
                            buyers=buyers, seed=seed, history_days=history_days,
                            peers_from_history=peers_from_history, config=_monitor_config())
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    click.echo((Path(out_dir) / "arcos.md").read_text())
    click.echo(f"verdicts: {', '.join(v for k, v in res['files'].items() if k.startswith('verdicts_'))}")
    click.echo(f"report: {Path(out_dir) / ('report.html' if labels_path else 'arcos_report.html')}")


@evaluate.command("generate-heldout")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder for heldout-arcos.csv.gz, heldout-labels.csv and heldout-episodes.csv.")
@click.option("--seed", default=1, show_default=True, help="Same seed, same files.")
@click.option("--buyers", default=300, show_default=True, help="Established buyers (new pill mills come on top).")
@click.option("--days", default=730, show_default=True, help="Days of history.")
def evaluate_generate_heldout(out_dir: str, seed: int, buyers: int, days: int) -> None:
    """Write a labelled order history the thresholds were never tuned on (ARCOS layout + labels CSV).

    An independent generator (streams/tools/heldout_generator.py): replenishment
    ordering, other seasons and business mixes, ramps from 1.5x to 10x over
    2-9 months, spikes, frequency bursts, shifts to the strongest strength,
    new pill mills, legitimate growth. Score it with
    `csos evaluate arcos OUT/heldout-arcos.csv.gz --labels OUT/heldout-labels.csv`.
    """
    from streams.tools.heldout_generator import HeldoutConfig, write_heldout

    res = write_heldout(out_dir, HeldoutConfig(seed=seed, buyers=buyers, days=days))
    click.echo(res.describe())


@click.group()
def peers() -> None:
    """Peer-group reference data for the monitor (cold start, deviation from peers)."""


@peers.command("build")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True,
              help="Avro file to write (point SOM_PEER_PROFILES at it).")
@click.option("--arcos", "arcos_path", type=click.Path(exists=True, dir_okay=False),
              help="Learn from an ARCOS transaction file (shipments) instead of ClickHouse.")
@click.option("--released-from", "verdicts_csv", type=click.Path(exists=True, dir_okay=False),
              help="With --arcos: learn only the orders this backtest verdict CSV released "
                   "(verdicts-<policy>.csv of csos evaluate arcos).")
@click.option("--released-only", is_flag=True,
              help="With --arcos: run the default policy over the file first and learn only what it releases.")
@click.option("--registrants", "registrants_csv", type=click.Path(exists=True, dir_okay=False),
              help="Registrant CSV giving business activity and state (needed with ClickHouse).")
@click.option("--min-registrants", default=5, show_default=True, help="Smallest group used as a peer baseline.")
def peers_build(out_path: str, arcos_path: str | None, verdicts_csv: str | None, released_only: bool,
                registrants_csv: str | None, min_registrants: int) -> None:
    """Learn peer profiles from shipped orders: ClickHouse order_lines released by the monitor, or ARCOS.

    Reports the drug families of the product master and the (business
    activity, family) groups it could not cover: there the monitor falls back
    to its fixed cold-start ceilings.
    """
    from streams.monitoring.peers import build_profiles, coverage, describe_coverage

    if (verdicts_csv or released_only) and not arcos_path:
        raise click.UsageError("--released-from / --released-only apply to --arcos")
    if arcos_path:
        from connectors.sources.arcos_replay import read_arcos_detailed
        data = read_arcos_detailed(arcos_path)
        click.echo(f"{Path(arcos_path).name}: {data.describe()}")
        orders, source = data.orders, f"ARCOS {Path(arcos_path).name}"
        if verdicts_csv:
            from streams.tools.evaluation import released_order_ids
            keep = released_order_ids(verdicts_csv)
            orders = [o for o in orders if o["order_id"] in keep]
            source += f", {len(orders)} orders released in {Path(verdicts_csv).name}"
        elif released_only:
            from streams.tools.evaluation import released_orders
            from streams.monitoring import Monitor
            orders = released_orders(orders, Monitor())
            source += f", {len(orders)} orders released by the default policy"
    else:
        if not registrants_csv:
            raise click.UsageError("--registrants CSV is needed with ClickHouse (order lines carry no activity)")
        from streams.apps.peer_history import released_orders_from_clickhouse
        orders, source = released_orders_from_clickhouse(settings(), registrants_csv), "ClickHouse released orders"
    profiles = build_profiles(orders, source, min_registrants)
    profiles.save(out_path)
    usable = sum(1 for g in profiles.groups.values() if g.registrants >= min_registrants)
    click.echo(f"{out_path}: {len(profiles.groups)} peer groups ({usable} with >= {min_registrants} registrants) "
               f"from {source}, up to {profiles.built_at:%Y-%m-%d}")
    from streams.tools.simulator import default_product_master
    click.echo(describe_coverage(coverage(profiles, {p.drug_family for p in default_product_master()})))


#: The top-level commands of this module, added to ``csos`` by ``streams.cli``.
COMMANDS = [evaluate, peers]
