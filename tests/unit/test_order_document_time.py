"""The canonical order's ``signed_at``: read by slicing, accepting exactly what strptime accepted."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from streams.domain.order_document import DocumentError, _signed_at

STRPTIME = "%Y-%m-%dT%H:%M:%SZ"


@pytest.mark.parametrize("raw", [
    "2026-03-02T12:00:00Z", "2024-02-29T23:59:59Z", "0001-01-01T00:00:00Z",  # canonical, read by slicing
    "2026-3-2T1:2:3Z", "２０２６-03-02T12:00:00Z",  # unpadded, non-ASCII digits: strptime took them, still taken
])
def test_accepted_times_are_strptimes(raw: str) -> None:
    assert _signed_at(raw) == datetime.strptime(raw, STRPTIME).replace(tzinfo=timezone.utc)


@pytest.mark.parametrize("raw", [
    "2026-02-29T12:00:00Z", "2026-13-01T00:00:00Z", "2026-03-02T24:00:00Z", "2026-03-02T12:00:60Z",
    "0000-01-01T00:00:00Z", "2026-03-02T12:00:00", "2026-03-02T12:00:00+00:00", " 2026-03-02T12:00:00Z",
    "2026-03-02 12:00:00Z",
])
def test_refused_times_are_refused_as_before(raw: str) -> None:
    with pytest.raises(ValueError):
        datetime.strptime(raw, STRPTIME)
    with pytest.raises(DocumentError, match="not an ISO-8601 UTC timestamp"):
        _signed_at(raw)
