"""Requests the gateway refused, counted in memory per UTC day, key and reason,
and handed to the store in batches (never a write per refused request)."""
from __future__ import annotations

import collections
from datetime import datetime, timezone

Counts = dict[tuple[str, str, str, int], int]


class RefusalCounter:
    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: collections.Counter = collections.Counter()

    def count(self, key_name: str, reason: str, status: int, now: float) -> None:
        day = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d")
        self._counts[(day, key_name, reason, status)] += 1

    def take(self) -> Counts:
        """The counts so far; the counter starts again from zero."""
        counts, self._counts = dict(self._counts), collections.Counter()
        return counts

    def give_back(self, counts: Counts) -> None:
        """Counts that could not be stored, to be tried again with the next batch."""
        self._counts.update(counts)
