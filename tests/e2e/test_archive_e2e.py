"""The order archive end to end: the session pipeline's sink archives every readable received order.

The archive's unit tests (rows, certificates, export) are tests/unit/test_archive.py.
"""
from __future__ import annotations

# ---------------------------------------------------------------------------- the running pipeline
def test_pipeline_archives_every_received_order(streamed):
    """End to end: the sink archives every readable received order, accepted or rejected, and adds no
    dead letter of its own for the unreadable ones (the verify agent already dead-lettered them)."""
    import time

    missing_sql = ("SELECT count() FROM (SELECT order_id FROM rejections FINAL UNION ALL "
                   "SELECT order_id FROM verdicts FINAL) WHERE order_id NOT IN (SELECT order_id FROM order_archive)")
    deadline = time.monotonic() + 60
    while int(streamed.sql(missing_sql)[0][0]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert int(streamed.sql(missing_sql)[0][0]) == 0
    readable = len([m for m in streamed.feed.messages if not m.malformed]) + len(streamed.extra_received)
    assert int(streamed.sql("SELECT count() FROM order_archive FINAL")[0][0]) == readable
    for oid in streamed.extra_received:  # garbage signature: archived, no certificates
        rows = streamed.sql(f"SELECT length(certificates), signer_fingerprint FROM order_archive FINAL "
                            f"WHERE order_id = '{oid}'")
        assert [list(r) for r in rows] == [[0, ""]]
    tampered = [m.sim.sim_id for m in streamed.feed.messages if m.sim.label == "tampered"]
    rows = streamed.sql("SELECT min(length(certificates)), countIf(signer_fingerprint = '') FROM order_archive "
                        "FINAL WHERE order_id IN (" + ",".join(f"'{o}'" for o in tampered) + ")")
    assert int(rows[0][0]) >= 1 and int(rows[0][1]) == 0  # rejected, yet archived with the signer's certificate
    assert int(streamed.sql("SELECT count() FROM dead_letters FINAL WHERE stage = 'sink' "
                            "AND source_topic = 'csos.orders.received'")[0][0]) == 0


def test_pipeline_archives_every_crl_published(streamed):
    """Every CRL on ``pki.crl`` (as a downstream consumer reads the topic) is in ``crl_archive``, byte for byte
    (by its SHA-256), every CRL a worker loaded is among them, and the sink dead-letters none (the workers'
    reference feed traces unusable ones)."""
    import hashlib

    from connectors.kafka import catalogue as t
    from connectors.kafka.io import consume_all
    from streams.core.avro_codec import default_codec

    codec = default_codec()
    published = {hashlib.sha256(codec.decode(m.value(), expect="pki.CrlPublished")[1]["crl_der"]).hexdigest()
                 for m in consume_all(streamed.settings.kafka_bootstrap, [t.CRL]) if m.value() is not None}
    assert len(published) >= 2  # the sub-CA's and the root's at least

    rows = streamed.eventually("SELECT crl_sha256 FROM crl_archive FINAL",
                               lambda rows: published <= {r[0] for r in rows})
    assert published <= {r[0] for r in rows}
    # what the export picks from: the workers' audited loads name archived CRLs by their digest
    loaded = {r[0] for r in streamed.sql("SELECT JSONExtractString(detail, 'crl_sha256') FROM audit_events "
                                         "WHERE action = 'crl.loaded'")}
    assert loaded and loaded <= {r[0] for r in rows}
    assert int(streamed.sql("SELECT count() FROM dead_letters FINAL WHERE stage = 'sink' "
                            "AND source_topic = 'pki.crl'")[0][0]) == 0
