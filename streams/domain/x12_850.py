"""ANSI X12 850 purchase orders as CSOS order documents.

CSOS-enabled order systems exchange X12 850 purchase orders and sign them as
CMS/PKCS#7; the signature covers the exact interchange bytes, so the verifier
parses the bytes it received. This module maps one 850 to the 21 CFR
1305.21(b) data elements (``streams.domain.model.Order``) with the same strictness as
the canonical JSON form (``streams.domain.order_document``): a missing or malformed
element raises ``DocumentError`` whose ``element`` uses the same names as the
JSON path (``order_number``, ``purchaser.dea_number``, ``lines[2].ndc``, ...)
and whose message names the X12 segment and element to correct, because a
defective order may not be filled and the purchaser must send a new one
(1305.25).

Syntax (separators, tokenizing, ISA/GS/ST envelopes, ISA13=IEA02, GS06=GE02,
ST02=SE02, SE01/GE01/IEA01 counts) is checked by the ``ansi-x12`` package
(import name ``x12``): a small, dependency-free, transaction-neutral X12 core.
The 850 meaning below is this module's. Envelope defects raise
``DocumentError("envelope", ...)``; unreadable bytes ``DocumentError("document", ...)``.

Mapping (header segments in 850 order; "required" = the order is defective without it)

====================  ==========================================  =========================================
1305.21(b) element     X12 850                                     rule
====================  ==========================================  =========================================
(envelope)             ISA/GS/ST ... SE/GE/IEA                     one GS (GS01 ``PO``) with exactly one ST
                                                                   (ST01 ``850``); counts and control
                                                                   numbers must match
(purpose)              BEG01                                       ``00`` (original); a cancel/change is not
                                                                   an order
1 order number         BEG03 (purchase order number)               required, ``\\d\\dX[0-9A-Z]{6}``
6 date signed          DTM*004 (purchase order date): DTM02        required, exactly one; DTM04 must be
                       CCYYMMDD, DTM03 HHMMSS (or HHMM),            ``UT`` so the instant is unambiguous;
                       DTM04 time code ``UT``                      -> aware UTC datetime, second precision.
                       BEG05 (PO date, mandatory in BEG)            must be a date within one day of DTM02
                                                                   (a local-date BEG05 is tolerated)
2 purchaser DEA no.    N1*BY loop: N103 ``11`` (DEA), N104          required, exactly one N1*BY; check digit
  purchaser name       N102                                        required
  purchaser address    N3 (N301, N302) + N4 (N401 city, N402        N3 required, N4 optional; joined as
                       state, N403 postal code, N404 country)       "street, city, ST zip[, country]"
3-5 supplier           N1*SU loop (SU = supplier), same elements    required, exactly one N1*SU
per line (PO1 loop)
  line number          PO101                                       required positive whole number
9 number of packages   PO102 quantity ordered, PO103 unit           whole number > 0; PO103 one of EA, PK,
                                                                   BO, BX (one NDC package each)
7 NDC                  PO1 product id pair with qualifier ``N4``    required, exactly one; normalized to
                       (NDC 5-4-2; PO106/PO107 or a later pair)     11-digit 5-4-2 (hyphenated 10-digit
                                                                   forms accepted)
7 product name         PID*F*08***<name> (08 = product)             required
7 strength             PID*F*ZZ***<strength> (ZZ = mutually         required (project convention; agree it
                       defined)                                    in the trading partner agreement)
8 units per package    PO401 (pack: inner units per outer pack)     required positive whole number
(line count)           CTT01                                       required, = number of PO1 segments
====================  ==========================================  =========================================

Other segments (REF, PER, FOB, ITD, PO104 price, ...) are allowed and ignored.
Element text must be printable ASCII (X12 basic/extended character set).
The party qualifiers are constants below so that a partner guide using, say,
``N1*SE`` or ``N1*VN`` for the supplier is a one-line change.
"""
from __future__ import annotations

import re
from datetime import date, datetime, timezone

import x12

from streams.domain.identifiers import is_valid_dea_number, is_valid_order_number, normalize_ndc
from streams.domain.model import Order, OrderLine, Party
from streams.domain.order_document import (MAX_LINE_NO, MAX_LINES, MAX_QUANTITY, MAX_TEXT, DocumentError, check_line_numbers,
                             check_range, check_text)

FORMAT = "x12-850"

PURCHASER_ENTITY = "BY"  # N101 buying party
SUPPLIER_ENTITY = "SU"  # N101 supplier
DEA_QUALIFIER = "11"  # N103: Drug Enforcement Administration (DEA) number
NDC_QUALIFIER = "N4"  # PO1 product/service id qualifier: NDC in 5-4-2 format
SIGNED_DATE_QUALIFIER = "004"  # DTM01: purchase order date
UTC_TIME_CODE = "UT"  # DTM04: universal time coordinate
NAME_CHARACTERISTIC = "08"  # PID02: product
STRENGTH_CHARACTERISTIC = "ZZ"  # PID02: mutually defined (strength)
PACKAGE_UNITS = ("EA", "PK", "BO", "BX")  # PO103 codes meaning "one NDC package"

_PRINTABLE = re.compile(r"[\x20-\x7e]*\Z")
_TEXT_BYTES = bytes(range(0x20, 0x7F)) + b"\r\n"  # printable ASCII; CR/LF only as formatting between segments
_CCYYMMDD = re.compile(r"[0-9]{8}")
_WHOLE = re.compile(r"[0-9]{1,9}\Z")
_US_ADDRESS = re.compile(r"(?P<street>.+), (?P<city>[^,]+), (?P<state>[A-Z]{2}) (?P<zip>[0-9]{5}(?:-?[0-9]{4})?)\Z")

Seg = tuple[str, list[str]]  # (tag, elements with X12 position n at index n-1)


# ---------------------------------------------------------------- parsing

def parse_x12_850(data: object) -> Order:
    """Parse one signed 850 interchange; raise ``DocumentError`` if it is defective (``object``: compiled, a
    value that is not bytes must still be a DocumentError, not a TypeError at the call)."""
    body = _envelope(data)
    if not body or body[0][0] != "BEG":
        where = "is missing" if all(tag != "BEG" for tag, _ in body) else "must directly follow ST"
        raise DocumentError("order_number", f"the BEG segment (purchase order number and date) {where}")
    first_po1 = next((i for i, (tag, _) in enumerate(body) if tag == "PO1"), len(body))
    header, detail = body[:first_po1], body[first_po1:]
    if sum(tag == "BEG" for tag, _ in header) != 1:
        raise DocumentError("order_number", "more than one BEG segment")
    beg = header[0][1]
    if _el(beg, 1) != "00":
        raise DocumentError("purpose", f"BEG01 is {_el(beg, 1)!r}: only an original order (00) can be filled")
    number = _el(beg, 3)
    if not is_valid_order_number(number):
        raise DocumentError("order_number", f"BEG03 {number!r} is not two-digit year + 'X' + six characters")
    signed_at = _signed_at(header, _el(beg, 5))
    loops = _n1_loops(header)
    by, su = _party_loop(loops, PURCHASER_ENTITY, "purchaser"), _party_loop(loops, SUPPLIER_ENTITY, "supplier")
    purchaser, supplier = _party(by, PURCHASER_ENTITY, "purchaser"), _party(su, SUPPLIER_ENTITY, "supplier")
    return Order(number, purchaser, supplier, signed_at, _lines(detail))


def _envelope(data: object) -> list[Seg]:
    """Check bytes and envelopes; return the 850 body (segments between ST and SE)."""
    if not isinstance(data, (bytes, bytearray)):
        raise DocumentError("document", f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 106 or not data.startswith(b"ISA"):
        raise DocumentError("document", "not an X12 interchange: it must begin with a complete 106-character ISA header")
    separators = bytes((data[3], data[82], data[104], data[105]))
    stray = data.translate(None, _TEXT_BYTES + separators)
    if stray:
        bad = data.index(stray[:1])
        raise DocumentError("document", f"byte {bad} (0x{data[bad]:02x}) is not ASCII text; X12 orders are ASCII")
    try:
        interchange = x12.parse_x12_interchange(x12.tokenize_x12(data))
    except x12.X12TokenizerError as exc:
        raise DocumentError("document", f"not a complete X12 interchange: {exc}") from None
    except (x12.X12Error, IndexError, ValueError) as exc:
        raise DocumentError("envelope", f"{exc}") from None
    groups = interchange.groups
    sets = [t for g in groups for t in g.transactions]
    if len(groups) != 1 or len(sets) != 1:
        raise DocumentError("envelope", f"one order per interchange: expected one GS group with one ST transaction set, "
                                        f"found {len(groups)} group(s) and {len(sets)} transaction set(s)")
    if groups[0].functional_identifier_code != b"PO":
        raise DocumentError("envelope", f"GS01 is {groups[0].functional_identifier_code!r}, expected PO (purchase order)")
    if sets[0].transaction_set_code != b"850":
        raise DocumentError("envelope", f"ST01 is {sets[0].transaction_set_code!r}, expected 850 (purchase order)")
    segments = sets[0].segments
    if not data.isascii():  # a separator byte above 0x7f: segment by segment, failing where it is used
        body = []
        for seg in segments:
            _no_line_break(seg)
            body.append((seg.tag, [e.decode("ascii") for e in seg.elements]))
        return body
    # All ASCII: no element can fail to decode, and ASCII reads the same as UTF-8 (the faster default).
    raws = b"".join([seg.raw for seg in segments])
    if b"\r" in raws or b"\n" in raws:
        for seg in segments:
            _no_line_break(seg)
    return [(seg.tag, list(map(bytes.decode, seg.elements))) for seg in segments]


def _no_line_break(seg: x12.X12Segment) -> None:
    if b"\r" in seg.raw or b"\n" in seg.raw:
        raise DocumentError("document", f"segment {seg.tag} contains a line break inside its data")


def _el(elements: list[str], n: int) -> str:
    """Element at X12 position ``n`` (1-based), '' when absent."""
    return elements[n - 1] if len(elements) >= n else ""


def _date(raw: str) -> date | None:
    """A CCYYMMDD date, None if it is not one. Eight ASCII digits read by slicing (what strptime's
    ``%Y%m%d`` reads from them, at a twentieth of the cost); an impossible date is None."""
    if not _CCYYMMDD.fullmatch(raw):
        return None
    try:
        return date(int(raw[0:4]), int(raw[4:6]), int(raw[6:8]))
    except ValueError:
        return None


def _signed_at(header: list[Seg], beg05: str) -> datetime:
    dtms = [e for tag, e in header if tag == "DTM" and _el(e, 1) == SIGNED_DATE_QUALIFIER]
    if len(dtms) != 1:
        problem = "is missing" if not dtms else "appears more than once"
        raise DocumentError("signed_at", f"the signing date DTM*{SIGNED_DATE_QUALIFIER} (date, time, UT) {problem}")
    dtm = dtms[0]
    day, time, code = _date(_el(dtm, 2)), _el(dtm, 3), _el(dtm, 4)
    if day is None:
        raise DocumentError("signed_at", f"DTM02 {_el(dtm, 2)!r} is not a CCYYMMDD date")
    if not re.fullmatch(r"[0-9]{4}([0-9]{2})?", time):
        raise DocumentError("signed_at", f"DTM03 {time!r} is not a time HHMMSS")
    if code != UTC_TIME_CODE:
        raise DocumentError("signed_at", f"DTM04 time code {code!r}: the signing time must be given in UTC ({UTC_TIME_CODE})")
    try:
        signed = datetime(day.year, day.month, day.day, int(time[0:2]), int(time[2:4]), int(time[4:6] or 0),
                          tzinfo=timezone.utc)
    except ValueError:
        raise DocumentError("signed_at", f"DTM03 {time!r} is not a valid time of day") from None
    po_date = _date(beg05)
    if po_date is None:
        raise DocumentError("signed_at", f"BEG05 purchase order date {beg05!r} is not a CCYYMMDD date")
    if abs((po_date - day).days) > 1:
        raise DocumentError("signed_at", f"BEG05 purchase order date {po_date} contradicts the signing date {day} in DTM02")
    return signed


def _n1_loops(header: list[Seg]) -> list[list[Seg]]:
    """Header N1 loops: each N1 and the segments up to the next N1 (N1 loops close the 850 header)."""
    loops: list[list[Seg]] = []
    for seg in header:
        if seg[0] == "N1":
            loops.append([seg])
        elif loops:
            loops[-1].append(seg)
    return loops


def _party_loop(loops: list[list[Seg]], entity: str, key: str) -> list[Seg]:
    found = [loop for loop in loops if _el(loop[0][1], 1) == entity]
    if len(found) != 1:
        problem = "is missing" if not found else "appears more than once"
        raise DocumentError(key, f"the {key} loop N1*{entity} (name, DEA number, address) {problem}")
    return found[0]


def _party(loop: list[Seg], entity: str, key: str) -> Party:
    (_, n1), *rest = loop
    name, qualifier, dea = _el(n1, 2), _el(n1, 3), _el(n1, 4)
    if not name.strip():
        raise DocumentError(f"{key}.name", f"N1*{entity} N102 (name) is empty")
    check_text(name, f"{key}.name")
    if qualifier != DEA_QUALIFIER or not dea:
        raise DocumentError(f"{key}.dea_number",
                            f"N1*{entity} carries no DEA number: N103 must be {DEA_QUALIFIER} (DEA) and N104 the number")
    if not is_valid_dea_number(dea):
        raise DocumentError(f"{key}.dea_number", f"N1*{entity} N104 {dea!r} is not a valid DEA number (format or check digit)")
    street = [v for tag, e in rest if tag == "N3" for v in (_el(e, 1), _el(e, 2)) if v.strip()]
    n4s = [e for tag, e in rest if tag == "N4"]
    if not street:
        raise DocumentError(f"{key}.address", f"N1*{entity} has no street address (N3)")
    if len(n4s) > 1:
        raise DocumentError(f"{key}.address", f"N1*{entity} has more than one N4")
    parts = list(street)
    if n4s:
        n4 = n4s[0]
        place = ", ".join(p for p in (_el(n4, 1), " ".join(p for p in (_el(n4, 2), _el(n4, 3)) if p)) if p)
        parts += [p for p in (place, _el(n4, 4)) if p]
    return Party(dea, name, check_text(", ".join(parts), f"{key}.address"))


def _lines(detail: list[Seg]) -> tuple[OrderLine, ...]:
    if not detail:
        raise DocumentError("lines", "the order has no items (PO1)")
    ctt_at = next((i for i, (tag, _) in enumerate(detail) if tag == "CTT"), None)
    if ctt_at is None:
        raise DocumentError("lines", "the CTT segment (number of line items) is missing")
    items, summary = detail[:ctt_at], detail[ctt_at:]
    if any(tag in ("PO1", "CTT") for tag, _ in summary[1:]):
        raise DocumentError("lines", "PO1 or CTT after the CTT summary segment")
    loops: list[list[Seg]] = []
    for seg in items:
        if seg[0] == "PO1":
            loops.append([seg])
        else:
            loops[-1].append(seg)
    if len(loops) > MAX_LINES:
        raise DocumentError("lines", f"more than {MAX_LINES} items")
    declared = _el(summary[0][1], 1)
    if not _WHOLE.match(declared) or int(declared) != len(loops):
        raise DocumentError("lines", f"CTT01 declares {declared!r} line items but the order has {len(loops)} PO1 segments")
    lines = tuple(_line(i, loop) for i, loop in enumerate(loops, start=1))
    check_line_numbers(lines)
    return lines


def _positive(raw: str, element: str, what: str) -> int:
    if not _WHOLE.match(raw) or int(raw) <= 0:
        raise DocumentError(element, f"{what} {raw!r} must be a positive whole number")
    return int(raw)


def _bounded(raw: str, i: int, field: str, what: str, high: int) -> int:
    """``raw`` as a whole number in 1..``high`` (``_positive`` then ``check_range``); the element's name
    is only spelled out for the error (most of an order's cost was building names for errors never raised)."""
    if _WHOLE.match(raw) and 0 < int(raw) <= high:
        return int(raw)
    element = f"lines[{i}].{field}"
    return check_range(_positive(raw, element, what), element, what, high)


def _line(i: int, loop: list[Seg]) -> OrderLine:
    where = f"lines[{i}]"
    po1 = loop[0][1]
    line_no = _bounded(_el(po1, 1), i, "line_no", "PO101 line number", MAX_LINE_NO)
    packages = _bounded(_el(po1, 2), i, "packages", "PO102 quantity ordered", MAX_QUANTITY)
    if _el(po1, 3) not in PACKAGE_UNITS:
        raise DocumentError(f"{where}.packages", f"PO103 unit {_el(po1, 3)!r}: order whole NDC packages "
                                                 f"({', '.join(PACKAGE_UNITS)})")
    ndcs = [_el(po1, n + 1) for n in range(6, len(po1) + 1, 2) if _el(po1, n) == NDC_QUALIFIER]
    if len(ndcs) != 1:
        problem = "has no NDC" if not ndcs else "has more than one NDC"
        raise DocumentError(f"{where}.ndc", f"PO1 {problem}: give it as product id qualifier {NDC_QUALIFIER} (PO106) "
                                            f"and the 11-digit NDC (PO107)")
    try:
        ndc = normalize_ndc(ndcs[0])
    except ValueError as exc:
        raise DocumentError(f"{where}.ndc", str(exc)) from None
    pids, po4s = _pids_and_po4s(loop)
    name = _pid(pids.get(NAME_CHARACTERISTIC, []), NAME_CHARACTERISTIC, i, "product_name", "product name")
    strength = _pid(pids.get(STRENGTH_CHARACTERISTIC, []), STRENGTH_CHARACTERISTIC, i, "strength", "strength")
    if len(po4s) != 1:
        raise DocumentError(f"{where}.package_quantity", "exactly one PO4 (PO401 = units in a single package) is required")
    package_quantity = _bounded(_el(po4s[0], 1), i, "package_quantity", "PO401 units per package", MAX_QUANTITY)
    return OrderLine(line_no, ndc, name, strength, package_quantity, packages)


def _pids_and_po4s(loop: list[Seg]) -> tuple[dict[str, list[str]], list[list[str]]]:
    """One pass over a PO1 loop: PID05 of each free-form PID (PID01 ``F``) by its PID02 code, in order,
    and the PO4 segments."""
    pids: dict[str, list[str]] = {}
    po4s: list[list[str]] = []
    for tag, e in loop:
        if tag == "PID":
            if len(e) >= 2 and e[0] == "F":
                pids.setdefault(e[1], []).append(_el(e, 5))
        elif tag == "PO4":
            po4s.append(e)
    return pids, po4s


def _pid(values: list[str], code: str, i: int, field: str, what: str) -> str:
    """The one PID05 text given for ``code`` (``values``: every one given)."""
    if len(values) == 1 and len(values[0]) <= MAX_TEXT and values[0].strip():
        return values[0]
    element = f"lines[{i}].{field}"
    if len(values) != 1 or not values[0].strip():
        problem = "is missing" if not values else "must appear exactly once, non-empty"
        raise DocumentError(element, f"the {what} PID*F*{code}***<text> {problem}")
    return check_text(values[0], element)


# ---------------------------------------------------------------- encoding

_CANDIDATES = {"element": "*|!", "repetition": "^{}", "component": ">:\\", "segment": "~'@"}


def encode_x12_850(order: Order, *, sender_id: str = "PURCHASER", receiver_id: str = "SUPPLIER",
                   control_number: int = 1) -> bytes:
    """Build a one-order 850 interchange (X12 005010) such that ``parse_x12_850`` gives ``order`` back.

    NDCs are written as 11 digits (5-4-2 without hyphens), the signing time at
    second precision in UTC. Separators default to ``* ^ > ~`` and switch to
    alternatives when a value contains one. Raises ``ValueError`` for values
    that cannot be written (non-ASCII text, an id longer than 15 characters).
    """
    if not 1 <= control_number <= 999_999_999:
        raise ValueError(f"control number must be 1..999999999, got {control_number}")
    if order.signed_at.tzinfo is None:
        raise ValueError("signed_at must be timezone-aware")
    for ident in (sender_id, receiver_id):
        if not 0 < len(ident) <= 15:
            raise ValueError(f"interchange id {ident!r} must be 1-15 characters")
    signed = order.signed_at.astimezone(timezone.utc)
    texts = [sender_id, receiver_id, order.order_number, order.purchaser.name, order.purchaser.address,
             order.purchaser.dea_number, order.supplier.name, order.supplier.address, order.supplier.dea_number]
    texts += [t for ln in order.lines for t in (ln.product_name, ln.strength, ln.ndc)]
    for t in texts:
        if not _PRINTABLE.match(t):
            raise ValueError(f"{t!r} is not printable ASCII and cannot be written to X12")
    used = set("".join(texts))
    sep: dict[str, str] = {}
    for role, options in _CANDIDATES.items():
        free = [c for c in options if c not in used and c not in sep.values()]
        if not free:
            raise ValueError(f"no {role} separator available: the order uses all of {options!r}")
        sep[role] = free[0]
    e = sep["element"]

    segments: list[list[str]] = [["ST", "850", f"{control_number:04d}"],
                                 ["BEG", "00", "SA", order.order_number, "", signed.strftime("%Y%m%d")],
                                 ["DTM", SIGNED_DATE_QUALIFIER, signed.strftime("%Y%m%d"), signed.strftime("%H%M%S"),
                                  UTC_TIME_CODE]]
    for entity, party in ((PURCHASER_ENTITY, order.purchaser), (SUPPLIER_ENTITY, order.supplier)):
        segments.append(["N1", entity, party.name, DEA_QUALIFIER, party.dea_number])
        m = _US_ADDRESS.match(party.address)
        if m:
            segments += [["N3", m["street"]], ["N4", m["city"], m["state"], m["zip"]]]
        else:
            segments.append(["N3", party.address])
    for ln in order.lines:
        segments += [["PO1", str(ln.line_no), str(ln.packages), "EA", "", "", NDC_QUALIFIER,
                      normalize_ndc(ln.ndc).replace("-", "")],
                     ["PID", "F", NAME_CHARACTERISTIC, "", "", ln.product_name],
                     ["PID", "F", STRENGTH_CHARACTERISTIC, "", "", ln.strength],
                     ["PO4", str(ln.package_quantity)]]
    segments.append(["CTT", str(len(order.lines))])
    segments.append(["SE", str(len(segments) + 1), f"{control_number:04d}"])

    isa = ["ISA", "00", " " * 10, "00", " " * 10, "ZZ", sender_id.ljust(15), "ZZ", receiver_id.ljust(15),
           signed.strftime("%y%m%d"), signed.strftime("%H%M"), sep["repetition"], "00501",
           f"{control_number:09d}", "0", "P", sep["component"]]
    envelope_head = [isa, ["GS", "PO", sender_id, receiver_id, signed.strftime("%Y%m%d"), signed.strftime("%H%M"),
                           str(control_number), "X", "005010"]]
    envelope_tail = [["GE", "1", str(control_number)], ["IEA", "1", f"{control_number:09d}"]]
    out = "".join(e.join(s) + sep["segment"] + "\n" for s in envelope_head + segments + envelope_tail)
    return out.encode("ascii")


def claimed_identifiers(data: bytes) -> tuple[str | None, str | None]:
    """(BEG03 order number, N1*BY N104 purchaser DEA number) as the interchange claims them, without validating it.

    Why: the ClickHouse sink files every received order under these for lookup, best effort, and a full
    :func:`parse_x12_850` (envelopes, every line) cost it more than all its other work on that order. For a
    valid interchange the values are those ``parse_x12_850`` returns (the first BEG, the N1 loop whose entity
    is ``BY`` with the DEA qualifier); a defective one is still filed under what it claims, as a defective
    JSON order is. None where the element is absent.
    """
    data = bytes(data)
    if len(data) < 106 or not data.startswith(b"ISA"):
        return None, None
    element, terminator = chr(data[3]), chr(data[105])
    number = dea = None
    for segment in data.decode("ascii", errors="replace").split(terminator):
        parts = segment.strip().split(element)
        if parts[0] == "BEG" and number is None:
            number = _el(parts[1:], 3) or None
        elif parts[0] == "N1" and dea is None and _el(parts[1:], 1) == PURCHASER_ENTITY \
                and _el(parts[1:], 3) == DEA_QUALIFIER:
            dea = _el(parts[1:], 4) or None
    return number, dea
