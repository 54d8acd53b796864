"""DEA registration numbers, NDCs and CSOS order numbers.

These identifiers are checked on every order line, so the functions are
strict and raise ``ValueError`` with a message a purchaser can act on.
"""
from __future__ import annotations

import re
from functools import lru_cache

_DEA_RE = re.compile(r"^[A-Z][A-Z9][0-9]{7}$")
_ORDER_NUMBER_RE = re.compile(r"^[0-9]{2}X[0-9A-Z]{6}$")

#: First letter of a DEA number -> registrant class (21 CFR 1301; DEA guidance).
DEA_FIRST_LETTERS = {
    "A": "practitioner", "B": "hospital/clinic", "F": "practitioner",
    "G": "practitioner", "M": "mid-level practitioner", "P": "distributor",
    "R": "distributor", "X": "buprenorphine prescriber",
}


def dea_check_digit(first_six: str) -> int:
    """Check digit over the first six digits: (d1+d3+d5) + 2*(d2+d4+d6), last digit."""
    if len(first_six) != 6 or not first_six.isdigit():
        raise ValueError(f"need six digits, got {first_six!r}")
    d = [int(c) for c in first_six]
    return ((d[0] + d[2] + d[4]) + 2 * (d[1] + d[3] + d[5])) % 10


def is_valid_dea_number(value: object) -> bool:
    """True when ``value`` is two letters + seven digits with a correct check digit (False for a non-str:
    typed ``object`` so that the compiled function answers False too instead of raising TypeError)."""
    if not isinstance(value, str) or not _DEA_RE.match(value):
        return False
    return dea_check_digit(value[2:8]) == int(value[8])


def make_dea_number(prefix: str, first_six: str) -> str:
    """Build a DEA number with its check digit (used by the simulator and tests)."""
    if len(prefix) != 2 or not prefix.isalpha() or not prefix.isupper():
        raise ValueError(f"DEA prefix must be two upper-case letters, got {prefix!r}")
    return f"{prefix}{first_six}{dea_check_digit(first_six)}"


#: Distinct NDC spellings whose normal form is remembered. Each order line's NDC is normalized three
#: times (parsing, the product check, enrichment); the product master has a few thousand NDCs, and a
#: hostile sender's made-up ones only evict older entries (lru_cache with a fixed maxsize), never grow it.
_NDC_CACHE_SIZE = 8192


def normalize_ndc(ndc: object) -> str:
    """Return the 11-digit 5-4-2 NDC (``LLLLL-PPPP-KK``).

    Accepts hyphenated 4-4-2, 5-3-2, 5-4-1 and 5-4-2 forms and the 11-digit
    form without hyphens. A 10-digit NDC without hyphens is ambiguous (the
    short segment is unknown) and is refused rather than guessed.
    """
    if type(ndc) is str:  # exactly str: a str subclass could hash or compare unlike its text
        return _normalize_ndc(ndc)
    if not isinstance(ndc, str):  # typed ``object``: compiled, a non-str must still be this ValueError
        raise ValueError(f"NDC must be a string, got {type(ndc).__name__}")
    return _normalize_ndc(str(ndc))


@lru_cache(maxsize=_NDC_CACHE_SIZE)
def _normalize_ndc(ndc: str) -> str:
    """The normal form of a str NDC: a pure function of its text, so memoized (a refusal raises and is
    not cached, so a malformed NDC costs a full check every time, as before)."""
    s = ndc.strip()
    if "-" in s:
        parts = s.split("-")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"malformed NDC {ndc!r}")
        lens = tuple(len(p) for p in parts)
        if lens == (4, 4, 2):
            parts[0] = "0" + parts[0]
        elif lens == (5, 3, 2):
            parts[1] = "0" + parts[1]
        elif lens == (5, 4, 1):
            parts[2] = "0" + parts[2]
        elif lens != (5, 4, 2):
            raise ValueError(f"NDC {ndc!r} is not in 4-4-2, 5-3-2, 5-4-1 or 5-4-2 form")
        return "-".join(parts)
    if s.isdigit() and len(s) == 11:
        return f"{s[:5]}-{s[5:9]}-{s[9:]}"
    if s.isdigit() and len(s) == 10:
        raise ValueError(f"10-digit NDC {ndc!r} without hyphens is ambiguous")
    raise ValueError(f"malformed NDC {ndc!r}")


def is_valid_order_number(value: object) -> bool:
    """21 CFR 1305.21(b): two-digit year + ``X`` + six purchaser-chosen characters."""
    return isinstance(value, str) and bool(_ORDER_NUMBER_RE.match(value))
