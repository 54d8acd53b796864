"""Idempotent topic administration: create and align the topics of the catalogue (``connectors.kafka.catalogue``).

Why explicit creation: the local broker runs with
``auto.create.topics.enable=false`` (as production clusters usually do), so a
misspelt topic name fails loudly instead of silently creating an empty topic
with default settings. Faust creates only its *internal* topics (table
changelogs, the assignor leader topic, repartition topics) through the admin
API; every catalogue topic must exist before a worker starts, which is what
:func:`ensure_topics` is for.

Partition counts matter beyond throughput: Faust tables are co-partitioned
with the stream that updates them, and Faust creates changelog topics with
``topic_partitions`` partitions. Keep the Faust app's ``topic_partitions``
equal to :func:`default_partitions` so source topics and changelogs line up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic, ResourceType

from connectors.kafka.catalogue import TOPICS, TopicSpec
from connectors.kafka.security import client_config
from streams.core.config import KafkaSettings, Settings

__all__ = [
    "default_partitions",
    "replication_factor",
    "topic_config",
    "ensure_topics",
    "align_configs",
    "delete_topics",
]

log = logging.getLogger(__name__)


def default_partitions() -> int:
    """Partitions per topic: ``$CSOS_PARTITIONS`` or 4.

    The same variable sets the Faust app's ``topic_partitions`` (streams.core.config),
    so table changelogs always line up with their source topics.
    """
    return Settings.from_env().partitions


def replication_factor() -> int:
    """Replicas per topic: ``$KAFKA_REPLICATION_FACTOR`` or 1 (local single broker)."""
    rf = KafkaSettings.from_env().replication_factor
    if rf < 1:
        raise ValueError(f"KAFKA_REPLICATION_FACTOR must be >= 1, got {rf}")
    return rf


def topic_config(spec: TopicSpec, rf: int) -> dict[str, str]:
    """The topic-level config to create ``spec`` with at replication ``rf``.

    ``min.insync.replicas`` is only set with more than one replica: on a
    single broker it could only be 1, the default. With replicas it is
    ``min(2, rf - 1)`` so that ``acks=all`` writes survive one broker down.
    """
    config = {k: str(v) for k, v in spec.config.items()}
    if rf > 1:
        config.setdefault("min.insync.replicas", str(min(2, rf - 1)))
    return config


def _admin(bootstrap: str) -> AdminClient:
    return AdminClient(
        {"bootstrap.servers": bootstrap, **client_config()},
        logger=logging.getLogger("connectors.kafka.topics.librdkafka"),
    )


def _wait_for_leaders(admin: AdminClient, names: Iterable[str], timeout: float) -> None:
    """Wait until every partition of ``names`` has a leader.

    CreateTopics returns once the controller has recorded the topic; the
    broker may need a moment more before it serves the partitions, and a
    producer started in that window gets UNKNOWN_TOPIC_OR_PARTITION.
    """
    pending = set(names)
    deadline = time.monotonic() + timeout
    while pending:
        md = admin.list_topics(timeout=5)
        for name in list(pending):
            t = md.topics.get(name)
            if t is not None and t.error is None and t.partitions and all(
                p.leader >= 0 for p in t.partitions.values()
            ):
                pending.discard(name)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics without partition leaders after {timeout:.0f}s: {sorted(pending)}")
        time.sleep(0.1)


def ensure_topics(
    bootstrap: str,
    partitions: int | None = None,
    specs: Sequence[TopicSpec] = TOPICS,
    *,
    timeout: float = 30.0,
) -> list[str]:
    """Create every topic in ``specs`` that does not exist yet; return those created.

    Idempotent and safe to race with another process doing the same:
    TOPIC_ALREADY_EXISTS is not an error. An existing topic's config is
    brought to the catalogue's (e.g. ``message.timestamp.type`` on the
    received topic; each change logged); its partition count is left alone (a
    mismatch is logged, never "fixed": shrinking is impossible and growing
    would reshuffle keys). ``partitions`` overrides the default for specs
    that do not pin their own count.
    """
    admin = _admin(bootstrap)
    default = partitions if partitions is not None else default_partitions()
    rf = replication_factor()

    existing = admin.list_topics(timeout=timeout).topics
    wanted: list[NewTopic] = []
    present: list[TopicSpec] = []
    for spec in specs:
        n = spec.partitions if spec.partitions is not None else default
        if spec.name in existing:
            have = len(existing[spec.name].partitions)
            if have != n:
                log.warning("topic %s exists with %d partitions, catalogue says %d", spec.name, have, n)
            present.append(spec)
            continue
        wanted.append(NewTopic(spec.name, num_partitions=n, replication_factor=rf, config=topic_config(spec, rf)))

    align_configs(admin, present, rf, timeout=timeout)
    if not wanted:
        return []

    created = _succeeded(admin.create_topics(wanted, operation_timeout=timeout, request_timeout=timeout),
                         KafkaError.TOPIC_ALREADY_EXISTS)
    _wait_for_leaders(admin, created, timeout)
    if created:
        log.info("created topics: %s", ", ".join(sorted(created)))
    return sorted(created)


def align_configs(admin: AdminClient, specs: Sequence[TopicSpec], rf: int, *, timeout: float = 30.0) -> list[str]:
    """Set every catalogue config an existing topic lacks or has otherwise; return "topic: key" changed.

    A failure (e.g. no ALTER_CONFIGS permission) is logged, not raised: the
    topic still works, and the worker warns when the received topic's
    records are not broker-stamped.
    """
    if not specs:
        return []
    resources = [ConfigResource(ResourceType.TOPIC, spec.name) for spec in specs]
    changes: list[tuple[ConfigResource, list[str]]] = []
    by_name = {spec.name: spec for spec in specs}
    for res, fut in admin.describe_configs(resources, request_timeout=timeout).items():
        spec = by_name[res.name]
        try:
            have = {name: entry.value for name, entry in fut.result(timeout).items()}
        except KafkaException as exc:
            log.warning("could not read the config of topic %s: %s", spec.name, exc)
            continue
        diff = {k: v for k, v in topic_config(spec, rf).items() if have.get(k) != v}
        if diff:
            entries = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in diff.items()]
            changes.append((ConfigResource(ResourceType.TOPIC, spec.name, incremental_configs=entries),
                            [f"{spec.name}: {k}={v} (was {have.get(k)})" for k, v in diff.items()]))
    done: list[str] = []
    if changes:
        futures = admin.incremental_alter_configs([res for res, _ in changes], request_timeout=timeout)
        what_for = {res.name: what for res, what in changes}
        for res, fut in futures.items():
            what = what_for[res.name]
            try:
                fut.result(timeout)
            except KafkaException as exc:
                log.warning("could not update the config of topic %s (%s): %s", res.name, "; ".join(what), exc)
                continue
            log.warning("updated topic config: %s", "; ".join(what))
            done.extend(what)
    return done


def delete_topics(bootstrap: str, names: Iterable[str], *, timeout: float = 30.0) -> list[str]:
    """Delete the named topics; return those actually deleted.

    Topics that do not exist are skipped silently, so tests can clean up
    unconditionally.
    """
    names = list(names)
    if not names:
        return []
    admin = _admin(bootstrap)
    return sorted(_succeeded(admin.delete_topics(names, operation_timeout=timeout, request_timeout=timeout),
                             KafkaError.UNKNOWN_TOPIC_OR_PART))


def _succeeded(futures: Mapping[str, Any], already_done: int) -> list[str]:
    """Names whose admin operation succeeded; ``already_done`` (e.g. exists / unknown) is not an error."""
    done: list[str] = []
    for name, fut in futures.items():
        try:
            fut.result()
            done.append(name)
        except KafkaException as exc:
            err = exc.args[0]
            if isinstance(err, KafkaError) and err.code() == already_done:
                continue
            raise
    return done
