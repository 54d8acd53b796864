"""``csos`` commands that bring data in: reference data (CRLs, registrants), the simulated feed and the demo,
ARCOS replay, the archive export and the stand-in warehouse.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from streams.cli.root import settings


@click.group()
def crl() -> None:
    """Certificate revocation lists: distribute them to every worker over the compacted pki.crl topic."""


@crl.command("publish")
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False))
def crl_publish(files: tuple[str, ...]) -> None:
    """Publish CRL files (DER or PEM); every worker verifies and loads them within a second.

    With no FILES, publishes CSOS_PKI_DIR/crl/*.crl. Orders parked for
    "revocation status unknown" are re-verified against the new CRL.
    """
    from connectors.kafka.io import Publisher
    from connectors.sources.reference_publish import publish_crls

    s = settings()
    paths = [Path(f) for f in files] or sorted((s.pki_dir / "crl").glob("*.crl"))
    if not paths:
        raise click.ClickException("no CRL files given and none in CSOS_PKI_DIR/crl")
    for issuer in publish_crls(Publisher(s.kafka_bootstrap), paths):
        click.echo(f"published CRL of {issuer}")


@click.group()
def registrants() -> None:
    """The registrant directory: DEA registrations and their status, on the compacted registrants topic."""


@registrants.command("load")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def registrants_load(file: str) -> None:
    """Load a registrant CSV: dea_number, name[, business_activity, state, schedules, status, expires_on].

    status is ACTIVE unless given (anything else refuses the registrant's
    orders); expires_on is YYYY-MM-DD. Orders from DEA numbers not in the
    directory are parked until they are loaded (CSOS_REQUIRE_REGISTRATION=0
    turns the check off).
    """
    from connectors.kafka.io import Publisher
    from connectors.sources.reference_publish import publish_registrants, read_registrant_file

    records, refused = read_registrant_file(Path(file))
    for line in refused:
        click.echo(f"refused {line}", err=True)
    n = publish_registrants(Publisher(settings().kafka_bootstrap), records)
    click.echo(f"published {n} registrations" + (f"; {len(refused)} rows refused" if refused else ""))
    if refused:
        sys.exit(1)


@click.group()
def simulate() -> None:
    """A simulated warehouse feed: realistic registrants, good, bad and suspicious signed orders.

    `simulate prepare` issues certificates and writes the trust anchors the
    worker loads at start, so run it before starting the worker; `simulate
    publish` then puts the CRL and the registrant file on their topics and
    streams the orders.
    """


@simulate.command("prepare")
@click.option("--registrants", default=60, show_default=True)
@click.option("--days", default=120, show_default=True)
@click.option("--seed", default=7, show_default=True)
@click.option("--bad-fraction", default=0.05, show_default=True, help="Share of bad orders (every kind).")
@click.option("--suspicious-fraction", default=0.02, show_default=True, help="Share of suspicious orders.")
def simulate_prepare(registrants: int, days: int, seed: int, bad_fraction: float, suspicious_fraction: float) -> None:
    """Generate and sign the feed; write the PKI, registrants.csv, labels.csv and feed.avro to CSOS_DATA_DIR."""
    from streams.tools.feed import prepare_feed, replay_settings, save_feed
    from streams.tools.pki import load_pki

    s = settings()
    existing = load_pki(s.pki_dir) if (s.pki_dir / "trust" / "root.pem").exists() else None
    with click.progressbar(length=1, label="signing orders", show_pos=True) as bar:
        def tick(n: int) -> None:
            bar.length = max(bar.length or 1, bar.pos + n + 1)
            bar.update(n)
        feed = prepare_feed(s, registrants=registrants, seed=seed, days=days, bad_fraction=bad_fraction,
                            suspicious_fraction=suspicious_fraction, pki=existing, progress=tick)
    path = save_feed(feed, s.data_dir / "feed.avro")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(feed.expected().items()))
    replay = replay_settings(s, feed)
    click.echo(f"{len(feed.messages)} orders ({feed.lines} lines) in {path}\nexpected outcomes: {counts}\n"
               f"ground truth: {feed.labels_path}\n"
               f"the worker verifying this replayed history needs (see README, Verification):\n"
               f"  export CSOS_SUPPLIER_DEA={replay.supplier_dea} "
               f"CSOS_RECEIPT_SKEW_SECONDS={replay.receipt_skew_seconds:.0f}")


@simulate.command("publish")
@click.option("--feed", "feed_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Feed file (default CSOS_DATA_DIR/feed.avro).")
def simulate_publish(feed_path: str | None) -> None:
    """Publish the simulated CRL and registrant file, then stream the prepared feed onto csos.orders.received."""
    from streams.tools.feed import load_feed, publish, publish_reference_data
    from connectors.kafka.io import Publisher

    s = settings()
    path = Path(feed_path) if feed_path else s.data_dir / "feed.avro"
    if not path.exists():
        raise click.ClickException(f"{path} not found; run `csos simulate prepare` first")
    issuers, n_reg = publish_reference_data(s, Publisher(s.kafka_bootstrap))
    click.echo(f"published {len(issuers)} CRL(s) and {n_reg} registrations")
    records = list(load_feed(path))
    with click.progressbar(length=len(records), label="orders sent", show_pos=True) as bar:
        n = publish(records, Publisher(s.kafka_bootstrap), progress=bar.update)
    click.echo(f"published {n} orders to {s.kafka_bootstrap}")


@click.command()
@click.option("--registrants", default=60, show_default=True, help="Simulated customers.")
@click.option("--days", default=120, show_default=True, help="Days of order history to simulate.")
@click.option("--seed", default=7, show_default=True, help="Simulation seed (same seed, same orders).")
@click.option("--keep-running", is_flag=True, help="Leave the broker and the worker running afterwards.")
def demo(registrants: int, days: int, seed: int, keep_running: bool) -> None:
    """Run the whole pipeline on simulated orders and print the compliance summary.

    Starts a local Kafka broker (fetched from Maven Central the first time),
    creates the topics, builds a test CSOS PKI and a customer population with
    good, bad and suspicious orders, runs a worker, streams the orders, and
    prints what happened to each - next to the simulator's ground truth.
    Afterwards `csos sql` queries the results (stored under CSOS_DATA_DIR).
    """
    from streams.tools.demo import run_demo

    run_demo(settings(), registrants=registrants, seed=seed, days=days, keep_running=keep_running)


@click.command("replay-arcos")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def replay_arcos(path: str) -> None:
    """Stream an ARCOS file onto csos.orders.verified (skipping verification: ARCOS has no signatures)."""
    from connectors.sources.arcos_replay import publish_arcos
    from connectors.kafka.io import Publisher

    n = publish_arcos(path, Publisher(settings().kafka_bootstrap))
    click.echo(f"published {n} ARCOS orders to csos.orders.verified ('null'/empty ORDER_FORM_NO rows: one order each)")


@click.group()
def archive() -> None:
    """The two-year archive of every order received: exact bytes, signature and certificates."""


@archive.command("export")
@click.option("--order-number", required=True, help="The CSOS order number, e.g. 26X000123.")
@click.option("--purchaser", default=None, help="Purchaser DEA number (order numbers are unique per purchaser).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=".", show_default=True)
def archive_export(order_number: str, purchaser: str | None, out_dir: str) -> None:
    """Write every archived order with this number (replays included) with its signature, chain and manifest.

    With the embedded engine run it while `csos sink` is stopped (the engine
    admits one process); with CLICKHOUSE_URL it runs any time.
    """
    from streams.apps.archive import ArchiveNotFound, export_order
    from connectors.clickhouse.client import open_client

    s = settings()
    try:
        client = open_client(s, readonly=True)
    except Exception as exc:  # noqa: BLE001
        raise click.ClickException(f"cannot open ClickHouse ({str(exc).splitlines()[0]}); "
                                   "with the embedded engine stop `csos sink` first") from None
    try:
        for path in export_order(client, order_number, purchaser, Path(out_dir)):
            click.echo(str(path))
    except ArchiveNotFound as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        client.close()


@click.group()
def warehouse() -> None:
    """A stand-in warehouse for demos: ships released orders and confirms the shipments."""


@warehouse.command("ship")
def warehouse_ship() -> None:
    """Confirm a full shipment of every order released so far (on warehouse.shipments)."""
    from connectors.kafka.io import Publisher
    from streams.tools.warehouse import released_orders, ship

    s = settings()
    n = ship(Publisher(s.kafka_bootstrap), released_orders(s.kafka_bootstrap))
    click.echo(f"{n} shipment confirmation(s) sent")


#: The top-level commands of this module, added to ``csos`` by ``streams.cli``.
COMMANDS = [crl, registrants, simulate, demo, replay_arcos, archive, warehouse]
