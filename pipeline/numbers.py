"""Numbers in text, for answers checked by value: GSM8K-style solutions put the result last
("... she earned $10.00." → 10). Shared by prepare (a row's answer) and evaluate (matching it)."""

from __future__ import annotations

import re
from decimal import Decimal

# An optional sign (a minus not glued to a word: "pages 10-12" ends with 12), an optional "$",
# thousands commas ("1,000", but not "1,2,3"), decimals.
NUMBER = re.compile(r"(?:(?<![\w])-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def parse_number(text: str) -> Decimal | None:
    """``text`` as a number when all of it is one ("1,000", "$12", "-3", "0.5", "10."), else None."""
    text = text.strip().rstrip(".")
    return last_number(text) if NUMBER.fullmatch(text) else None


def last_number(text: str) -> Decimal | None:
    """The last number written in ``text`` (GSM8K's convention: the final answer comes last)."""
    found = NUMBER.findall(text)
    return Decimal(found[-1].replace(",", "").replace("$", "")) if found else None


def canonical(number: Decimal | None) -> str | None:
    """The shortest plain spelling: 72.00 → "72", 0.50 → "0.5", -3 → "-3" (never "7.2E+1"); None stays."""
    text = format(number.normalize(), "f") if number is not None else None
    return "0" if text in ("-0", "") else text
