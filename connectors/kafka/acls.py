"""Who may write where: the pipeline's Kafka principals and the ACLs that confine them.

Why: every decision the pipeline takes starts from a Kafka message. Without
ACLs any process with network access to the broker could put a forged order on
``csos.orders.received`` (skipping the intake's checks), an analyst's decision
on ``som.decisions``, or a fake CRL on ``pki.crl``. With the broker's
authorizer denying what no ACL allows (``allow.everyone.if.no.acl.found=false``),
each service gets exactly the reads and writes it needs, under its own SCRAM
user, and nothing else:

===========  ==============================================  ==============================================
principal    reads (topics; consumer groups)                 writes
===========  ==============================================  ==============================================
intake       --                                              csos.orders.received, audit.events
reference    --                                              pki.crl, registrants
worker       received, verified, cleared, hold, decisions,   verified, rejected, pending, verdicts, hold,
             pki.crl, registrants; group ``<app_id>``,       release, cleared, reports, cases, audit.events,
             groups ``reference-feed-*``; all topics         dlq; all topics ``<app_id>-*`` (creates them)
             ``<app_id>-*`` (Faust changelogs)
sink         every pipeline topic; group                     dlq, audit.events
             ``<app_id>-clickhouse-sink``
review       --                                              som.decisions, audit.events
warehouse    som.release; groups ``observer-*``              warehouse.shipments
admin        super user (broker ``super.users``): creates the pipeline's topics, users and these ACLs
===========  ==============================================  ==============================================

The user names are the role names unless a mapping says otherwise. ``csos acls``
creates the users whose ``KAFKA_PASSWORD_<ROLE>`` is set, then these ACLs.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from connectors.kafka import catalogue as t

__all__ = ["ROLES", "Grant", "grants", "acl_bindings", "apply_acls", "upsert_scram_users", "passwords_from_env"]

ROLES = ("intake", "reference", "worker", "sink", "review", "warehouse")

#: Every topic the pipeline owns (the sink archives them all).
PIPELINE_TOPICS = (t.RECEIVED, t.VERIFIED, t.REJECTED, t.PENDING, t.VERDICTS, t.HOLD, t.RELEASE, t.AUDIT, t.DLQ,
                   t.CRL, t.REGISTRANTS, t.DECISIONS, t.CASES, t.CLEARED, t.REPORTS, t.SHIPMENTS)
WORKER_READS = (t.RECEIVED, t.VERIFIED, t.CLEARED, t.HOLD, t.DECISIONS, t.CRL, t.REGISTRANTS)
WORKER_WRITES = (t.VERIFIED, t.REJECTED, t.PENDING, t.VERDICTS, t.HOLD, t.RELEASE, t.CLEARED, t.REPORTS,
                 t.CASES, t.AUDIT, t.DLQ)


@dataclass(frozen=True)
class Grant:
    """One allowed operation of one role on one resource (a readable form of an ``AclBinding``)."""

    role: str
    operation: AclOperation
    resource: ResourceType
    name: str
    prefixed: bool = False


def _topics(role: str, op: AclOperation, names: Iterable[str]) -> list[Grant]:
    return [Grant(role, op, ResourceType.TOPIC, n) for n in names]


def grants(app_id: str) -> list[Grant]:
    """The pipeline's ACLs for the Faust app ``app_id`` (``CSOS_APP_ID``), as in the module's table."""
    read, write = AclOperation.READ, AclOperation.WRITE
    group = ResourceType.GROUP
    return [
        *_topics("intake", write, [t.RECEIVED, t.AUDIT]),  # an order's trail starts at receipt
        *_topics("reference", write, [t.CRL, t.REGISTRANTS]),
        *_topics("worker", read, WORKER_READS),
        *_topics("worker", write, WORKER_WRITES),
        # Faust's changelog, repartition and leader topics: it creates, reads, writes and configures them.
        Grant("worker", AclOperation.ALL, ResourceType.TOPIC, f"{app_id}-", prefixed=True),
        Grant("worker", read, group, app_id),
        Grant("worker", read, group, "reference-feed-", prefixed=True),  # connectors.sources.reference_data.ReferenceFeed
        *_topics("sink", read, PIPELINE_TOPICS),
        *_topics("sink", write, [t.DLQ, t.AUDIT]),
        Grant("sink", read, group, f"{app_id}-clickhouse-sink"),
        *_topics("review", write, [t.DECISIONS, t.AUDIT]),
        *_topics("warehouse", read, [t.RELEASE]),
        *_topics("warehouse", write, [t.SHIPMENTS]),
        Grant("warehouse", read, group, "observer-", prefixed=True),  # connectors.kafka.io.consume_all
    ]


def acl_bindings(app_id: str, users: Mapping[str, str] | None = None) -> list[AclBinding]:
    """``grants(app_id)`` as confluent-kafka bindings; ``users`` maps a role to its user name (default: the role)."""
    users = dict(users or {})
    unknown = set(users) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; the roles are {', '.join(ROLES)}")
    return [
        AclBinding(g.resource, g.name, ResourcePatternType.PREFIXED if g.prefixed else ResourcePatternType.LITERAL,
                   f"User:{users.get(g.role, g.role)}", "*", g.operation, AclPermissionType.ALLOW)
        for g in grants(app_id)
    ]


def apply_acls(admin: AdminClient, app_id: str, users: Mapping[str, str] | None = None,
               timeout: float = 30.0) -> list[AclBinding]:
    """Create the pipeline's ACLs (idempotent: an existing binding is left as it is); returns them.

    ``admin`` must connect as a super user (or a principal allowed to ALTER the
    cluster). Raises ``KafkaException`` if the broker refuses any binding.
    """
    bindings = acl_bindings(app_id, users)
    for future in admin.create_acls(bindings, request_timeout=timeout).values():
        future.result()
    return bindings


def upsert_scram_users(admin: AdminClient, passwords: Mapping[str, str], *,
                       mechanism: str = "SCRAM-SHA-512", iterations: int = 8192, timeout: float = 30.0) -> None:
    """Create or replace SCRAM credentials (user name -> password) on the broker.

    The broker salts and hashes them; the passwords themselves are never stored.
    Raises ``KafkaException`` if the broker refuses (e.g. ``admin`` is not a super user).
    """
    if not passwords:
        return
    info = ScramCredentialInfo(ScramMechanism[mechanism.replace("-", "_")], iterations)
    upserts = [UserScramCredentialUpsertion(user, info, password.encode()) for user, password in passwords.items()]
    for future in admin.alter_user_scram_credentials(upserts, request_timeout=timeout).values():
        future.result()


def passwords_from_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Role -> password for each ``KAFKA_PASSWORD_<ROLE>`` that is set (e.g. ``KAFKA_PASSWORD_INTAKE``)."""
    env = os.environ if env is None else env
    return {role: env[f"KAFKA_PASSWORD_{role.upper()}"] for role in ROLES if env.get(f"KAFKA_PASSWORD_{role.upper()}")}
