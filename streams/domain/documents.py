"""Order documents by format: one entry point for every format the verifier accepts.

The signature covers the exact bytes received, so each format is parsed from
those bytes by its own strict parser; all of them yield the same
``streams.domain.model.Order`` and raise ``DocumentError`` for a defective order.
"""
from __future__ import annotations

from streams.domain.model import Order
from streams.domain.order_document import FORMAT as CANONICAL_FORMAT
from streams.domain.order_document import DocumentError, parse_order
from streams.domain.x12_850 import FORMAT as X12_850_FORMAT
from streams.domain.x12_850 import parse_x12_850

_PARSERS = {CANONICAL_FORMAT: parse_order, X12_850_FORMAT: parse_x12_850}
FORMATS: tuple[str, ...] = tuple(_PARSERS)


def parse_document(data: bytes, fmt: str) -> Order:
    """Parse ``data`` as format ``fmt``; raise ``DocumentError`` if defective or the format is unknown."""
    parser = _PARSERS.get(fmt)
    if parser is None:
        raise DocumentError("format", f"unsupported document format {fmt!r}; supported: {', '.join(FORMATS)}")
    return parser(data)


def detect_format(data: bytes) -> str:
    """Guess the format from the first bytes: ``ISA`` is X12, ``{`` the canonical JSON."""
    if data.startswith(b"ISA"):
        return X12_850_FORMAT
    if data.lstrip(b" \t\r\n").startswith(b"{"):
        return CANONICAL_FORMAT
    raise DocumentError("format", "unrecognized order document: expected an X12 interchange (ISA) or a JSON order")
