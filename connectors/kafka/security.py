"""How every Kafka client of the project authenticates: SASL and TLS settings from the environment.

Why one module: the pipeline has two client libraries (confluent-kafka/librdkafka
for producers, the sink and admin; Faust/aiokafka for the worker's agents), and
a broker that enforces ACLs refuses any client that forgot its credentials. The
settings are parsed and validated here, in one place, and turned into both
libraries' vocabularies, so a process either connects as its principal
everywhere or fails at start with a clear message.

Variables (all optional; the default is the local broker's PLAINTEXT):

``KAFKA_SECURITY_PROTOCOL``  PLAINTEXT | SASL_PLAINTEXT | SASL_SSL | SSL
``KAFKA_SASL_MECHANISM``     SCRAM-SHA-512 (default) | SCRAM-SHA-256 | PLAIN
``KAFKA_SASL_USERNAME``      this process's principal (``User:<name>`` in ACLs)
``KAFKA_SASL_PASSWORD``      its password (a secret: never logged, never in ``repr``)
``KAFKA_SSL_CA_FILE``        PEM bundle that signs the brokers' certificates (default: system CAs)
``KAFKA_SSL_CERT_FILE``      client certificate (PEM) for mutual TLS, with ``KAFKA_SSL_KEY_FILE``
``KAFKA_SSL_KEY_FILE``       its private key (PEM, unencrypted)

The environment is read at each client's construction rather than cached at
import: a process builds a handful of clients, and tests change the
environment between them.
"""
from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from streams.core.errors import ConfigError

__all__ = ["KafkaSecurity", "PROTOCOLS", "MECHANISMS", "client_config", "faust_app_kwargs"]

PROTOCOLS = ("PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL")
MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")
DEFAULT_MECHANISM = "SCRAM-SHA-512"


class KafkaSecurityError(ConfigError, ValueError):
    """The KAFKA_* security variables are inconsistent; the process must not start."""
    code = "KAFKA_SECURITY"


@dataclass(frozen=True)
class KafkaSecurity:
    """One process's way of connecting to Kafka, validated."""

    protocol: str = "PLAINTEXT"
    mechanism: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise KafkaSecurityError(f"KAFKA_SECURITY_PROTOCOL={self.protocol!r}: expected one of {', '.join(PROTOCOLS)}")
        if self.sasl:
            if self.mechanism not in MECHANISMS:
                raise KafkaSecurityError(
                    f"KAFKA_SASL_MECHANISM={self.mechanism!r}: expected one of {', '.join(MECHANISMS)}")
            if not self.username or not self.password:
                raise KafkaSecurityError(
                    f"KAFKA_SECURITY_PROTOCOL={self.protocol} needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD")
        if bool(self.cert_file) != bool(self.key_file):
            raise KafkaSecurityError("KAFKA_SSL_CERT_FILE and KAFKA_SSL_KEY_FILE go together (mutual TLS)")
        if (self.ca_file or self.cert_file) and not self.tls:
            raise KafkaSecurityError(
                f"KAFKA_SSL_* files are set but KAFKA_SECURITY_PROTOCOL={self.protocol} does not use TLS")

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KafkaSecurity:
        """Parse the KAFKA_* security variables (``os.environ`` unless ``env`` is given)."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            return (env.get(name) or "").strip() or None

        protocol = (get("KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT").upper()
        mechanism = (get("KAFKA_SASL_MECHANISM") or DEFAULT_MECHANISM).upper() if protocol.startswith("SASL_") else None
        return cls(protocol=protocol, mechanism=mechanism, username=get("KAFKA_SASL_USERNAME"),
                   password=env.get("KAFKA_SASL_PASSWORD") or None, ca_file=get("KAFKA_SSL_CA_FILE"),
                   cert_file=get("KAFKA_SSL_CERT_FILE"), key_file=get("KAFKA_SSL_KEY_FILE"))

    def librdkafka(self) -> dict[str, str]:
        """The confluent-kafka (librdkafka) properties: merge into any Producer/Consumer/AdminClient config."""
        if self.protocol == "PLAINTEXT":
            return {}  # librdkafka's default: the clients' configs stay exactly as without this module
        conf: dict[str, str] = {"security.protocol": self.protocol.lower()}
        if self.sasl:
            conf.update({"sasl.mechanism": str(self.mechanism), "sasl.username": str(self.username),
                         "sasl.password": str(self.password)})
        if self.ca_file:
            conf["ssl.ca.location"] = self.ca_file
        if self.cert_file:
            conf.update({"ssl.certificate.location": self.cert_file, "ssl.key.location": str(self.key_file)})
        return conf

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for aiokafka (Faust), verifying the brokers against the CA file; None without TLS."""
        if not self.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def faust(self) -> dict[str, Any]:
        """Keyword arguments for ``faust.App``: ``broker_credentials`` (Faust hands them to aiokafka)."""
        import faust

        if self.sasl:
            # SASLCredentials switches itself to SASL_SSL when given a context.
            return {"broker_credentials": faust.SASLCredentials(
                username=self.username, password=self.password, mechanism=self.mechanism,
                ssl_context=self.ssl_context())}
        if self.tls:
            return {"broker_credentials": faust.SSLCredentials(self.ssl_context())}
        return {}


def client_config(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """librdkafka security properties for this process (see the module docstring for the variables)."""
    return KafkaSecurity.from_env(env).librdkafka()


def faust_app_kwargs(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``faust.App`` security keyword arguments for this process."""
    return KafkaSecurity.from_env(env).faust()
