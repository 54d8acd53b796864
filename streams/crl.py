"""Reading a certificate revocation list: the one loader production and the test PKI share.

Why a module of its own: the verifier, the reference feed's check of a
``pki.crl`` record, the verify agent's CRL ranking and ``csos reference publish``
must read a CRL file the same way (DER, or PEM when it carries the armour),
or a CRL one of them accepts could be refused by another. It used to live in
the test PKI (``connectors/pki.py``), which production code must not import,
with a second copy in ``streams/verification.py``.
"""
from __future__ import annotations

from cryptography import x509

PEM_ARMOUR = b"-----BEGIN"


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    """A CRL from its DER or PEM bytes (PEM recognised by its armour); ``ValueError`` if it is not one."""
    if data.lstrip().startswith(PEM_ARMOUR):
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


__all__ = ["load_crl"]
