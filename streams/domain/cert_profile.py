"""The CSOS certificate profile: where a certificate carries the DEA number and schedules.

A DEA CSOS certificate binds the subscriber to a DEA registration number and to
the schedules the registrant may order (deaecom.gov, "about certificates"). The
extension OIDs DEA uses are published only in the DEA CSOS certificate profile,
which this project could not confirm, so the project defines its own OIDs under
the UUID arc ``2.25`` (ITU-T X.667: anyone may mint an OID there from a UUID
without registering it) and keeps them configurable. Dropping in DEA's real
OIDs is a matter of setting two environment variables:

``CSOS_DEA_NUMBER_OID``
    extension whose value is a DER ``UTF8String`` holding the DEA number.
``CSOS_SCHEDULES_OID``
    extension whose value is a DER ``SEQUENCE OF UTF8String``, one schedule
    each, from ``1, 2, 2N, 3, 3N, 4, 5`` (e.g. ``["2", "2N", "3", "3N", "4", "5"]``).

Both extensions are non-critical: a relying party that does not know them can
still validate the certificate path; this pipeline reads them itself.

If DEA's real encoding differs (e.g. a hashed DEA number), only the
encode/decode helpers here need to change.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from asn1crypto import core
from cryptography import x509

from streams.domain.products import SCHEDULES
from streams.core.errors import CsosError

#: Project default OID for the DEA-number extension (2.25 + a fixed random UUID).
DEFAULT_DEA_NUMBER_OID = "2.25.192769421410897970566556369581090180994"
#: Project default OID for the authorized-schedules extension (2.25 + a fixed random UUID).
DEFAULT_SCHEDULES_OID = "2.25.283079316507994516685401089276023141376"

ENV_DEA_NUMBER_OID = "CSOS_DEA_NUMBER_OID"
ENV_SCHEDULES_OID = "CSOS_SCHEDULES_OID"

_OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


class CertProfileError(CsosError, ValueError):
    """A CSOS extension is present but its value is not in the expected encoding."""
    code = "CERT_PROFILE"


class _Schedules(core.SequenceOf):
    _child_spec = core.UTF8String


@dataclass(frozen=True)
class ExtensionOids:
    """Dotted OIDs of the two CSOS registration extensions."""

    dea_number: str = DEFAULT_DEA_NUMBER_OID
    schedules: str = DEFAULT_SCHEDULES_OID

    def __post_init__(self) -> None:
        for name in ("dea_number", "schedules"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _OID_RE.match(value):
                raise ValueError(f"{name} OID {value!r} is not a dotted object identifier")
        if self.dea_number == self.schedules:
            raise ValueError("the DEA-number and schedules extensions need different OIDs")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ExtensionOids":
        """Read overrides from ``CSOS_DEA_NUMBER_OID`` / ``CSOS_SCHEDULES_OID``; defaults otherwise."""
        env = os.environ if env is None else env
        return cls(
            dea_number=(env.get(ENV_DEA_NUMBER_OID) or DEFAULT_DEA_NUMBER_OID).strip(),
            schedules=(env.get(ENV_SCHEDULES_OID) or DEFAULT_SCHEDULES_OID).strip(),
        )

    @property
    def dea_number_oid(self) -> x509.ObjectIdentifier:
        return x509.ObjectIdentifier(self.dea_number)

    @property
    def schedules_oid(self) -> x509.ObjectIdentifier:
        return x509.ObjectIdentifier(self.schedules)


def encode_dea_number(dea_number: str) -> bytes:
    """DER ``UTF8String`` for the DEA-number extension value."""
    return core.UTF8String(dea_number).dump()


def decode_dea_number(der: bytes) -> str:
    """Inverse of :func:`encode_dea_number`; raises ``CertProfileError`` on anything else."""
    try:
        value = core.UTF8String.load(der, strict=True).native
    except (ValueError, TypeError) as exc:
        raise CertProfileError(f"DEA-number extension is not a DER UTF8String ({exc})") from None
    if not isinstance(value, str) or not value.strip():
        raise CertProfileError("DEA-number extension is empty")
    return value.strip()


def encode_schedules(schedules: Iterable[str]) -> bytes:
    """DER ``SEQUENCE OF UTF8String``, in the canonical schedule order, without duplicates."""
    wanted = {s.strip().upper() for s in schedules}
    unknown = wanted - set(SCHEDULES)
    if unknown:
        raise ValueError(f"unknown schedules {sorted(unknown)}; expected some of {list(SCHEDULES)}")
    return _Schedules([s for s in SCHEDULES if s in wanted]).dump()


def decode_schedules(der: bytes) -> frozenset[str]:
    """Inverse of :func:`encode_schedules`.

    Unknown schedule strings are refused rather than dropped: a certificate we
    cannot read fully must not silently authorize less or more than it says.
    """
    try:
        values = _Schedules.load(der, strict=True).native
    except (ValueError, TypeError) as exc:
        raise CertProfileError(f"schedules extension is not a DER SEQUENCE OF UTF8String ({exc})") from None
    result = frozenset(v.strip().upper() for v in values)
    unknown = result - set(SCHEDULES)
    if unknown:
        raise CertProfileError(f"schedules extension names unknown schedules {sorted(unknown)}")
    return result


def registration_extensions(dea_number: str, schedules: Iterable[str],
                            oids: ExtensionOids | None = None) -> list[x509.Extension]:
    """The two non-critical extensions to put in a registrant certificate (OIDs default from env)."""
    oids = oids or ExtensionOids.from_env()
    return [
        x509.Extension(oids.dea_number_oid, False,
                       x509.UnrecognizedExtension(oids.dea_number_oid, encode_dea_number(dea_number))),
        x509.Extension(oids.schedules_oid, False,
                       x509.UnrecognizedExtension(oids.schedules_oid, encode_schedules(schedules))),
    ]


def read_registration(cert: x509.Certificate,
                      oids: ExtensionOids | None = None) -> tuple[str | None, frozenset[str]]:
    """Return ``(dea_number or None, schedules)`` bound to ``cert``.

    A missing extension gives ``None`` / an empty set (the certificate then
    authorizes nothing); a malformed one raises ``CertProfileError``. ``oids``
    defaults to :meth:`ExtensionOids.from_env`.
    """
    oids = oids or ExtensionOids.from_env()
    dea: str | None = None
    schedules: frozenset[str] = frozenset()
    try:
        ext = cert.extensions.get_extension_for_oid(oids.dea_number_oid)
        dea = decode_dea_number(_raw_value(ext))
    except x509.ExtensionNotFound:
        pass
    try:
        ext = cert.extensions.get_extension_for_oid(oids.schedules_oid)
        schedules = decode_schedules(_raw_value(ext))
    except x509.ExtensionNotFound:
        pass
    return dea, schedules


def _raw_value(ext: x509.Extension) -> bytes:
    value = ext.value
    if isinstance(value, x509.UnrecognizedExtension):
        return value.value
    # cryptography parsed it (only if someone configured a well-known OID): re-encode.
    return value.public_bytes()
