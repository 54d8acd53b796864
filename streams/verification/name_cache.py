"""Memoized X.500 name comparison for asn1crypto, as pyhanko-certvalidator uses it.

Why: RFC 5280 7.1 name matching (asn1crypto's ``Name.hashable`` and ``Name.__eq__``: LDAP string
preparation of every attribute value) is recomputed on every call, and pyhanko-certvalidator calls
it a dozen times per path it builds or revocation check it makes, nearly always on the same few CA
and CRL issuer names. That was a quarter of the CPU a first-seen signer certificate costs (path
validation and revocation), about a hundred microseconds per received order in ``bench_worker``.

What is cached is exactly what asn1crypto computes, keyed by the name's DER encoding (``dump()``,
which follows any change made to the object): two names with different bytes never share an entry,
so a result can only be reused for a name that is byte-for-byte the one it was computed for. The
caches are bounded (:data:`MAX_ENTRIES`; emptied when full, so a stream of new names costs at most
the uncached computation again). :func:`install` is idempotent and done on importing
``streams.verification``.
"""
from __future__ import annotations

from typing import Any, Callable

from asn1crypto import x509 as asn1_x509

#: Entries kept per cache before it is emptied (a few hundred bytes each).
MAX_ENTRIES = 4096

_ORIGINAL_HASHABLE: Callable[[asn1_x509.Name], str] = asn1_x509.Name.hashable.fget  # type: ignore[attr-defined]
_ORIGINAL_EQ: Callable[[asn1_x509.Name, Any], bool] = asn1_x509.Name.__eq__
_hashables: dict[bytes, str] = {}
_equal: dict[tuple[bytes, bytes], bool] = {}


def _remember(cache: dict, key: Any, value: Any) -> Any:
    if len(cache) >= MAX_ENTRIES:
        cache.clear()
    cache[key] = value
    return value


def cached_hashable(name: asn1_x509.Name) -> str:
    """``name.hashable`` as asn1crypto computes it, computed once per distinct DER encoding."""
    der = name.dump()
    found = _hashables.get(der)
    return found if found is not None else _remember(_hashables, der, _ORIGINAL_HASHABLE(name))


def cached_eq(name: asn1_x509.Name, other: Any) -> bool:
    """``name == other`` as asn1crypto decides it (RFC 5280 7.1), decided once per pair of DER encodings."""
    if not isinstance(other, asn1_x509.Name):
        return False
    key = (name.dump(), other.dump())
    found = _equal.get(key)
    return found if found is not None else _remember(_equal, key, _ORIGINAL_EQ(name, other))


def install() -> None:
    """Route ``asn1crypto.x509.Name.hashable`` and ``==`` through the caches (idempotent)."""
    asn1_x509.Name.hashable = property(cached_hashable, doc=_ORIGINAL_HASHABLE.__doc__)  # type: ignore[method-assign,assignment]
    asn1_x509.Name.__eq__ = cached_eq  # type: ignore[method-assign,assignment]


def clear() -> None:
    """Empty the caches (tests)."""
    _hashables.clear()
    _equal.clear()
