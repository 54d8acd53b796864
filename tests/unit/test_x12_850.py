"""X12 850 purchase orders: mapping to the 1305.21(b) elements, round trip, one test per defect."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from streams.domain.documents import FORMATS, detect_format, parse_document
from streams.domain.identifiers import make_dea_number
from streams.domain.model import Order, OrderLine, Party
from streams.domain.order_document import FORMAT as JSON_FORMAT
from streams.domain.order_document import DocumentError, encode_order
from streams.domain.x12_850 import FORMAT, encode_x12_850, parse_x12_850

PURCHASER_DEA = make_dea_number("FA", "123456")  # FA1234563
SUPPLIER_DEA = make_dea_number("PA", "654321")  # PA6543210
PURCHASER = Party(PURCHASER_DEA, "Acme Pharmacy", "1 Main St, Springfield, IL 62701")
SUPPLIER = Party(SUPPLIER_DEA, "Example Distribution Co", "1200 COMMERCE WAY, NORWOOD, MA 02062")
SIGNED = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)

OXY = OrderLine(1, "10702-0018-01", "OXYCODONE HCL 5 MG TABLET", "5 MG", 100, 2)
ALP = OrderLine(2, "00228-2029-10", "ALPRAZOLAM 1 MG TABLET", "1 MG", 100, 5)
HYD = OrderLine(3, "51655-0089-52", "HYDROCODONE BIT/APAP 10-325 MG TABLET", "10 MG/325 MG", 500, 12)


def order(*lines: OrderLine, **kw) -> Order:
    fields = dict(order_number="26X000123", purchaser=PURCHASER, supplier=SUPPLIER, signed_at=SIGNED,
                  lines=lines or (OXY,))
    fields.update(kw)
    return Order(**fields)


# ---------------------------------------------------------------- round trip

@pytest.mark.parametrize("o", [
    order(),
    order(OXY, ALP, HYD),
    order(*(OrderLine(k, "10702-0018-01", "OXYCODONE HCL 5 MG TABLET", "5 MG", 100, k) for k in range(1, 41))),
    order(OXY, purchaser=Party(PURCHASER_DEA, "St. Mary's Hospital #2", "Bldg 4, 77 Elm Ave, Apt 9, Boston, MA 02115-1234"),
          supplier=Party(SUPPLIER_DEA, "Example Distribution Co", "100 Warehouse Rd, Columbus OH")),
    # values containing the default separators switch the encoder to other ones
    order(OXY, purchaser=Party(PURCHASER_DEA, "A*B ~ C^D >E Pharmacy", "1 Main St, Springfield IL")),
    order(OXY, order_number="99XABC123", signed_at=datetime(2099, 12, 31, 23, 59, 59, tzinfo=timezone.utc)),
], ids=["one-line", "three-lines", "forty-lines", "address-forms", "separator-chars", "edge-date"])
def test_round_trip(o: Order) -> None:
    data = encode_x12_850(o)
    assert parse_x12_850(data) == o
    assert parse_document(data, FORMAT) == o
    assert detect_format(data) == FORMAT


def test_round_trip_normalizes_ndc_and_signing_time() -> None:
    local = datetime(2026, 3, 4, 0, 6, 7, 123456, tzinfo=timezone(timedelta(hours=-5)))
    o = order(OrderLine(1, "0228-2029-10", "ALPRAZOLAM 1 MG TABLET", "1 MG", 100, 5),  # 4-4-2
              OrderLine(2, "51655-089-52", "HYDROCODONE", "10 MG", 500, 1),  # 5-3-2
              OrderLine(3, "58118-1397-3", "OXYCODONE", "5 MG", 100, 1),  # 5-4-1
              OrderLine(4, "10702001801", "OXYCODONE", "5 MG", 100, 1),  # 11 digits
              signed_at=local)
    got = parse_x12_850(encode_x12_850(o, sender_id="ACMERX", receiver_id="EXAMPLEDIST", control_number=4711))
    assert [ln.ndc for ln in got.lines] == ["00228-2029-10", "51655-0089-52", "58118-1397-03", "10702-0018-01"]
    assert got.signed_at == SIGNED and got.signed_at.tzinfo == timezone.utc


def test_encoder_writes_ndc_as_eleven_digits_and_utc() -> None:
    text = encode_x12_850(order(ALP)).decode("ascii")
    assert "PO1*2*5*EA***N4*00228202910~" in text
    assert "DTM*004*20260304*050607*UT~" in text
    assert text.startswith("ISA*") and len(text.split("\n")[0]) == 106


def test_encoder_refuses_non_ascii_text() -> None:
    with pytest.raises(ValueError):
        encode_x12_850(order(purchaser=Party(PURCHASER_DEA, "Café Pharmacy", "1 Main St")))


# ---------------------------------------------------------------- a hand-written sample

SAMPLE = b"""\
ISA*00*          *00*          *ZZ*ACMERX001      *ZZ*EXAMPLEDIST    *260304*0507*^*00501*000000905*0*P*>~
GS*PO*ACMERX001*EXAMPLEDIST*20260304*0507*905*X*005010~
ST*850*0905~
BEG*00*SA*26X0A1B2C**20260304~
CUR*BY*USD~
REF*IA*88412~
PER*BD*JANE ROE, PHARMACIST IN CHARGE*TE*6175550100~
DTM*004*20260304*050607*UT~
N1*BY*ACME PHARMACY #12*11*FA1234563~
N3*45 HARBOR ST*SUITE 2~
N4*SALEM*MA*01970*US~
N1*SU*EXAMPLE DISTRIBUTION CO*11*PA6543210~
N3*1200 COMMERCE WAY~
N4*NORWOOD*MA*02062~
N1*ST*ACME PHARMACY #12*92*12~
PO1*1*2*EA*41.20*PE*N4*10702001801*VN*OXY5-100~
PID*F*08***OXYCODONE HCL 5 MG TABLET~
PID*F*ZZ***5 MG~
PO4*100~
PO1*2*5*BO*12.75*PE*VN*ALP1-100*N4*00228-2029-10~
PID*F*08***ALPRAZOLAM 1 MG TABLET~
PID*F*ZZ***1 MG~
PO4*100*1*EA~
REF*LI*2~
CTT*2~
AMT*TT*146.15~
SE*25*0905~
GE*1*905~
IEA*1*000000905~
"""


def test_hand_written_sample() -> None:
    o = parse_x12_850(SAMPLE)
    assert o == Order(
        order_number="26X0A1B2C",
        purchaser=Party("FA1234563", "ACME PHARMACY #12", "45 HARBOR ST, SUITE 2, SALEM, MA 01970, US"),
        supplier=Party("PA6543210", "EXAMPLE DISTRIBUTION CO", "1200 COMMERCE WAY, NORWOOD, MA 02062"),
        signed_at=SIGNED,
        lines=(OrderLine(1, "10702-0018-01", "OXYCODONE HCL 5 MG TABLET", "5 MG", 100, 2),
               OrderLine(2, "00228-2029-10", "ALPRAZOLAM 1 MG TABLET", "1 MG", 100, 5)),
    )
    assert detect_format(SAMPLE) == FORMAT
    # CRLF between segments, or none at all, is the same order
    assert parse_x12_850(SAMPLE.replace(b"\n", b"\r\n")) == o
    assert parse_x12_850(SAMPLE.replace(b"\n", b"")) == o


# ---------------------------------------------------------------- defects

ISA = b"ISA*00*          *00*          *ZZ*PURCHASER      *ZZ*SUPPLIER       *260304*0506*^*00501*000000001*0*P*>~"
BODY = [
    "BEG*00*SA*26X000123**20260304",
    "DTM*004*20260304*050607*UT",
    "N1*BY*Acme Pharmacy*11*FA1234563",
    "N3*1 Main St",
    "N4*Springfield*IL*62701",
    "N1*SU*Example Distribution Co*11*PA6543210",
    "N3*1200 COMMERCE WAY",
    "N4*NORWOOD*MA*02062",
    "PO1*1*2*EA***N4*10702001801",
    "PID*F*08***OXYCODONE HCL 5 MG TABLET",
    "PID*F*ZZ***5 MG",
    "PO4*100",
    "CTT*1",
]


def interchange(body: list[str] | None = None, *, se_count: int | None = None, st02: str = "0001",
                se02: str = "0001", gs06: str = "1", ge02: str = "1", iea02: str = "000000001",
                sets: int = 1) -> bytes:
    """An interchange around ``body``, counts correct unless told otherwise."""
    body = BODY if body is None else body
    count = len(body) + 2 if se_count is None else se_count
    st = [f"ST*850*{st02}", *body, f"SE*{count}*{se02}"] * sets
    segs = [f"GS*PO*PURCHASER*SUPPLIER*20260304*0506*{gs06}*X*005010", *st, f"GE*{sets}*{ge02}",
            f"IEA*1*{iea02}"]
    return ISA + b"\n" + "".join(s + "~\n" for s in segs).encode("ascii")


def replace(old: str, new: str | None) -> list[str]:
    """BODY with the segment ``old`` replaced by ``new`` (or dropped)."""
    assert old in BODY
    return [new if s == old else s for s in BODY if not (s == old and new is None)]


def test_builder_makes_a_valid_order() -> None:
    assert parse_x12_850(interchange()) == order()


def defect(data: bytes) -> DocumentError:
    with pytest.raises(DocumentError) as info:
        parse_x12_850(data)
    return info.value


@pytest.mark.parametrize("body, element, says", [
    (replace("BEG*00*SA*26X000123**20260304", None), "order_number", "BEG"),
    (replace("BEG*00*SA*26X000123**20260304", "BEG*00*SA*26Y000123**20260304"), "order_number", "BEG03"),
    (replace("BEG*00*SA*26X000123**20260304", "BEG*00*SA***20260304"), "order_number", "BEG03"),
    (replace("BEG*00*SA*26X000123**20260304", "BEG*01*SA*26X000123**20260304"), "purpose", "BEG01"),
    (replace("N1*BY*Acme Pharmacy*11*FA1234563", "N1*BY*Acme Pharmacy"), "purchaser.dea_number", "N1*BY"),
    (replace("N1*BY*Acme Pharmacy*11*FA1234563", "N1*BY*Acme Pharmacy*92*FA1234563"), "purchaser.dea_number", "N103"),
    (replace("N1*BY*Acme Pharmacy*11*FA1234563", "N1*BY*Acme Pharmacy*11*FA1234564"), "purchaser.dea_number",
     "check digit"),
    (replace("N1*BY*Acme Pharmacy*11*FA1234563", "N1*ST*Acme Pharmacy*11*FA1234563"), "purchaser", "N1*BY"),
    (replace("N1*BY*Acme Pharmacy*11*FA1234563", "N1*BY**11*FA1234563"), "purchaser.name", "N102"),
    (replace("N3*1 Main St", None), "purchaser.address", "N3"),
    (replace("N1*SU*Example Distribution Co*11*PA6543210", "N1*SU*Example Distribution Co"), "supplier.dea_number",
     "N1*SU"),
    (replace("N1*SU*Example Distribution Co*11*PA6543210", None), "supplier", "N1*SU"),
    (BODY[:5] + BODY[2:], "purchaser", "more than once"),  # a second N1*BY loop
    (replace("DTM*004*20260304*050607*UT", None), "signed_at", "DTM*004"),
    (replace("DTM*004*20260304*050607*UT", "DTM*004*20260304*050607*ET"), "signed_at", "DTM04"),
    (replace("DTM*004*20260304*050607*UT", "DTM*004*20260231*050607*UT"), "signed_at", "DTM02"),
    (replace("DTM*004*20260304*050607*UT", "DTM*004*20260304*256007*UT"), "signed_at", "DTM03"),
    (replace("BEG*00*SA*26X000123**20260304", "BEG*00*SA*26X000123**20250304"), "signed_at", "BEG05"),
    (replace("PO1*1*2*EA***N4*10702001801", "PO1*1*2*EA"), "lines[1].ndc", "NDC"),
    (replace("PO1*1*2*EA***N4*10702001801", "PO1*1*2*EA***VN*OXY5"), "lines[1].ndc", "N4"),
    (replace("PO1*1*2*EA***N4*10702001801", "PO1*1*2*EA***N4*1070200180"), "lines[1].ndc", "ambiguous"),
    (replace("PO1*1*2*EA***N4*10702001801", "PO1*1*TWO*EA***N4*10702001801"), "lines[1].packages", "PO102"),
    (replace("PO1*1*2*EA***N4*10702001801", "PO1*1*2.5*EA***N4*10702001801"), "lines[1].packages", "PO102"),
    (replace("PO1*1*2*EA***N4*10702001801", "PO1*1*0*EA***N4*10702001801"), "lines[1].packages", "PO102"),
    (replace("PO1*1*2*EA***N4*10702001801", "PO1*1*2*UN***N4*10702001801"), "lines[1].packages", "PO103"),
    (replace("PO1*1*2*EA***N4*10702001801", "PO1*A*2*EA***N4*10702001801"), "lines[1].line_no", "PO101"),
    (replace("PID*F*08***OXYCODONE HCL 5 MG TABLET", None), "lines[1].product_name", "PID*F*08"),
    (replace("PID*F*ZZ***5 MG", None), "lines[1].strength", "PID*F*ZZ"),
    (replace("PO4*100", None), "lines[1].package_quantity", "PO4"),
    (replace("PO4*100", "PO4*-100"), "lines[1].package_quantity", "PO401"),
    (replace("CTT*1", "CTT*2"), "lines", "CTT01"),
    (replace("CTT*1", None), "lines", "CTT"),
    (BODY[:8] + ["CTT*0"], "lines", "no items"),
])
def test_defective_element_is_named(body: list[str], element: str, says: str) -> None:
    err = defect(interchange(body))
    assert err.element == element, str(err)
    assert says in str(err)


def test_second_line_defect_names_that_line() -> None:
    body = BODY[:12] + ["PO1*2*1*EA***N4*BAD-NDC-X", "PID*F*08***X", "PID*F*ZZ***1 MG", "PO4*10", "CTT*2"]
    assert defect(interchange(body)).element == "lines[2].ndc"


@pytest.mark.parametrize("kw, says", [
    (dict(se_count=14), "SE01"),
    (dict(se02="0002"), "ST02"),
    (dict(ge02="2"), "GS06"),
    (dict(iea02="000000002"), "ISA13"),
])
def test_envelope_counts_and_control_numbers(kw: dict, says: str) -> None:
    err = defect(interchange(**kw))
    assert err.element == "envelope" and says in str(err)


def test_two_transaction_sets_are_refused() -> None:
    err = defect(interchange(sets=2))
    assert err.element == "envelope" and "one ST" in str(err)


def test_other_transaction_set_or_group_is_refused() -> None:
    assert defect(interchange().replace(b"ST*850*", b"ST*855*")).element == "envelope"
    assert defect(interchange().replace(b"GS*PO*", b"GS*PR*")).element == "envelope"


def test_truncated_document() -> None:
    data = interchange()
    assert defect(data[: data.index(b"PID*F*08") + 5]).element == "document"  # cut inside a segment
    cut = data.index(b"GE*")  # cut after a whole segment: no GE/IEA
    assert defect(data[:cut]).element == "envelope"
    assert defect(data[:50]).element == "document"  # not even an ISA header


@pytest.mark.parametrize("data", [
    b"",
    b"hello, world",
    b"\x00" * 300,
    b"UNA:+.? 'UNB+UNOC:3+SENDER+RECEIVER+260304:0506+1'" + b" " * 80,  # EDIFACT, not X12
    bytes(range(256)) * 2,
    ISA[:-3] + b"*>~GS*PO~",  # ISA damaged: separators not at their fixed positions
])
def test_garbage_bytes(data: bytes) -> None:
    assert defect(data).element in ("document", "envelope")


def test_non_ascii_and_binary() -> None:
    utf8 = interchange().replace(b"Acme Pharmacy", "Café Pharmacy".encode("utf-8"))
    err = defect(utf8)
    assert err.element == "document" and "ASCII" in str(err)
    binary = interchange().replace(b"OXYCODONE", b"OXY\x00\x01\xff\xfe")
    assert defect(binary).element == "document"
    tab = interchange().replace(b"OXYCODONE", b"OXY\tCODONE")
    assert defect(tab).element == "document"


# ---------------------------------------------------------------- dispatch

def test_parse_document_keeps_the_json_path() -> None:
    o = order(OXY, ALP)
    data = encode_order(o)
    assert detect_format(data) == JSON_FORMAT
    assert parse_document(data, JSON_FORMAT) == o
    with pytest.raises(DocumentError) as info:
        parse_document(data.replace(b"26X000123", b"26Y000123"), JSON_FORMAT)
    assert info.value.element == "order_number"


def test_formats_and_unknown_format() -> None:
    assert set(FORMATS) == {JSON_FORMAT, FORMAT}
    with pytest.raises(DocumentError) as info:
        parse_document(b"{}", "edifact-orders")
    assert info.value.element == "format"
    with pytest.raises(DocumentError) as info:
        detect_format(b"UNB+UNOC")
    assert info.value.element == "format"
    # the wrong parser for the bytes is a defect, not a crash
    with pytest.raises(DocumentError):
        parse_document(encode_x12_850(order()), JSON_FORMAT)
    with pytest.raises(DocumentError):
        parse_document(encode_order(order()), FORMAT)


def test_mutated_documents_never_crash_the_parser() -> None:
    """Whatever arrives, the verifier gets an Order or a DocumentError, never another exception."""
    import random

    bases = [interchange(), SAMPLE, encode_x12_850(order(OXY, ALP, HYD))]
    rnd = random.Random(850)
    for _ in range(1500):
        data = bytearray(rnd.choice(bases))
        for _ in range(rnd.randint(1, 4)):
            i = rnd.randrange(len(data))
            op = rnd.random()
            if op < 0.3:
                data[i] = rnd.choice(b"*~>^\n0123456789ABZ \x00\xff")
            elif op < 0.6:
                del data[i:i + rnd.randint(1, 20)]
            else:
                data[i:i] = data[rnd.randrange(len(data)):][:rnd.randint(1, 30)]
        try:
            assert isinstance(parse_x12_850(bytes(data)), Order)
        except DocumentError:
            pass


def test_line_break_inside_an_element_is_refused() -> None:
    err = defect(interchange().replace(b"OXYCODONE HCL", b"OXYCODONE\nHCL"))
    assert err.element == "document" and "line break" in str(err)
