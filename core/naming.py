"""Ordering file names the way people number them."""

from __future__ import annotations

import re

__all__ = ["natural_key"]

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> list[int | str]:
    """Sort key for natural order: runs of digits compare as numbers, the rest ignoring
    case, so ``frame_2`` sorts before ``frame_10`` and ``IMG_1`` beside ``img_1``.

    Frame and photo order matters: sequential matching pairs neighbours in this order.
    """
    return [int(part) if part.isdigit() else part.lower() for part in _DIGITS.split(name)]
