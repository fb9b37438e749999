"""Names: ordering file names the way people number them, and the one check that a name from
a request is safe to become a path component or a key part."""

from __future__ import annotations

import re

from core.errors import InvalidInput

__all__ = ["natural_key", "safe_name", "safe_name_error"]

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> list[int | str]:
    """Sort key for natural order: runs of digits compare as numbers, the rest ignoring
    case, so ``frame_2`` sorts before ``frame_10`` and ``IMG_1`` beside ``img_1``.

    Frame and photo order matters: sequential matching pairs neighbours in this order.
    """
    # isdecimal, not isdigit: '²' is a digit to isdigit but not to int() nor to \d.
    return [int(part) if part.isdecimal() else part.lower() for part in _DIGITS.split(name)]


SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SAFE_NAME_RULE = (
    "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit (never a path)"
)


def safe_name_error(value: object) -> str | None:
    """Why `value` cannot become one path component or key part, or None when it can.

    Every name a request gives that becomes a folder, a file or a key (task ids, production
    ids, project names, output file names) passes here: no `/`, `\\`, `..`, `.`, leading
    dots or dashes, control characters or empty names, so nothing can leave its folder."""
    if not isinstance(value, str):
        return f"must be a string ({SAFE_NAME_RULE})"
    if not SAFE_NAME.fullmatch(value) or value.strip(".") == "":
        return f"{value[:80]!r} is not a safe name: {SAFE_NAME_RULE}"
    return None


def safe_name(value: object, field: str) -> str:
    """`value` if it is a safe name (see `safe_name_error`), else `invalid_input` naming `field`."""
    problem = safe_name_error(value)
    if problem:
        raise InvalidInput(f"{field}: {problem}")
    assert isinstance(value, str)
    return value
