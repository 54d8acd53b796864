"""Who may write where: on a broker that enforces ACLs, only the intake may put orders in.

Runs its own broker (free ports) with the SASL_PLAINTEXT listener, SCRAM users
for the pipeline's roles and the ACLs of ``connectors.kafka.acls``; then checks
that a principal without a grant (or an anonymous client) cannot write to
``csos.orders.received``, that the intake can, and that the whole pipeline
(Faust worker and ClickHouse sink, each as its own principal, configured only
through the KAFKA_* security variables) decides orders published by the
intake over SASL.
"""
from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from confluent_kafka import KafkaError, Producer
from confluent_kafka.admin import AclBindingFilter, AclOperation, AclPermissionType, AdminClient, \
    ResourcePatternType, ResourceType

from streams.tools.broker import LocalBroker, free_port
from streams.tools.feed import prepare_feed, publish, publish_reference_data, replay_settings
from connectors.kafka.acls import ROLES, acl_bindings, upsert_scram_users
from connectors.kafka.io import Publisher, producer_defaults
from connectors.kafka.security import KafkaSecurity
from connectors.kafka.topics import ensure_topics
from connectors.kafka import catalogue as t
from streams.cli import main as cli_main
from streams.core.config import Settings
from streams.tools.processes import sink_process, worker_process
from connectors.clickhouse.query import run_query
from tests.conftest import RUNTIMES

OUTSIDER = "outsider"  # a valid SCRAM user with no ACL at all


@dataclass
class SecuredBroker:
    broker: LocalBroker
    app_id: str
    passwords: dict[str, str]

    def env(self, user: str) -> dict[str, str]:
        """The KAFKA_* variables a process running as ``user`` gets."""
        return {"KAFKA_BOOTSTRAP": self.broker.sasl_bootstrap, "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "KAFKA_SASL_USERNAME": user,
                "KAFKA_SASL_PASSWORD": self.passwords[user]}

    def app_ids(self) -> list[str]:
        """The pipeline's CSOS_APP_ID for each worker runtime."""
        return [f"{self.app_id}-{runtime}" for runtime in RUNTIMES]

    def security(self, user: str) -> dict[str, str]:
        return KafkaSecurity.from_env(self.env(user)).librdkafka()


def _wait(what: str, check, timeout: float = 60.0) -> None:
    """Poll ``check()`` until true: users and ACLs reach the broker's authorizer asynchronously."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredBroker]:
    admin_password = secrets.token_urlsafe(18)
    broker = LocalBroker(port=free_port(), controller_port=free_port(), sasl_port=free_port(),
                         admin_password=admin_password, data_dir=tmp_path_factory.mktemp("kafka-sasl"))
    broker.start(timeout=180)
    try:
        passwords = {user: secrets.token_urlsafe(18) for user in (*ROLES, OUTSIDER)}
        passwords["admin"] = admin_password
        secured = SecuredBroker(broker, f"csos-acl-{uuid.uuid4().hex[:6]}", passwords)
        with pytest.MonkeyPatch.context() as mp:  # as an operator would: the admin's credentials in the env
            for k, v in secured.env("admin").items():
                mp.setenv(k, v)
            ensure_topics(broker.sasl_bootstrap)
            env = {f"KAFKA_PASSWORD_{role.upper()}": passwords[role] for role in ROLES}
            for app_id in secured.app_ids():  # one deployment per runtime, each with its own ACLs
                result = CliRunner().invoke(cli_main, ["acls"], env={**env, "CSOS_APP_ID": app_id})
                assert result.exit_code == 0, result.output
        admin = AdminClient(broker.admin_config())
        upsert_scram_users(admin, {OUTSIDER: passwords[OUTSIDER]})
        bindings = {str(b) for app_id in secured.app_ids() for b in acl_bindings(app_id)}
        everything = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, None, None,
                                      AclOperation.ANY, AclPermissionType.ANY)
        _wait("the ACLs", lambda: len(admin.describe_acls(everything).result()) >= len(bindings))
        _wait("the SCRAM users", lambda: _can_log_in(secured, OUTSIDER) and _can_log_in(secured, "worker"))
        yield secured
    finally:
        broker.stop()


def _can_log_in(secured: SecuredBroker, user: str) -> bool:
    client = AdminClient({"bootstrap.servers": secured.broker.sasl_bootstrap, **secured.security(user)})
    try:
        return bool(client.list_topics(timeout=2).brokers)
    except Exception:  # noqa: BLE001 - authentication not effective yet
        return False


def _produce_error(conf: dict[str, str]) -> KafkaError | None:
    """Produce one order-shaped message to csos.orders.received; the delivery error (None if written)."""
    errors: list[KafkaError | None] = []
    producer = Producer({**producer_defaults(), "message.timeout.ms": 15000, "delivery.report.only.error": False,
                         **conf})  # a report for a written message too (None)
    producer.produce(t.RECEIVED, key=b"BX0000000", value=b"forged", on_delivery=lambda err, _msg: errors.append(err))
    assert producer.flush(30) == 0
    return errors[0]


@pytest.mark.parametrize("user", [OUTSIDER, "worker", "sink", "review"])
def test_a_principal_without_the_grant_cannot_write_orders(secured: SecuredBroker, user: str) -> None:
    err = _produce_error({"bootstrap.servers": secured.broker.sasl_bootstrap, **secured.security(user)})
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err


def test_an_anonymous_client_on_the_plaintext_port_cannot_write_orders(secured: SecuredBroker) -> None:
    err = _produce_error({"bootstrap.servers": secured.broker.bootstrap})
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err


def test_the_intake_writes_orders_with_credentials_from_the_environment(
        secured: SecuredBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in secured.env("intake").items():
        monkeypatch.setenv(k, v)
    publisher = Publisher(secured.broker.sasl_bootstrap)  # no explicit credentials: KAFKA_SASL_* only
    publisher.publish(t.RECEIVED, b"BX0000000", b"not an order: the worker dead-letters it")
    publisher.flush(30)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_pipeline_decides_orders_over_sasl_each_service_as_its_own_principal(
        secured: SecuredBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runtime: str) -> None:
    data = tmp_path / "pipeline"
    settings = Settings.from_env().with_(
        kafka_bootstrap=secured.broker.sasl_bootstrap, data_dir=data, pki_dir=data / "pki", clickhouse_url="",
        web_port=free_port(), sink_port=free_port(), app_id=f"{secured.app_id}-{runtime}", runtime=runtime)
    feed = prepare_feed(settings, registrants=4, seed=5 + RUNTIMES.index(runtime), days=20, bad_counts={"tampered": 2},
                        suspicious_counts={})
    settings = replay_settings(settings, feed)  # its supplier DEA, and a receipt skew admitting its history
    for k, v in secured.env("reference").items():
        monkeypatch.setenv(k, v)
    publish_reference_data(settings, Publisher(settings.kafka_bootstrap))
    sink, worker = sink_process(settings), worker_process(settings)
    sink.extra_env.update(secured.env("sink"))
    worker.extra_env.update(secured.env("worker"))
    sink.start()
    try:
        worker.start()
        try:
            for k, v in secured.env("intake").items():
                monkeypatch.setenv(k, v)
            publish(feed.messages, Publisher(settings.kafka_bootstrap))
            # Only this feed's orders: the intake test's unreadable message may be on the topic too.
            ids = ", ".join(f"'{m.sim.sim_id}'" for m in feed.messages)
            query = (f"SELECT (SELECT count() FROM verdicts FINAL WHERE order_id IN ({ids})) + "
                     f"(SELECT count() FROM rejections FINAL WHERE order_id IN ({ids}))")
            _wait(f"{len(feed.messages)} orders decided",
                  lambda: int(run_query(settings, query)[1][0][0]) >= len(feed.messages), timeout=180)
            assert int(run_query(settings, query)[1][0][0]) == len(feed.messages)
        finally:
            worker.stop()
    finally:
        sink.stop()
