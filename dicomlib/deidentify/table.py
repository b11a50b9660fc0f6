"""PS3.15 Table E.1-1 as data: table_e1_1.csv beside this module (its header says where it came from)."""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

TABLE_FILE = Path(__file__).with_name("table_e1_1.csv")
ACTIONS = ("D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*")


@dataclass(frozen=True)
class Row:
    tag: str  # eight hex digits; x for any digit of a repeating group (50xx, 60xx)
    keyword: str
    name: str
    action: str


@functools.cache
def rows() -> tuple[Row, ...]:
    """Every row of the table, in tag order."""
    with open(TABLE_FILE, newline="", encoding="utf-8") as handle:
        lines = [line for line in handle if not line.startswith("#")]
    table = tuple(Row(r["tag"], r["keyword"], r["name"], r["basic_profile"]) for r in csv.DictReader(lines))
    unknown = {row.action for row in table} - set(ACTIONS)
    if unknown:
        raise ValueError(f"{TABLE_FILE}: unknown action codes {sorted(unknown)}")
    return table


@functools.cache
def _exact() -> dict[int, str]:
    return {int(row.tag, 16): row.action for row in rows() if "x" not in row.tag}


@functools.cache
def _masked() -> tuple[tuple[int, int, str], ...]:
    """(mask, value, action) of the repeating-group rows: tag & mask == value."""
    out = []
    for row in rows():
        if "x" in row.tag:
            mask = int("".join("0" if c == "x" else "F" for c in row.tag), 16)
            value = int(row.tag.replace("x", "0"), 16)
            out.append((mask, value, row.action))
    return tuple(out)


def basic_action(tag: int) -> str | None:
    """The Basic Profile's action code for a tag, None for an attribute the table does not list."""
    action = _exact().get(tag)
    if action is not None:
        return action
    for mask, value, masked_action in _masked():
        if tag & mask == value:
            return masked_action
    return None
