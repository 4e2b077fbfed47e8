"""The groups a data row belongs to: its language and task family, when it says (`lang`, `task`; the bundled
data does, data/make_data.py). Samples keep them through encoding, so evaluation reports every figure per
group (finetune/evaluation/groups.py)."""

from __future__ import annotations

GROUP_FIELDS = {"lang": ("language", "languages"), "task": ("task family", "task families")}
"""Row fields that evaluation groups by, and what a report calls them (one, several)."""


def row_groups(row: dict) -> dict[str, str]:
    """{field: value} of the group fields a data row (or a sample encoded from it) carries."""
    return {field: row[field] for field in GROUP_FIELDS if isinstance(row.get(field), str) and row[field]}
