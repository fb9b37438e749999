"""One backoff for every bounded retry (URL fetches, weight downloads)."""

from __future__ import annotations

MAX_BACKOFF_S = 8.0


def backoff_s(attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (1, 2, ...): 0.5, 1, 2, 4, 8, 8, ..."""
    return min(MAX_BACKOFF_S, 0.5 * 2 ** (attempt - 1))
