"""DEA numbers, NDC normalization and CSOS order numbers (streams/domain/identifiers.py)."""
from __future__ import annotations

import pytest

from streams.domain.identifiers import (
    dea_check_digit,
    is_valid_dea_number,
    is_valid_order_number,
    make_dea_number,
    normalize_ndc,
)


class TestDeaNumber:
    def test_domain_example_check_digit(self) -> None:
        # domain.md: AP5836727 -> (5+3+7) + 2*(8+6+2) = 47 -> 7
        assert dea_check_digit("583672") == 7
        assert is_valid_dea_number("AP5836727")

    @pytest.mark.parametrize("bad_digit", [d for d in "012345689"])
    def test_wrong_check_digit(self, bad_digit: str) -> None:
        assert not is_valid_dea_number("AP583672" + bad_digit)

    @pytest.mark.parametrize("value", [
        "", "AP583672", "AP58367271", "A15836727", "1P5836727", "ap5836727", "AP58367X7",
        "AP 5836727", "AP5836727 ", None, 5836727,
    ])
    def test_bad_format(self, value: object) -> None:
        assert not is_valid_dea_number(value)  # type: ignore[arg-type]

    def test_second_character_may_be_9(self) -> None:
        # Business-name registrants use 9 as the second character.
        assert is_valid_dea_number("A95836727")

    def test_make_dea_number_round_trips(self) -> None:
        dea = make_dea_number("BR", "123456")
        assert dea == "BR1234563"  # (1+3+5) + 2*(2+4+6) = 33
        assert is_valid_dea_number(dea)

    @pytest.mark.parametrize("prefix", ["A", "ABC", "a1", "ap"])
    def test_make_dea_number_rejects_bad_prefix(self, prefix: str) -> None:
        with pytest.raises(ValueError):
            make_dea_number(prefix, "123456")

    @pytest.mark.parametrize("digits", ["12345", "1234567", "12345a"])
    def test_check_digit_needs_six_digits(self, digits: str) -> None:
        with pytest.raises(ValueError):
            dea_check_digit(digits)


class TestNdc:
    @pytest.mark.parametrize("raw, expected", [
        ("0574-4072-05", "00574-4072-05"),  # 4-4-2
        ("51655-089-52", "51655-0089-52"),  # 5-3-2
        ("58118-1397-3", "58118-1397-03"),  # 5-4-1
        ("00406-0552-01", "00406-0552-01"),  # already 5-4-2
        ("00406055201", "00406-0552-01"),  # 11 digits, no hyphens
        (" 0574-4072-05 ", "00574-4072-05"),  # surrounding whitespace
    ])
    def test_normalizes_to_11_digits(self, raw: str, expected: str) -> None:
        assert normalize_ndc(raw) == expected

    def test_ten_digits_without_hyphens_is_ambiguous(self) -> None:
        with pytest.raises(ValueError, match="ambiguous"):
            normalize_ndc("0574407205")

    @pytest.mark.parametrize("raw", [
        "", "0574-4072", "0574-4072-05-1", "057-4072-05", "0574-40720-5", "05744-072-05a",
        "123456789012", "abcd-efgh-ij", "0574--4072",
    ])
    def test_malformed(self, raw: str) -> None:
        with pytest.raises(ValueError):
            normalize_ndc(raw)

    def test_not_a_string(self) -> None:
        with pytest.raises(ValueError):
            normalize_ndc(57440720)  # type: ignore[arg-type]


class TestOrderNumber:
    @pytest.mark.parametrize("value", ["26X000123", "99XABC123", "00X000000", "26XZZZZZZ"])
    def test_valid(self, value: str) -> None:
        assert is_valid_order_number(value)

    @pytest.mark.parametrize("value", [
        "", "26X00012", "26X0001234", "26Y000123", "2X0000123", "26x000123", "26X00012a",
        "AAX000123", None,
    ])
    def test_invalid(self, value: object) -> None:
        assert not is_valid_order_number(value)  # type: ignore[arg-type]


def test_normalized_ndcs_are_remembered_within_a_fixed_bound() -> None:
    """Each order line's NDC is normalized several times per order: the answer is memoized, but a sender
    inventing NDCs can only evict entries, never grow the memory; a malformed NDC is refused every time."""
    from streams.domain import identifiers

    cache = identifiers._normalize_ndc
    bound = cache.cache_info().maxsize
    assert bound is not None
    for i in range(bound + 500):
        assert normalize_ndc(f"{i % 100000:05d}-{i // 100000:04d}-01").endswith("-01")
    assert cache.cache_info().currsize <= bound
    hits = cache.cache_info().hits
    assert normalize_ndc("0406-0552-01") == normalize_ndc("0406-0552-01") == "00406-0552-01"
    assert cache.cache_info().hits == hits + 1
    for _ in range(2):
        with pytest.raises(ValueError, match="ambiguous"):
            normalize_ndc("0040605520")
    with pytest.raises(ValueError, match="must be a string"):
        normalize_ndc(["00406-0552-01"])  # type: ignore[arg-type]
