"""The bench's warm-up: every signing certificate is seen before the timed feed, and nothing is lost."""
from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from streams.domain.cms import sign_order
from streams.tools import bench
from streams.tools.bench import split_warm_up
from streams.tools.pki import TestPKI


def _message(cert: str | None, n: int) -> SimpleNamespace:
    return SimpleNamespace(cert=cert, n=n)


def test_every_certificate_is_warmed_up_and_each_keeps_its_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "_signer", lambda m: m.cert)  # here each message names its certificate
    feed = [_message(f"C{i % 7 if i < 60 else 7 + i % 3}", i) for i in range(100)]  # C7-C9 only after the 60th
    feed[70] = _message(None, 70)  # an unreadable signature: nothing to learn, it stays timed
    warm, timed = split_warm_up(feed)
    assert sorted(m.n for m in warm + timed) == list(range(100))  # nothing lost, nothing twice
    assert warm[:5] == feed[:5]  # the first twentieth as it was
    certs = {m.cert for m in feed} - {None}
    assert {m.cert for m in warm} == certs
    assert feed[70] in timed
    for cert in certs:  # a certificate's first order is its warm-up order; the rest follow in order
        ns = [m.n for m in warm + timed if m.cert == cert]
        assert ns == sorted(ns)
    assert len(warm) == 5 + 5  # C5, C6 first at 5-6; C7-C9 after the 60th


def test_a_feed_messages_signer_is_its_signing_certificate() -> None:
    pki = TestPKI.create(reuse_keys=True)
    cred = pki.issue_registrant("AP5836727", "Acme Pharmacy", ["2", "3"])
    document = b'{"order": 1}'
    signature = sign_order(document, cred.cert, cred.key, signing_time=datetime(2026, 3, 1, tzinfo=timezone.utc))
    assert bench._signer(SimpleNamespace(signature=signature, document=document)) == cred.cert.public_bytes(Encoding.DER)
    assert bench._signer(SimpleNamespace(signature=b"\x30\x03abc", document=document)) is None


def test_a_paced_run_warms_up_for_its_own_length_of_feed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "_signer", lambda m: m.cert)
    feed = [_message("C0", i) for i in range(100)]
    warm, timed = split_warm_up(feed, at_least=30)  # e.g. PACED_WARM_UP_SECONDS at the run's rate
    assert [m.n for m in warm] == list(range(30)) and [m.n for m in timed] == list(range(30, 100))
    warm, timed = split_warm_up(feed, at_least=1000)  # never more than half the feed
    assert len(warm) == 50 and len(timed) == 50
