"""KAFKA_* security variables: one parse, two client libraries, clear refusals."""
from __future__ import annotations

import ssl

import faust
import pytest

from connectors.kafka.security import KafkaSecurity, KafkaSecurityError, client_config, faust_app_kwargs

SASL = {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "worker",
        "KAFKA_SASL_PASSWORD": "s3cret"}


def test_without_variables_clients_keep_their_plaintext_config() -> None:
    assert client_config({}) == {}
    assert faust_app_kwargs({}) == {}


def test_sasl_defaults_to_scram_sha_512_in_both_libraries() -> None:
    assert client_config(SASL) == {"security.protocol": "sasl_plaintext", "sasl.mechanism": "SCRAM-SHA-512",
                                   "sasl.username": "worker", "sasl.password": "s3cret"}
    creds = faust_app_kwargs(SASL)["broker_credentials"]
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.mechanism.value, creds.protocol.value, creds.username, creds.password) == (
        "SCRAM-SHA-512", "SASL_PLAINTEXT", "worker", "s3cret")


def _self_signed_ca(path) -> str:
    from datetime import datetime, timedelta, timezone

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test kafka CA")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def test_sasl_ssl_verifies_the_broker_with_the_ca_file(tmp_path) -> None:
    ca = _self_signed_ca(tmp_path / "ca.pem")
    env = dict(SASL, KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SASL_MECHANISM="scram-sha-256", KAFKA_SSL_CA_FILE=ca)
    conf = client_config(env)
    assert (conf["security.protocol"], conf["sasl.mechanism"], conf["ssl.ca.location"]) == (
        "sasl_ssl", "SCRAM-SHA-256", ca)
    creds = faust_app_kwargs(env)["broker_credentials"]
    assert creds.protocol.value == "SASL_SSL"
    context = creds.ssl_context
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "test kafka CA"),),)]


@pytest.mark.parametrize("env, message", [
    ({"KAFKA_SECURITY_PROTOCOL": "SASL"}, "expected one of"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "w"}, "KAFKA_SASL_PASSWORD"),
    (dict(SASL, KAFKA_SASL_MECHANISM="GSSAPI"), "KAFKA_SASL_MECHANISM"),
    ({"KAFKA_SSL_CA_FILE": "/ca.pem"}, "does not use TLS"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERT_FILE": "/c.pem"}, "go together"),
])
def test_inconsistent_settings_stop_the_process(env: dict[str, str], message: str) -> None:
    with pytest.raises(KafkaSecurityError, match=message):
        KafkaSecurity.from_env(env)


def test_the_password_never_shows_in_a_repr() -> None:
    assert "s3cret" not in repr(KafkaSecurity.from_env(SASL))
    assert "s3cret" not in repr(faust_app_kwargs(SASL))
