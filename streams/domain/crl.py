"""Read a certificate revocation list from bytes, DER or PEM.

A domain module (not the test PKI's) because production reads CRLs too: the verify agent, the
reference-data consumer and ``csos crl publish`` all take the same bytes a CA publishes.
"""
from __future__ import annotations

from cryptography import x509


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    """Load a CRL in DER or PEM (detected by the PEM armour)."""
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)
