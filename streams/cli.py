"""``csos``: one entry point for operators, analysts and the demo.

Every subcommand reads the same environment (see ``streams.core.config``), so a
deployment is configured once; ``csos <command> --help`` explains each.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from datetime import date as _date
from pathlib import Path
from typing import Any

import click

from streams.core.config import Settings
from streams.core.errors import CsosError


def _settings() -> Settings:
    return Settings.from_env()


class _Csos(click.Group):
    """The one place where an error becomes a message and an exit code: any :class:`CsosError` that a command
    does not handle itself is printed as ``error [CODE]: message`` with the error's exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CsosError as exc:
            click.echo(f"error {exc.report()}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Csos, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log debug output.")
def main(verbose: bool) -> None:
    """Receive signed CSOS orders, verify them, and hold suspicious ones before they ship.

    Configuration comes from environment variables (KAFKA_BOOTSTRAP, CLICKHOUSE_URL,
    CSOS_DATA_DIR, ...); see the README.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:  # librdkafka reports transient broker states (e.g. coordinator loading) as warnings
        logging.getLogger("connectors.kafka.io.librdkafka").setLevel(logging.ERROR)


# --------------------------------------------------------------------------- broker / topics
@main.group()
def broker() -> None:
    """Run the local Apache Kafka broker (KRaft, fetched from Maven Central) for development."""


def _local_broker():
    from streams.tools.broker import LocalBroker

    s = _settings()
    port = int(s.kafka_bootstrap.rsplit(":", 1)[1])
    return LocalBroker(port=port, data_dir=s.data_dir / "kafka")


@broker.command("start")
def broker_start() -> None:
    """Fetch (first time), format and start the broker; return when it answers."""
    b = _local_broker()
    b.start()
    click.echo(f"Kafka broker ready at {b.bootstrap}")


@broker.command("stop")
def broker_stop() -> None:
    """Stop the local broker."""
    _local_broker().stop()
    click.echo("Kafka broker stopped")


@broker.command("status")
def broker_status() -> None:
    """Say whether the local broker is running."""
    b = _local_broker()
    click.echo(f"Kafka broker at {b.bootstrap}: {'running' if b.is_running() else 'stopped'}")
    sys.exit(0 if b.is_running() else 1)


@main.command()
@click.option("--partitions", type=int, default=None, help="Partitions per topic (default CSOS_PARTITIONS).")
def topics(partitions: int | None) -> None:
    """Create the pipeline's topics (idempotent), with explicit partitions and configs."""
    from connectors.kafka.topics import ensure_topics

    s = _settings()
    created = ensure_topics(s.kafka_bootstrap, partitions or s.partitions)
    click.echo("created: " + (", ".join(created) if created else "nothing (all topics exist)"))


@main.command()
@click.option("--dry-run", is_flag=True, help="Print the ACLs; change nothing.")
def acls(dry_run: bool) -> None:
    """Create the Kafka users and ACLs that confine each service (run as the super user admin).

    Connects with this process's KAFKA_SECURITY_PROTOCOL/KAFKA_SASL_* (the admin's), creates a
    SCRAM-SHA-512 user for each role whose KAFKA_PASSWORD_<ROLE> is set (intake, reference, worker,
    sink, review, warehouse), then the ACLs for CSOS_APP_ID. Idempotent; see README "Kafka security".
    """
    from confluent_kafka.admin import AdminClient

    from connectors.kafka.acls import acl_bindings, apply_acls, passwords_from_env, upsert_scram_users
    from connectors.kafka.security import client_config

    s = _settings()
    if dry_run:
        for b in acl_bindings(s.app_id):
            click.echo(f"{b.principal} {b.permission_type.name} {b.operation.name} "
                       f"{b.restype.name} {b.resource_pattern_type.name} {b.name}")
        return
    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap, **client_config()})
    users = passwords_from_env()
    upsert_scram_users(admin, users)
    bindings = apply_acls(admin, s.app_id)
    click.echo(f"users: {', '.join(users) or 'none (no KAFKA_PASSWORD_<ROLE> set)'}; {len(bindings)} ACLs for {s.app_id}")


# --------------------------------------------------------------------------- test PKI
@main.group()
def pki() -> None:
    """A CSOS-like test PKI: root CA, CSOS sub-CA, registrant certificates, CRL (TEST ONLY, not DEA's)."""


@pki.command("init")
@click.option("--force", is_flag=True, help="Replace an existing PKI in CSOS_PKI_DIR.")
def pki_init(force: bool) -> None:
    """Create a root CA and a CSOS sub-CA with an empty CRL in CSOS_PKI_DIR."""
    from streams.tools.pki import TestPKI

    s = _settings()
    if (s.pki_dir / "trust" / "root.pem").exists() and not force:
        raise click.ClickException(f"a PKI already exists in {s.pki_dir}; pass --force to replace it")
    TestPKI.create(s.pki_dir)
    click.echo(f"test PKI written to {s.pki_dir} (trust/root.pem is the trust anchor, crl/ the CRL)")


@pki.command("issue")
@click.option("--dea", "dea_number", required=True, help="The registrant's DEA number.")
@click.option("--name", required=True, help="Subscriber / registrant name.")
@click.option("--schedules", default="2,2N,3,3N,4,5", show_default=True, help="Authorized schedules, comma-separated.")
@click.option("--days", default=365, show_default=True, help="Validity in days from now.")
@click.option("--key-type", type=click.Choice(["rsa", "ec"]), default="rsa", show_default=True)
def pki_issue(dea_number: str, name: str, schedules: str, days: int, key_type: str) -> None:
    """Issue a registrant certificate carrying the DEA number and schedules in the configured extensions."""
    from datetime import datetime, timedelta, timezone

    from streams.tools.pki import load_pki

    from streams.domain.identifiers import is_valid_dea_number

    if not is_valid_dea_number(dea_number):
        raise click.ClickException(f"{dea_number} is not a valid DEA number (format or check digit)")
    s = _settings()
    p = load_pki(s.pki_dir)
    now = datetime.now(timezone.utc)
    cred = p.issue_registrant(dea_number, name, [x.strip() for x in schedules.split(",") if x.strip()],
                              not_before=now - timedelta(minutes=5), not_after=now + timedelta(days=days),
                              key_type=key_type)
    p.write_pki(s.pki_dir)
    click.echo(f"issued serial {cred.serial:x} to {dea_number}: {s.pki_dir / 'registrants' / dea_number}")


@pki.command("revoke")
@click.option("--dea", "dea_number", required=True, help="Revoke this registrant's certificate.")
def pki_revoke(dea_number: str) -> None:
    """Revoke a registrant certificate and publish a new CRL file (workers read CRLs at start)."""
    from streams.tools.pki import load_pki

    s = _settings()
    p = load_pki(s.pki_dir)
    cred = p.registrants.get(dea_number)
    if cred is None:
        raise click.ClickException(f"no certificate for {dea_number} in {s.pki_dir}")
    p.revoke(cred.serial)
    p.write_pki(s.pki_dir)
    click.echo(f"revoked serial {cred.serial:x} ({dea_number}); CRL rewritten in {s.pki_dir / 'crl'}")


@main.group()
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

    s = _settings()
    paths = [Path(f) for f in files] or sorted((s.pki_dir / "crl").glob("*.crl"))
    if not paths:
        raise click.ClickException("no CRL files given and none in CSOS_PKI_DIR/crl")
    for issuer in publish_crls(Publisher(s.kafka_bootstrap), paths):
        click.echo(f"published CRL of {issuer}")


@main.group()
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
    n = publish_registrants(Publisher(_settings().kafka_bootstrap), records)
    click.echo(f"published {n} registrations" + (f"; {len(refused)} rows refused" if refused else ""))
    if refused:
        sys.exit(1)


# --------------------------------------------------------------------------- simulated warehouse feed
@main.group()
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

    s = _settings()
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

    s = _settings()
    path = Path(feed_path) if feed_path else s.data_dir / "feed.avro"
    if not path.exists():
        raise click.ClickException(f"{path} not found; run `csos simulate prepare` first")
    issuers, n_reg = publish_reference_data(s, Publisher(s.kafka_bootstrap))
    click.echo(f"published {len(issuers)} CRL(s) and {n_reg} registrations")
    records = list(load_feed(path))
    with click.progressbar(length=len(records), label="orders sent", show_pos=True) as bar:
        n = publish(records, Publisher(s.kafka_bootstrap), progress=bar.update)
    click.echo(f"published {n} orders to {s.kafka_bootstrap}")


# --------------------------------------------------------------------------- worker
@main.command()
@click.option("--loglevel", default="warning", show_default=True)
@click.option("--id", "worker_id", default=None,
              help="This worker's stable name in the consumer group (default CSOS_WORKER_ID, else host-port). "
                   "Give each worker its own and keep it across restarts: a restart then resumes at once.")
def worker(loglevel: str, worker_id: str | None) -> None:
    """Run the verification and monitoring agents (Faust worker).

    Run as many as there are partitions to share; each reads the PKI
    (CSOS_PKI_DIR) and the product master when its agents start.
    """
    from faust import Worker

    from streams.pipeline.app import create_app

    s = _settings()
    if worker_id:
        s = s.with_(worker_id=worker_id)
    try:
        app = create_app(s)
    except ValueError as exc:  # e.g. CSOS_SUPPLIER_DEA unset: refuse to start rather than verify blind
        raise click.ClickException(str(exc)) from None
    sys.argv = sys.argv[:1]
    from connectors.kafka.metrics import serve_extra

    serve_extra(s.metrics_addr)  # CSOS_METRICS_ADDR: /metrics beside the 127.0.0.1 web port
    profile = os.environ.get("CSOS_PROFILE")  # a path: write a cProfile of this worker there on exit
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        try:
            Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()
        finally:
            prof.disable()
            prof.dump_stats(profile)
    else:
        Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()


@main.command()
def sink() -> None:
    """Write verified orders, rejections, verdicts, audit events and dead letters to ClickHouse.

    With the embedded engine exactly one sink may run per data directory (the
    engine locks it); it also serves read-only SQL on 127.0.0.1:CSOS_SINK_PORT
    for `csos sql`. With CLICKHOUSE_URL pointing at a server, run several.
    With CSOS_AUDIT_KEY set, audit events are sealed with HMAC-SHA256 under that key.
    """
    from connectors.clickhouse.audit_chain import AuditKeyError
    from streams.pipeline.sink_service import run_sink

    logging.getLogger().setLevel(logging.INFO)
    try:
        run_sink(_settings())
    except AuditKeyError as exc:
        raise click.ClickException(str(exc)) from None


# --------------------------------------------------------------------------- analyst
@main.command()
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "tsv"]), default="table", show_default=True)
def sql(query: str, fmt: str) -> None:
    """Run one read-only SELECT against the verdicts, rejections, order lines and audit events.

    While `csos sink` owns the embedded store the query goes through its /sql
    endpoint (with its token: CSOS_SQL_TOKEN or $CSOS_DATA_DIR/sink-token);
    otherwise the store (or CLICKHOUSE_URL) is opened read-only. Anything but
    one SELECT / WITH ... SELECT (INTO OUTFILE, SETTINGS, SYSTEM, file(), ...)
    is refused.
    Tables use ReplacingMergeTree: add FINAL for exact counts, e.g.
    csos sql "SELECT verdict, count() FROM verdicts FINAL GROUP BY verdict"
    """
    from connectors.clickhouse.query import QueryError, format_table, run_query

    try:
        columns, rows = run_query(_settings(), query)
    except QueryError as exc:
        raise click.ClickException(str(exc)) from None
    if fmt == "json":
        click.echo(json.dumps([dict(zip(columns, r)) for r in rows], default=str, indent=1))
    elif fmt == "tsv":
        click.echo("\t".join(columns))
        for r in rows:
            click.echo("\t".join("" if v is None else str(v) for v in r))
    else:
        click.echo(format_table(columns, rows))


@main.group()
def audit() -> None:
    """The tamper-evident audit trail: every audit event is hash-chained as the sink stores it."""


@audit.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (it doubles as an --anchors file).")
@click.option("--anchors", "anchors_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON from an earlier `csos audit verify --json`: each chain must still hold that head hash.")
@click.option("--allow-unsealed", is_flag=True, help="Do not count rows written before chaining as problems.")
@click.option("--chain", "chains", multiple=True, help="Check only this chain, e.g. audit.events/0 (repeatable).")
@click.option("--page-size", default=10_000, show_default=True, help="Events per query.")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Keys for keyed chains, one per line (hex or base64; # comments), in addition to "
                   "CSOS_AUDIT_KEY and CSOS_AUDIT_OLD_KEYS.")
@click.option("--allow-unkeyed", is_flag=True,
              help="With keys: accept events sealed without a key before a chain's first keyed event.")
def audit_verify(as_json: bool, anchors_file: str | None, allow_unsealed: bool, chains: tuple[str, ...],
                 page_size: int, key_file: str | None, allow_unkeyed: bool) -> None:
    """Check every audit chain in ClickHouse; report each gap, edit, reordering or duplicate (exit 1 if any).

    Prints per chain the events checked, the seq and Kafka offset range, the
    ids of the keys that sealed it and the head hash. Keep the head hashes
    outside ClickHouse (e.g. save --json) and pass them back with --anchors:
    that also catches a rewritten or truncated chain. Keyed events are checked
    with the key they name (CSOS_AUDIT_KEY, CSOS_AUDIT_OLD_KEYS, --key-file):
    one whose key is not given is UNVERIFIABLE; with keys, one sealed without
    a key is UNKEYED. Reads like `csos sql`: through the running sink, else read-only.
    """
    from connectors.clickhouse.audit_chain import AuditKeyError, KeyRing, load_anchors, render, verify_store

    from connectors.clickhouse.query import open_reader

    settings = _settings()
    try:
        keys = KeyRing.from_settings(settings, Path(key_file).read_text() if key_file else "")
    except AuditKeyError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    anchors = load_anchors(json.loads(Path(anchors_file).read_text())) if anchors_file else None
    try:
        with open_reader(settings) as read:
            report = verify_store(lambda sql: read(sql)[1], anchors=anchors, page_size=page_size, allow_unsealed=allow_unsealed,
                                  only=chains, keys=keys, allow_unkeyed=allow_unkeyed)
    except Exception as exc:  # noqa: BLE001 - store unreachable or locked: say so, exit 2
        click.echo(f"Error: cannot read the audit trail: {str(exc).strip().splitlines()[0]}", err=True)
        sys.exit(2)
    click.echo(json.dumps(report.to_json(), indent=1) if as_json else render(report))
    sys.exit(0 if report.ok else 1)


@audit.command("new-key")
def audit_new_key() -> None:
    """Print a new key for CSOS_AUDIT_KEY (32 random bytes as 64 hex digits); its key id goes to stderr.

    Keep it in your secret store, not in ClickHouse or the repository. To
    rotate: move the current key to CSOS_AUDIT_OLD_KEYS (verifiers only),
    set the new one and restart the sink.
    """
    from connectors.clickhouse.audit_chain import AuditKey, new_key

    key = new_key()
    click.echo(key)
    click.echo(f"key id: {AuditKey.parse(key).key_id}", err=True)


@main.command()
def summary() -> None:
    """Print what happened to every order: received, verified, rejected by reason, released, held by reason."""
    from streams.apps.summary import fetch_summary

    click.echo(fetch_summary(_settings()).render())


@main.command()
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


# --------------------------------------------------------------------------- review page
@main.group(invoke_without_command=True)
@click.pass_context
def review(ctx: click.Context) -> None:
    """Serve the review page for held orders on 127.0.0.1:CSOS_REVIEW_PORT (default 6068).

    Users come from CSOS_REVIEW_USERS (default $CSOS_DATA_DIR/review-users.json; create them with
    `csos review add-user`); session cookies are sealed with CSOS_REVIEW_SECRET (`csos review
    new-secret` makes one). Analysts may release, report or cancel; viewers may only read.
    """
    if ctx.invoked_subcommand is not None:
        return
    from streams.apps.review.server import run_review
    from streams.apps.review.web import ReviewConfig

    logging.getLogger().setLevel(logging.INFO)
    s = _settings()
    try:
        config = ReviewConfig.from_env(s)
        run_review(s, config)
    except ValueError as exc:  # e.g. a CSOS_REVIEW_SECRET that is not a Fernet key
        raise click.ClickException(f"{exc} (make a key with `csos review new-secret`)") from None


def _review_store():
    from streams.apps.review.auth import UserStore
    from streams.apps.review.web import users_path

    return UserStore(users_path(_settings()))


@review.command("add-user")
@click.argument("name")
@click.option("--role", type=click.Choice(["analyst", "viewer"]), required=True,
              help="analyst: may release, report and cancel; viewer: read only.")
def review_add_user(name: str, role: str) -> None:
    """Create NAME (or replace its role and password). The password comes from CSOS_REVIEW_PASSWORD, else a prompt."""
    from streams.apps.review.auth import UserError

    password = os.environ.get("CSOS_REVIEW_PASSWORD") or click.prompt(
        f"Password for {name}", hide_input=True, confirmation_prompt=True)
    store = _review_store()
    try:
        store.add(name, role, password)
    except UserError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{name} ({role}) saved in {store.path}")


@review.command("remove-user")
@click.argument("name")
def review_remove_user(name: str) -> None:
    """Remove NAME; a logged-in session of NAME ends at its next request."""
    store = _review_store()
    if not store.remove(name):
        raise click.ClickException(f"no user {name} in {store.path}")
    click.echo(f"{name} removed from {store.path}")


@review.command("users")
def review_users() -> None:
    """List the users and their roles."""
    for name, role in sorted(_review_store().users().items()):
        click.echo(f"{name}\t{role}")


@review.command("new-secret")
def review_new_secret() -> None:
    """Print a new key for CSOS_REVIEW_SECRET (Fernet: 32 random bytes, URL-safe base64)."""
    from cryptography.fernet import Fernet

    click.echo(Fernet.generate_key().decode("ascii"))


# --------------------------------------------------------------------------- demo
@main.command()
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

    run_demo(_settings(), registrants=registrants, seed=seed, days=days, keep_running=keep_running)


# --------------------------------------------------------------------------- benchmark
@main.command()
@click.option("--registrants", default=200, show_default=True, help="Simulated customers (orders scale with it).")
@click.option("--days", default=120, show_default=True, help="Days of order history to stream.")
@click.option("--seed", default=1, show_default=True)
@click.option("--rate", type=float, default=None,
              help="Publish at this many orders/s (latency below saturation); default: all at once (throughput).")
def bench(registrants: int, days: int, seed: int, rate: float | None) -> None:
    """Measure end-to-end throughput and latency of one worker on the local broker.

    Uses its own data directory (CSOS_DATA_DIR/bench) and a fresh broker on
    KAFKA_BOOTSTRAP's port. Prints order lines per second (produce to verdict
    in ClickHouse), received-to-verdict latency percentiles, and the worker's
    and sink's CPU time (lines per CPU-second: comparable on a shared machine).
    With --rate the feed is paced, so the latency is that of an unsaturated pipeline.
    """
    from streams.tools.bench import run_bench

    s = _settings()
    s = s.with_(data_dir=s.data_dir / "bench", pki_dir=s.data_dir / "bench" / "pki")
    click.echo(run_bench(s, registrants=registrants, days=days, seed=seed, rate=rate).render())



@main.group()
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

    s = _settings()
    s = s.with_(data_dir=s.data_dir / "hostile", pki_dir=s.data_dir / "hostile" / "pki")
    if not run_soak(s, count=count, seed=seed, registrants=registrants, timeout=timeout, echo=click.echo):
        sys.exit(1)

@main.group()
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
def evaluate_scenarios(out_dir: str, seed: int, registrants: int, peers: bool, policies: tuple[str, ...]) -> None:
    """Labeled scenarios (spikes, bursts, ramp-ups, MME shifts, legitimate surges, new customers), every policy.

    These are the scenarios the thresholds were tuned on. Writes
    verdicts-<policy>.csv (one row per order line), metrics.md/.csv (recall,
    precision, false holds per 1,000, time to first hold), kinds.csv,
    episodes.csv and report.html with charts. Takes a few minutes.
    """
    from streams.tools.evaluation import run_scenarios

    with _Progress("scoring orders") as bar:
        run_scenarios(out_dir, seed=seed, peers=peers, n_registrants=registrants, policies=policies or None,
                      progress=bar.start)
    click.echo((Path(out_dir) / "metrics.md").read_text())
    click.echo(f"report: {Path(out_dir) / 'report.html'}")


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
def evaluate_arcos(path: str, out_dir: str, labels_path: str | None, policies: tuple[str, ...],
                   peers_path: str | None, buyers: int | None, seed: int) -> None:
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

    with _Progress("scoring orders") as bar:
        try:
            res = run_arcos(path, out_dir, peers=PeerProfiles.load(peers_path) if peers_path else None,
                            labels=labels_path, policies=policies or DEFAULT_POLICIES, progress=bar.start,
                            buyers=buyers, seed=seed)
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


@main.group()
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
        orders, source = released_orders_from_clickhouse(_settings(), registrants_csv), "ClickHouse released orders"
    profiles = build_profiles(orders, source, min_registrants)
    profiles.save(out_path)
    usable = sum(1 for g in profiles.groups.values() if g.registrants >= min_registrants)
    click.echo(f"{out_path}: {len(profiles.groups)} peer groups ({usable} with >= {min_registrants} registrants) "
               f"from {source}, up to {profiles.built_at:%Y-%m-%d}")
    from streams.tools.simulator import default_product_master
    click.echo(describe_coverage(coverage(profiles, {p.drug_family for p in default_product_master()})))


@main.command("replay-arcos")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def replay_arcos(path: str) -> None:
    """Stream an ARCOS file onto csos.orders.verified (skipping verification: ARCOS has no signatures)."""
    from connectors.sources.arcos_replay import publish_arcos
    from connectors.kafka.io import Publisher

    n = publish_arcos(path, Publisher(_settings().kafka_bootstrap))
    click.echo(f"published {n} ARCOS orders to csos.orders.verified ('null'/empty ORDER_FORM_NO rows: one order each)")


@main.command("bench-monitor")
@click.option("--registrants", default=150, show_default=True)
@click.option("--seed", default=7, show_default=True)
@click.option("--peers/--no-peers", default=True, show_default=True,
              help="With peer profiles learned from another scenario run (seed + 1000), as the evaluation.")
@click.option("--compare-lean", is_flag=True,
              help="Also run with only the deciding detectors (SOM_RECORD_ALL=0) and print the cost ratio.")
@click.option("--compare-without", default="", metavar="DETECTORS",
              help="Comma list of detectors (e.g. ramp,strength_shift,new_customer): also time the monitor "
                   "without them, interleaved with the full one (best of 3 each), and print the cost increase.")
def bench_monitor(registrants: int, seed: int, peers: bool, compare_lean: bool, compare_without: str) -> None:
    """Monitoring cost: score + learn per order, and state bytes per registrant and drug family."""
    from streams.tools.bench_monitor import compare_without as compare, render, run

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


@main.command("bench-verify")
@click.option("-n", "n", default=2000, show_default=True, help="Orders per timed round.")
@click.option("--rounds", default=5, show_default=True, help="Interleaved rounds; the best of each is kept.")
def bench_verify(n: int, rounds: int) -> None:
    """Verification cost: orders/s through the verifier next to bare RSA verifies/s, in one run."""
    from streams.tools.bench_verify import render, run

    click.echo(render(run(n, rounds=rounds)))


@main.command("bench-dashboards")
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


# --------------------------------------------------------------------------- archive and offline verification
@main.group()
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

    s = _settings()
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


@main.command("verify-offline")
@click.option("--document", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The order document (omit when the signature carries it).")
@click.option("--signature", type=click.Path(exists=True, dir_okay=False), default=None, help="CMS SignedData (DER).")
@click.option("--certificate", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Instead of an order: judge this certificate (DER or PEM) alone, path, validity and "
                   "revocation at --received-at.")
@click.option("--trust", "trust_dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="Trust anchors (root*.pem) and intermediates (*.pem), or a PKI directory with trust/.")
@click.option("--crl", "crls", type=click.Path(exists=True, dir_okay=False), multiple=True,
              help="CRL current at receipt (repeatable): the sub-CA's and the root's.")
@click.option("--received-at", required=True, help="When the order was received (ISO 8601, UTC if no zone).")
@click.option("--format", "fmt", type=click.Choice(["csos-order/1", "x12-850"]), default="csos-order/1",
              show_default=True)
@click.option("--products", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Product master CSV (default CSOS_PRODUCTS).")
def verify_offline(document: str | None, signature: str | None, certificate: str | None, trust_dir: str,
                   crls: tuple[str, ...], received_at: str, fmt: str, products: str | None) -> None:
    """Re-verify one order offline and print every check with its result (exit 1 if invalid).

    Whatever the files hold, it prints a report (unusable CRLs and certificates as
    "refused" lines) or a one-line error, exit status 2; never a traceback.
    """
    from datetime import datetime, timezone

    from streams.apps.offline_verify import check_certificate_offline, render, render_certificate, reverify

    if (signature is None) == (certificate is None):
        raise click.UsageError("give --signature (an order) or --certificate (a certificate alone)")
    try:
        at = datetime.fromisoformat(received_at)
    except ValueError:
        raise click.BadParameter(f"{received_at!r} is not an ISO 8601 time", param_hint="--received-at") from None
    at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
    try:
        if certificate is not None:
            finding, refusals = check_certificate_offline(Path(certificate).read_bytes(), Path(trust_dir),
                                                          [Path(c) for c in crls], at)
            click.echo(render_certificate(finding, refusals, at=at))
            sys.exit(0 if finding.ok else 1)
        outcome = reverify(Path(document).read_bytes() if document else None, Path(signature).read_bytes(),
                           Path(trust_dir), [Path(c) for c in crls],
                           Path(products) if products else _settings().products_path, at, fmt)
    except Exception as exc:  # noqa: BLE001 - any input gives a one-line error, never a traceback
        lines = str(exc).strip().splitlines()
        error = click.ClickException(f"cannot verify: {lines[0] if lines else exc.__class__.__name__}")
        error.exit_code = 2  # 1 means "verified: invalid"
        raise error from None
    click.echo(render(outcome, received_at=at))
    sys.exit(0 if outcome.ok else 1)


# --------------------------------------------------------------------------- regulatory reports
@main.group()
def reports() -> None:
    """Daily reports for DEA: suspicious orders (1301.74(b)) and CSOS orders filled (1305.29)."""


def _report_day(value: str | None) -> _date:
    from datetime import datetime, timedelta, timezone

    if value is None:  # yesterday (UTC): the last complete day
        return datetime.now(timezone.utc).date() - timedelta(days=1)
    try:
        return _date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date (YYYY-MM-DD)") from None


_day_option = click.option("--date", "day", default=None, help="UTC day, YYYY-MM-DD (default: yesterday).")
_out_option = click.option("--out", "out_dir", type=click.Path(file_okay=False), default="reports", show_default=True)


@reports.command("suspicious")
@_day_option
@_out_option
def reports_suspicious(day: str | None, out_dir: str) -> None:
    """Write suspicious-orders-DAY.csv and .json: every order reported to DEA on DAY, line by line."""
    from connectors.clickhouse.query import run_query
    from streams.apps.reports import write_suspicious_order_report

    s = _settings()
    w = write_suspicious_order_report(lambda sql: run_query(s, sql), _report_day(day), Path(out_dir))
    click.echo(f"{w.rows} reported line(s) -> {w.csv_path}, {w.json_path}")


@reports.command("fills")
@_day_option
@_out_option
def reports_fills(day: str | None, out_dir: str) -> None:
    """Write csos-fill-report-DAY.csv and .json: every order line shipped on DAY (exit 1 if any is an exception)."""
    from connectors.clickhouse.query import run_query
    from streams.apps.reports import business_days_after, write_fill_report

    s = _settings()
    d = _report_day(day)
    w = write_fill_report(lambda sql: run_query(s, sql), d, Path(out_dir))
    click.echo(f"{w.rows} shipped line(s), due at DEA by {business_days_after(d, 2)} -> {w.csv_path}, {w.json_path}")
    if w.exceptions:
        click.echo(f"{w.exceptions} line(s) need investigating (see the exception column)", err=True)
        sys.exit(1)


@main.group()
def warehouse() -> None:
    """A stand-in warehouse for demos: ships released orders and confirms the shipments."""


@warehouse.command("ship")
def warehouse_ship() -> None:
    """Confirm a full shipment of every order released so far (on warehouse.shipments)."""
    from connectors.kafka.io import Publisher
    from streams.tools.warehouse import released_orders, ship

    s = _settings()
    n = ship(Publisher(s.kafka_bootstrap), released_orders(s.kafka_bootstrap))
    click.echo(f"{n} shipment confirmation(s) sent")


if __name__ == "__main__":  # pragma: no cover
    main()
