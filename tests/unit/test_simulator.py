"""The order simulator: deterministic, valid identifiers, labels that mean what they say."""
from __future__ import annotations

import csv
import gzip
import math
import statistics
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from connectors.sources.arcos_replay import METHADONE_SAMPLE, arcos_data_dir
from streams.tools.product_catalog import DEFAULT_PATH, build_catalog, write_product_master
from streams.tools.simulator import (
    BAD_KINDS, BUSINESS_ACTIVITIES, EXPECTED_OUTCOME, LABELS, SUSPICIOUS_KINDS, MalformedBytes, Population,
    SigningKit, SimulationConfig, generate_orders, is_malformed, iter_orders, read_labels, sign_simulated,
    write_labels,
)
from streams.domain.identifiers import is_valid_dea_number, is_valid_order_number
from streams.domain.order_document import DocumentError, encode_order, parse_order
from streams.domain.products import SCHEDULES, ProductMaster

END = datetime(2026, 11, 1, tzinfo=timezone.utc)
ARCOS = (arcos_data_dir() or Path("missing-arcos-dir")) / METHADONE_SAMPLE
ALL_BAD = {k: 3 for k in BAD_KINDS}
ALL_SUSPICIOUS = {"size_spike": 3, "frequency_burst": 9, "family_shift": 3}


@pytest.fixture(scope="module")
def population() -> Population:
    return Population.generate(80, seed=42)


@pytest.fixture(scope="module")
def stream(population):
    return generate_orders(population, end=END)


@pytest.fixture(scope="module")
def requested(population):
    return generate_orders(population, end=END, bad_counts=ALL_BAD, suspicious_counts=ALL_SUSPICIOUS)


def _fingerprint(result) -> list[tuple]:
    return [(o.sim_id, o.label, o.expected_outcome, o.registrant.dea_number, o.received_at,
             encode_order(o.order), tuple(sorted(o.detail.items()))) for o in result]


# ----------------------------------------------------------------------------- product master
def test_product_master_file_is_what_the_generator_writes(tmp_path):
    out = write_product_master(tmp_path / "pm.csv")
    assert out.read_bytes() == DEFAULT_PATH.read_bytes()
    pm = ProductMaster.load(DEFAULT_PATH)
    assert len(pm) == len(build_catalog()) >= 40
    families = {p.drug_family for p in pm}
    assert {"OXYCODONE", "HYDROCODONE", "MORPHINE", "FENTANYL", "HYDROMORPHONE", "METHADONE", "OXYMORPHONE",
            "TAPENTADOL", "CODEINE", "BUPRENORPHINE", "AMPHETAMINE", "METHYLPHENIDATE", "LISDEXAMFETAMINE",
            "ALPRAZOLAM", "DIAZEPAM", "LORAZEPAM", "ZOLPIDEM", "TRAMADOL", "PREGABALIN", "KETAMINE",
            "TESTOSTERONE"} <= families
    for p in pm:
        assert p.schedule in SCHEDULES
        assert p.units_per_package > 0 and p.base_mg_per_unit > 0 and p.mme_factor >= 0
        assert (p.mme_factor > 0) == (p.drug_family not in {
            "BUPRENORPHINE", "AMPHETAMINE", "METHYLPHENIDATE", "LISDEXAMFETAMINE", "ALPRAZOLAM", "DIAZEPAM",
            "LORAZEPAM", "ZOLPIDEM", "PREGABALIN", "KETAMINE", "TESTOSTERONE"}), p
    apap_codeine = [p for p in pm if p.drug_family == "CODEINE" and "ACETAMINOPHEN" in p.product_name]
    assert apap_codeine and all(p.schedule == "3" for p in apap_codeine)
    assert {p.schedule for p in pm if p.drug_family == "AMPHETAMINE"} == {"2N"}
    assert {p.schedule for p in pm if p.drug_family in ("KETAMINE", "TESTOSTERONE")} == {"3N"}


@pytest.mark.skipif(not ARCOS.exists(), reason="ARCOS sample not available")
def test_product_master_matches_the_arcos_methadone_sample():
    pm = ProductMaster.load(DEFAULT_PATH)
    rows = found = checked = close = 0
    with gzip.open(ARCOS, "rt", newline="") as fh:
        for row in csv.DictReader(fh):
            rows += 1
            p = pm.get(row["NDC_NO"])
            if p is None:
                continue
            found += 1
            assert p.drug_family == "METHADONE" and p.schedule == "2"
            assert p.mme_factor == float(row["MME_Conversion_Factor"])
            if row["DOSAGE_UNIT"] and float(row["QUANTITY"]) >= 1 and checked < 2000:
                # Typical rows: the sample's units per package and base weight per unit.
                qty, du = float(row["QUANTITY"]), float(row["DOSAGE_UNIT"])
                if du / qty == p.units_per_package:
                    checked += 1
                    close += math.isclose(float(row["CALC_BASE_WT_IN_GM"]) * 1000 / du, p.base_mg_per_unit,
                                          rel_tol=0.025)
    assert found / rows > 0.9
    assert checked > 1000 and close / checked > 0.99  # 2006-08 rows use a ~2 % lower salt-to-base factor


# ----------------------------------------------------------------------------- population
def test_population_is_deterministic_and_valid(population):
    again = Population.generate(80, seed=42)
    assert again.registrants == population.registrants
    assert Population.generate(80, seed=43).registrants != population.registrants
    kinds = Counter(r.business_activity for r in population)
    assert set(kinds) == set(BUSINESS_ACTIVITIES)
    deas = [r.dea_number for r in population]
    assert len(set(deas)) == len(deas)
    assert is_valid_dea_number(population.supplier.dea_number)
    for r in population:
        assert is_valid_dea_number(r.dea_number), r
        first = r.dea_number[0]
        if r.business_activity in ("RETAIL PHARMACY", "CHAIN PHARMACY"):
            assert first in "ABF"
        elif r.business_activity == "HOSPITAL/CLINIC":
            assert first in "AB"
        else:
            assert first in "ABF"
        assert set(r.schedules) <= set(SCHEDULES) and r.schedules
        for h in r.habits:
            for ndc, share in h.items:
                p = population.products.get(ndc)
                assert p is not None and p.drug_family == h.family
                assert p.schedule in r.schedules  # habits only use authorized schedules
                assert 0 < share <= 1
    # practitioners without schedule-2 authority exist (for SCHEDULE_NOT_AUTHORIZED)
    assert any("2" not in r.schedules for r in population if r.business_activity == "PRACTITIONER")


def test_small_populations_still_have_every_kind():
    pop = Population.generate(4, seed=1)
    assert {r.business_activity for r in pop} == set(BUSINESS_ACTIVITIES)
    assert len(Population.generate(1, seed=1)) == 1


# ----------------------------------------------------------------------------- orders
def test_same_seed_same_orders(population, stream):
    again = generate_orders(Population.generate(80, seed=42), end=END)
    assert _fingerprint(again) == _fingerprint(stream)
    assert [o.sim_id for o in iter_orders(population, SimulationConfig(end=END))] == [o.sim_id for o in stream]
    other = generate_orders(population, end=END, seed=7)
    assert _fingerprint(other) != _fingerprint(stream)


def test_stream_shape(stream):
    assert len(stream) > 1000
    times = [o.signed_at for o in stream]
    assert times == sorted(times)
    assert all(stream.start <= t < stream.end for t in times)
    assert [o.seq for o in stream] == list(range(len(stream)))
    assert len({o.sim_id for o in stream}) == len(stream)
    for o in stream:
        assert o.label in LABELS and o.expected_outcome == EXPECTED_OUTCOME[o.label]
        assert o.received_at > o.signed_at
        assert o.signed_at.tzinfo is not None and o.signed_at.microsecond == 0
    counts = stream.label_counts()
    n = len(stream)
    assert 0.035 < sum(counts[k] for k in BAD_KINDS) / n < 0.065
    assert 0.01 < sum(counts[k] for k in SUSPICIOUS_KINDS) / n < 0.03
    assert set(counts) == set(LABELS)  # the default fractions reach every kind at this size
    assert stream.shortfall == {}


def test_identifiers_are_valid(stream):
    numbers: dict[str, set[str]] = defaultdict(set)
    for o in stream:
        assert is_valid_dea_number(o.claimed_purchaser_dea)
        assert is_valid_dea_number(o.order.supplier.dea_number)
        assert is_valid_order_number(o.order_number), o.order_number
        assert o.order_number[:2] == f"{o.signed_at.year % 100:02d}"
        assert o.order_number not in numbers[o.claimed_purchaser_dea], "order number reused by a purchaser"
        numbers[o.claimed_purchaser_dea].add(o.order_number)


def test_every_ndc_is_in_the_product_master(stream):
    pm = ProductMaster.load(DEFAULT_PATH)
    for o in stream:
        assert o.order.lines
        for ln in o.order.lines:
            p = pm.get(ln.ndc)
            assert p is not None, ln.ndc
            assert ln.package_quantity == p.units_per_package and ln.packages >= 1
            assert ln.product_name == p.product_name and ln.strength == p.strength
        # documents of good orders parse back to the same order
        if o.label not in ("malformed_order", "malformed_bytes"):
            assert parse_order(encode_order(o.order)) == o.order


def test_schedules_authorized_except_when_labelled(stream):
    pm = stream.population.products
    for o in stream:
        unauthorized = [ln for ln in o.order.lines if pm.get(ln.ndc).schedule not in o.registrant.schedules]
        assert bool(unauthorized) == (o.label == "schedule_not_authorized"), o
        if unauthorized:
            assert {pm.get(ln.ndc).schedule for ln in unauthorized} == {"2"}


def test_requested_counts_give_every_label(requested):
    counts = requested.label_counts()
    for kind, n in {**ALL_BAD, **ALL_SUSPICIOUS}.items():
        assert counts[kind] == n, kind
    assert requested.shortfall == {}
    assert counts["normal"] > 1000
    none = generate_orders(requested.population, end=END, bad_fraction=0, suspicious_fraction=0)
    assert set(none.label_counts()) == {"normal"}


def test_dea_mismatch_uses_another_valid_number(requested):
    for o in requested:
        if o.label == "dea_mismatch":
            assert o.claimed_purchaser_dea != o.registrant.dea_number
            assert is_valid_dea_number(o.claimed_purchaser_dea)
        else:
            assert o.claimed_purchaser_dea == o.registrant.dea_number


def _history(result):
    """Per registrant: its normal orders in time order."""
    hist: dict[str, list] = defaultdict(list)
    for o in result:
        if o.label == "normal":
            hist[o.registrant.dea_number].append(o)
    return hist


@pytest.mark.parametrize("which", ["stream", "requested"])
def test_suspicious_only_late_and_with_history(which, request):
    result = request.getfixturevalue(which)
    cfg = result.config
    pm = result.population.products
    late = result.start + timedelta(days=cfg.days * cfg.inject_after)
    hist = _history(result)
    seen = Counter()
    for o in result:
        if not o.is_suspicious:
            continue
        seen[o.label] += 1
        assert o.signed_at >= late
        prior = [h for h in hist[o.registrant.dea_number] if h.signed_at < o.signed_at]
        assert len(prior) >= cfg.min_history
        if o.label == "size_spike":
            fam = o.detail["family"]
            with_family = [h for h in prior if fam in h.family_units(pm)]
            assert len(with_family) >= cfg.min_history
            usual = statistics.median(h.family_units(pm)[fam] for h in with_family)
            assert o.family_units(pm)[fam] >= 3.5 * usual, (o.detail, usual)
        elif o.label == "family_shift":
            fam = o.detail["family"]
            assert all(fam not in h.family_units(pm) for h in hist[o.registrant.dea_number])
            assert fam not in o.registrant.families and "2" in o.registrant.schedules
            assert o.family_units(pm)[fam] >= 100
        else:  # frequency_burst: hours after the registrant's previous order
            assert o.signed_at - prior[-1].signed_at < timedelta(hours=48)
            assert o.detail["orders_in_24h"] >= 2
    assert set(seen) == set(SUSPICIOUS_KINDS)


def test_normal_orders_have_a_stable_distribution(stream):
    pm = stream.population.products
    units: dict[tuple[str, str], list[int]] = defaultdict(list)
    gaps = []
    for dea, orders in _history(stream).items():
        for a, b in zip(orders, orders[1:]):
            gaps.append(b.signed_at - a.signed_at)
        for o in orders:
            for fam, u in o.family_units(pm).items():
                units[(dea, fam)].append(u)
    cvs = [statistics.pstdev(v) / statistics.mean(v) for v in units.values() if len(v) >= 10]
    assert len(cvs) > 100
    assert max(cvs) < 0.8
    assert statistics.median(cvs) < 0.35
    # normal orders of one registrant are at least ~18 h apart (bursts are hours apart)
    assert min(gaps) > timedelta(hours=18)
    # a robust z-score of log units rarely exceeds 4 on normal orders
    extreme = total = 0
    for v in units.values():
        if len(v) < 10:
            continue
        logs = [math.log(x) for x in v]
        med = statistics.median(logs)
        sd = max(statistics.pstdev(logs), 0.25)
        extreme += sum(1 for x in logs if (x - med) / sd > 4)
        total += len(logs)
    assert extreme / total < 0.002


def test_write_and_read_labels(requested, tmp_path):
    for name in ("labels.csv", "labels.jsonl"):
        path = write_labels(tmp_path / name, requested)
        rows = read_labels(path)
        assert len(rows) == len(requested)
        for row, o in zip(rows, requested):
            assert row["order_id"] == o.sim_id and row["order_number"] == o.order_number
            assert row["purchaser_dea"] == o.claimed_purchaser_dea and row["label"] == o.label
            assert row["expected_outcome"] == o.expected_outcome
            assert row["seq"] == o.seq


def test_config_is_checked(population):
    with pytest.raises(ValueError):
        generate_orders(population, end=END, bad_fraction=0.6, suspicious_fraction=0.5)
    with pytest.raises(ValueError):
        generate_orders(population, end=END, bad_counts={"nonsense": 1})
    with pytest.raises(ValueError):
        generate_orders(population, end=END.replace(tzinfo=None))


def test_generation_is_fast():
    t0 = time.perf_counter()
    result = generate_orders(Population.generate(300, seed=3), end=END)
    assert len(result) > 9000
    assert time.perf_counter() - t0 < 10


# ----------------------------------------------------------------------------- signing
@pytest.fixture(scope="module")
def signed(requested):
    from streams.tools.pki import TestPKI
    pki = TestPKI.create(now=END, reuse_keys=True)
    kit = SigningKit(pki).prepare(requested)
    return pki, kit


def test_signing_applies_exactly_the_labelled_defect(requested, signed):
    from cryptography.exceptions import InvalidSignature

    from streams.domain.cert_profile import read_registration
    from streams.domain.cms import BAD_SIGNATURE, SignatureError, parse_signed_data, verify_signature
    pki, kit = signed
    revoked = {e.serial_number: e.revocation_date_utc for e in pki.crl}
    seen = set()
    for o in requested:
        if o.label == "normal" and o.seq % 10:
            continue  # a sample of the normal ones is enough here
        seen.add(o.label)
        doc, sig = kit.sign(o)
        if o.label == "malformed_bytes":
            assert doc is None and isinstance(sig, MalformedBytes) and is_malformed(sig)
            assert sig[:2] != b"\xc3\x01" and len(sig) >= 24
            continue
        assert doc is None and not is_malformed(sig)  # attached by default
        parsed = parse_signed_data(sig)
        if o.label in ("tampered", "wrong_key"):
            with pytest.raises(SignatureError) as exc:
                verify_signature(parsed)
            assert exc.value.code == BAD_SIGNATURE
            continue
        verify_signature(parsed)
        assert parsed.signing_time == o.signed_at
        cert = parsed.signer_cert
        dea, schedules = read_registration(cert, pki.oids)
        assert dea == o.registrant.dea_number and schedules == frozenset(o.registrant.schedules)
        if o.label == "malformed_order":
            with pytest.raises(DocumentError):
                parse_order(parsed.content)
            continue
        assert parsed.content == encode_order(o.order)
        assert cert.issuer == pki.sub_ca.cert.subject  # the rogue CA copies the real names
        try:
            cert.verify_directly_issued_by(pki.sub_ca.cert)
            chains = True
        except (ValueError, TypeError, InvalidSignature):
            chains = False
        assert chains == (o.label != "untrusted_cert")
        expired = cert.not_valid_after_utc < o.signed_at
        assert expired == (o.label == "expired_cert")
        assert cert.not_valid_before_utc <= o.signed_at
        on_crl = cert.serial_number in revoked
        assert on_crl == (o.label == "revoked_cert")
        if on_crl:
            assert revoked[cert.serial_number] < o.signed_at
        assert (o.claimed_purchaser_dea != dea) == (o.label == "dea_mismatch")
    assert seen == set(LABELS)


def test_detached_signatures_and_tampering(requested, signed):
    from streams.domain.cms import BAD_SIGNATURE, SignatureError, parse_signed_data, verify_signature
    pki, _ = signed
    normal = next(o for o in requested if o.label == "normal")
    tampered = next(o for o in requested if o.label == "tampered")
    doc, sig = sign_simulated(normal, pki, detached=True)
    assert doc == encode_order(normal.order)
    verify_signature(parse_signed_data(sig, doc))
    doc, sig = sign_simulated(tampered, pki, detached=True)
    assert doc != encode_order(tampered.order) and len(doc) == len(encode_order(tampered.order))
    assert parse_order(doc).order_number == tampered.order_number  # still a readable order
    with pytest.raises(SignatureError) as exc:
        verify_signature(parse_signed_data(sig, doc))
    assert exc.value.code == BAD_SIGNATURE


def test_expected_outcomes_match_the_verifier(requested, signed):
    """End to end with the real verifier: every label gets the outcome the simulator promises."""
    verification = pytest.importorskip("streams.verification")
    from streams.core.avro_codec import DecodeError, default_codec
    pki, kit = signed
    verifier = verification.Verifier(pki.trust_anchors, pki.intermediates, [pki.crl, pki.root_crl], requested.population.products)
    mismatches = []
    for o in requested:
        if o.label == "normal" and o.seq % 5:
            continue
        for detached in (False, True):
            doc, sig = kit.sign(o, detached=detached)
            if is_malformed(sig):
                with pytest.raises(DecodeError):
                    default_codec().decode(sig)
                got = "DLQ"
            else:
                out = verifier.verify(doc, sig, o.received_at)
                got = "PASS" if out.ok else f"REJECT:{out.reason_code}"
            want = o.expected_outcome if o.expected_outcome.startswith(("REJECT:", "DLQ")) else "PASS"
            if got != want:
                mismatches.append((o.label, detached, got, want))
    assert mismatches == []


def test_certificates_are_cached_and_reused_across_processes(requested, signed, tmp_path):
    from streams.tools.pki import load_pki
    pki, kit = signed
    o = next(o for o in requested if o.label == "normal")
    first = kit.credential(o.registrant, o.signed_at)
    assert kit.credential(o.registrant) is first
    assert pki.registrants[o.registrant.dea_number] is first
    pki.write_pki(tmp_path / "pki")
    reloaded = load_pki(tmp_path / "pki")
    kit2 = SigningKit(reloaded)
    assert kit2.credential(o.registrant, o.signed_at).cert == first.cert
