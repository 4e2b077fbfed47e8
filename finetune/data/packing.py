"""How many rows packing makes: the arithmetic `finetune check` prints and the pass announces before training.

TRL packs with best-fit-decreasing (`packing_strategy="bfd"`, its default); this counts the rows it makes
from the samples' lengths alone, without building them.
"""

from __future__ import annotations

import bisect


def packed_rows(lengths: list[int], max_length: int) -> int:
    """Rows after best-fit-decreasing packing (what TRL's `bfd` strategy does)."""
    free: list[int] = []  # remaining room of each row, kept sorted
    for n in sorted(lengths, reverse=True):
        i = bisect.bisect_left(free, n)
        if i < len(free):
            room = free.pop(i) - n
        else:
            room = max_length - n
        bisect.insort(free, room)
    return len(free)
