"""Accepted order numbers and ids are forgotten once expired, checked only when one may have expired
(``streams.pipeline.agents.verify.EarliestExpiry``)."""
from __future__ import annotations

from datetime import timedelta
from typing import Any
from unittest import mock

from connectors.kafka import catalogue as t
from streams.core.avro_codec import default_codec
from streams.pipeline.agents.verify import REMEMBER, STATE_SCHEMA, EarliestExpiry
from streams.pipeline.processor import InputMessage
from streams.verification import Verifier
from tests.unit.test_agents_hostile import (  # noqa: F401 - pki, cred, verifier are fixtures
    DEA, NOW, cred, make_order, message, pki, signature, verifier, verify_agent,
)

codec = default_codec()


def _state(table: dict[bytes, bytes]) -> dict[str, Any]:
    return codec.decode(table[DEA.encode()], expect=STATE_SCHEMA)[1]


def test_expired_numbers_are_dropped_and_live_ones_kept_in_order(verifier: Verifier, cred: Any) -> None:
    table: dict[bytes, bytes] = {}
    proc, pub = verify_agent(verifier, table)
    orders = [make_order(n, signed_at=NOW - timedelta(hours=h)) for n, h in ((61, 3), (62, 2), (63, 1))]
    sigs = [signature(o, cred) for o in orders]

    def accept(i: int, at: Any) -> None:
        with mock.patch("streams.core.clock.utcnow", lambda: at):
            proc.begin_batch()
            proc.handle(InputMessage(t.RECEIVED, 0, i, DEA.encode(), message(sigs[i], order_id=f"id-{i}")))
            proc.end_batch()

    accept(0, NOW)
    accept(1, NOW)
    assert list(_state(table)["accepted"]) == [orders[0].order_number, orders[1].order_number]
    # Past the first order's expiry only (signed an hour before the second): it alone is dropped.
    accept(2, orders[0].signed_at + REMEMBER + timedelta(minutes=30))
    state = _state(table)
    assert list(state["accepted"]) == [orders[1].order_number, orders[2].order_number]
    assert list(state["order_ids"]) == ["id-1", "id-2"]
    assert proc.counts["verified"] == 3


def test_a_state_read_again_from_the_table_is_scanned_afresh() -> None:
    bounds = EarliestExpiry()
    state = {"accepted": {"26X000001": 500}, "order_ids": {"a": {"expires_at": 500}}}
    assert bounds.earliest(DEA, state) == 500
    bounds.lower(DEA, state, 400)
    assert bounds.earliest(DEA, state) == 400  # a bound: never above the true earliest
    reread = {"accepted": {"26X000001": 900}, "order_ids": {"a": {"expires_at": 700}}}
    assert bounds.earliest(DEA, reread) == 700  # other maps: not the bound followed
    reread["order_ids"] = {}
    assert bounds.earliest(DEA, reread) == 900
    bounds.forget(DEA)
    assert bounds.earliest(DEA, {"accepted": {}, "order_ids": {}}) > 10 ** 15  # nothing can expire


def test_bounds_are_kept_for_a_limited_number_of_purchasers() -> None:
    bounds = EarliestExpiry(max_entries=5)
    states = [{"accepted": {"n": i}, "order_ids": {}} for i in range(20)]
    for i, state in enumerate(states):
        assert bounds.earliest(f"P{i}", state) == i
    assert len(bounds._bounds) <= 5
    assert [bounds.earliest(f"P{i}", s) for i, s in enumerate(states)] == list(range(20))
