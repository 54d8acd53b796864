"""The verifier's memo of RFC 5280 name matching (streams.verification.name_cache)."""
from __future__ import annotations

from asn1crypto import x509 as asn1_x509

import streams.verification  # noqa: F401 - installs the cache
from streams.verification import name_cache


def _name(cn: str, org: str = "CSOS-SOM Test PKI") -> asn1_x509.Name:
    """A freshly parsed name (a new object each time, as pyhanko sees certificates' names)."""
    return asn1_x509.Name.load(asn1_x509.Name.build({"country_name": "US", "organization_name": org,
                                                     "common_name": cn}).dump())


def test_results_are_asn1cryptos_own() -> None:
    name_cache.clear()
    a, b = _name("CSOS Sub CA"), _name("CSOS Sub CA")
    assert a.hashable == name_cache._ORIGINAL_HASHABLE(a)
    assert a == b and not a != b
    assert a.hashable == b.hashable  # the second one is a cache hit on equal bytes


def test_a_different_name_never_hits() -> None:
    name_cache.clear()
    sub = _name("CSOS Sub CA")
    assert sub.hashable  # cached
    other = _name("CSOS Sub CA 2")
    assert other.hashable != sub.hashable
    assert sub != other and other != sub
    assert _name("CSOS Sub CA", org="Another PKI") != sub


def test_rfc5280_matching_still_applies_across_encodings() -> None:
    """Different bytes, equal names (case and spaces folded): each is computed, and they still match."""
    name_cache.clear()
    a, b = _name("CSOS  Sub CA"), _name("csos sub ca")
    assert a.dump() != b.dump()
    assert a == b and a.hashable == b.hashable
    assert a != "not a name"


def test_the_caches_are_bounded(monkeypatch) -> None:
    name_cache.clear()
    monkeypatch.setattr(name_cache, "MAX_ENTRIES", 8)
    names = [_name(f"Registrant {i}") for i in range(30)]
    for n in names:
        assert n.hashable == name_cache._ORIGINAL_HASHABLE(n)
        assert n == names[0] if n is names[0] else n != names[0]
    assert len(name_cache._hashables) <= 8 and len(name_cache._equal) <= 8
