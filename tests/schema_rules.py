"""A BigQuery rule the tests check rows' schemas against: RECORDs nest at most 15 levels."""

from __future__ import annotations

from schemas.bigquery import RECORD, field_type


def nesting_depth(schema: list[dict]) -> int:
    """Levels of nested RECORDs: 0 with none, 1 for a top-level RECORD of leaves, and so on."""
    depth = 0
    for f in schema:
        if field_type(f) == RECORD:
            depth = max(depth, 1 + nesting_depth(f.get("fields", [])))
    return depth
