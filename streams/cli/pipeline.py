"""``csos`` commands that run the pipeline: the local broker, topics and ACLs, the worker (Faust agents)
and the ClickHouse sink.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable

import click

from streams.cli.root import settings


@click.group()
def broker() -> None:
    """Run the local Apache Kafka broker (KRaft, fetched from Maven Central) for development."""


def _local_broker():
    from streams.tools.broker import LocalBroker

    s = settings()
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


@click.command()
@click.option("--partitions", type=int, default=None, help="Partitions per topic (default CSOS_PARTITIONS).")
def topics(partitions: int | None) -> None:
    """Create the pipeline's topics (idempotent), with explicit partitions and configs."""
    from connectors.kafka.topics import ensure_topics

    s = settings()
    created = ensure_topics(s.kafka_bootstrap, partitions or s.partitions)
    click.echo("created: " + (", ".join(created) if created else "nothing (all topics exist)"))


@click.command()
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

    s = settings()
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


@click.command()
@click.option("--loglevel", default="warning", show_default=True)
@click.option("--id", "worker_id", default=None,
              help="This worker's stable name in the consumer group (default CSOS_WORKER_ID, else host-port). "
                   "Give each worker its own and keep it across restarts: a restart then resumes at once.")
@click.option("--runtime", type=click.Choice(["faust", "kafka"]), default=None,
              help="What runs the agents: faust (streams.pipeline.app) or kafka (one confluent-kafka consumer, "
                   "streams.pipeline.kafka_worker). Default CSOS_RUNTIME, else faust. All workers of a group "
                   "must run the same one.")
def worker(loglevel: str, worker_id: str | None, runtime: str | None) -> None:
    """Run the verification, monitoring and case agents (on Faust, or on one confluent-kafka consumer).

    Run as many as there are partitions to share; each reads the PKI
    (CSOS_PKI_DIR) and the product master when its agents start.
    """
    s = settings()
    if worker_id:
        s = s.with_(worker_id=worker_id)
    if runtime:
        s = s.with_(runtime=runtime)
    if s.runtime not in ("faust", "kafka"):
        raise click.ClickException(f"CSOS_RUNTIME={s.runtime!r}: give faust or kafka")
    from connectors.kafka.metrics import serve_extra
    from streams.pipeline.event_loop import use_event_loop

    try:
        use_event_loop(s.event_loop)  # before the runtime creates its loop; an unknown loop stops the start
        run = _kafka_worker(s, loglevel) if s.runtime == "kafka" else _faust_worker(s, loglevel)
    except ValueError as exc:  # e.g. CSOS_SUPPLIER_DEA unset: refuse to start rather than verify blind
        raise click.ClickException(str(exc)) from None
    serve_extra(s.metrics_addr)  # CSOS_METRICS_ADDR: /metrics beside the 127.0.0.1 web port
    from streams.pipeline.heap import tune_collector, watch_collector

    tune_collector(s.gc_young)  # CSOS_GC_YOUNG (streams.pipeline.heap)
    watch_collector()  # csos_gc_pause_seconds; a pause over 20 ms is logged
    profile = s.profile_path  # CSOS_PROFILE: a path, write a cProfile of this worker there on exit
    if not profile:
        run()
        return
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    try:
        run()
    finally:
        prof.disable()
        prof.dump_stats(profile)


def _faust_worker(s, loglevel: str) -> Callable[[], None]:
    """The Faust worker (streams.pipeline.app), built and ready to run."""
    from faust import Worker

    from streams.pipeline.app import create_app

    app = create_app(s)
    sys.argv = sys.argv[:1]
    return lambda: Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()


def _kafka_worker(s, loglevel: str) -> Callable[[], None]:
    """The worker on the confluent-kafka runtime (streams.pipeline.kafka_worker), checked and ready to run."""
    from streams.pipeline.kafka_worker import run_kafka_worker
    from streams.pipeline.wiring import require_supplier_dea

    logging.getLogger().setLevel(loglevel.upper())  # the csos group configured logging at WARNING
    require_supplier_dea(s)  # the Faust app checks it in create_app
    return lambda: run_kafka_worker(s)


@click.command()
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
        run_sink(settings())
    except AuditKeyError as exc:
        raise click.ClickException(str(exc)) from None


#: The top-level commands of this module, added to ``csos`` by ``streams.cli``.
COMMANDS = [broker, topics, acls, worker, sink]
