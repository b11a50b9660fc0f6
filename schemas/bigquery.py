"""The metadata table's BigQuery schema: building, merging, limits, conversions.

A schema is BigQuery's JSON form, a list of fields ``{"name", "type", "mode"[, "fields"]}`` with the
legacy type names (STRING, INTEGER, FLOAT, DATE, TIME, TIMESTAMP, RECORD). The flattener
(dicomlib/flatten/) shares field dicts between rows through its per-tag cache: treat every
field here as immutable; these functions never change their arguments and return new lists (and new
dicts wherever something changed).

Rules (CONTRACT.md, "Metadata table"):

- the schema only widens: ``merge`` adds columns and nested fields, and raises SchemaConflict on a
  retype or on a mode change between NULLABLE and REPEATED (BigQuery allows neither on an existing
  column; the one mode change it allows, REQUIRED -> NULLABLE, is a relaxation merge performs, and a
  load needs ALLOW_FIELD_RELAXATION for it; the flattener never makes REQUIRED fields);
- ``--max_columns`` (default 10,000, BigQuery's own limit) counts every field, records and the
  fields nested in them included (``column_count``); ``allowed_schema`` adds a row's new columns a
  top-level column at a time, skipping those that would pass the limit, and ``restrict`` cuts a row
  to a schema, naming each cut attribute in DroppedTags with the reason ``column_limit``, or, when
  the table has no DroppedTags column, logging it as a warning on the logger ``dicom_stream``;
- BigQuery nests RECORDs at most 15 levels deep (a top-level RECORD is level 1).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow
    from google.cloud import bigquery


MAX_COLUMNS = 10_000  # BigQuery's limit on a table's columns, nested fields included
MAX_NESTING = 15  # BigQuery's limit on nested RECORD levels
DICOM_STREAM = logging.getLogger("dicom_stream")

NULLABLE, REPEATED, REQUIRED = "NULLABLE", "REPEATED", "REQUIRED"
RECORD = "RECORD"


def field(name: str, type_: str, mode: str = NULLABLE, fields: list[dict] | None = None) -> dict:
    """One schema field; ``fields`` only for a RECORD."""
    if fields is None:
        return {"name": name, "type": type_, "mode": mode}
    return {"name": name, "type": type_, "mode": mode, "fields": fields}


DROPPED_TAGS = "DroppedTags"
DROPPED_TAGS_FIELD = field(
    DROPPED_TAGS, RECORD, REPEATED, [field("TagName", "STRING"), field("Reason", "STRING")]
)
EVENT_FIELDS: list[dict] = [
    field("Type", "STRING"),  # CREATE or DELETE
    field("LastUpdated", "TIMESTAMP"),
    field("StorageClass", "STRING"),
    field("BlobStorageSize", "INTEGER"),
    DROPPED_TAGS_FIELD,
]
EVENT_COLUMNS = [f["name"] for f in EVENT_FIELDS]

# Standard SQL spellings BigQuery accepts as synonyms of the legacy ones.
_TYPE_ALIASES = {
    "INT64": "INTEGER",
    "FLOAT64": "FLOAT",
    "BOOL": "BOOLEAN",
    "STRUCT": RECORD,
}


class SchemaConflict(ValueError):
    """A field whose type or mode differs from the existing column's; the message names both."""


def field_type(f: dict) -> str:
    t = f["type"].upper()
    return _TYPE_ALIASES.get(t, t)


def _mode(f: dict) -> str:
    return (f.get("mode") or NULLABLE).upper()


def merge(existing: list[dict], new: list[dict], _path: str = "") -> list[dict]:
    """``existing`` widened by ``new``: its fields first, in order, then ``new``'s other fields in
    their order; nested RECORD fields are merged the same way. Names compare case-insensitively, as
    BigQuery's do, and keep the existing spelling. Idempotent; raises SchemaConflict on a retype or
    a NULLABLE <-> REPEATED change."""
    out = list(existing)
    index = {f["name"].lower(): i for i, f in enumerate(out)}
    for f in new:
        key = f["name"].lower()
        i = index.get(key)
        if i is None:
            index[key] = len(out)
            out.append(f)
            continue
        old = out[i]
        if old is f:
            continue
        name = f"{_path}{old['name']}"
        old_type, new_type = field_type(old), field_type(f)
        old_mode, new_mode = _mode(old), _mode(f)
        if old_type != new_type or (old_mode != new_mode and REPEATED in (old_mode, new_mode)):
            raise SchemaConflict(
                f"column {name} is {old_type} {old_mode} in the existing schema, {new_type} {new_mode} "
                "in the new one; a column is never retyped"
            )
        changed = dict(old) if old_mode == REQUIRED and new_mode == NULLABLE else None
        if changed is not None:
            changed["mode"] = NULLABLE
        if old_type == RECORD:
            sub = merge(old.get("fields", []), f.get("fields", []), f"{name}.")
            if len(sub) != len(old.get("fields", [])) or any(
                a is not b for a, b in zip(sub, old.get("fields", []), strict=True)
            ):
                changed = changed or dict(old)
                changed["fields"] = sub
        if changed is not None:
            out[i] = changed
    return out


def same_schema(a: list[dict], b: list[dict]) -> bool:
    """Whether two schemas have the same fields in the same order, with the same types, modes and
    nested fields, however the types are spelt."""
    return len(a) == len(b) and all(
        x["name"].lower() == y["name"].lower()
        and field_type(x) == field_type(y)
        and _mode(x) == _mode(y)
        and same_schema(x.get("fields") or [], y.get("fields") or [])
        for x, y in zip(a, b, strict=True)
    )


def column_count(schema: list[dict]) -> int:
    """Fields as BigQuery counts them toward its column limit: every field, records and their
    nested fields included."""
    total = 0
    for f in schema:
        total += 1
        sub = f.get("fields")
        if sub:
            total += column_count(sub)
    return total


def _priority(candidate: list[dict]) -> list[dict]:
    """Event columns and DroppedTags first (in EVENT_FIELDS order), then the rest as given (the
    flattener's order: file meta, then data set, by tag; OtherElements last)."""
    by_name = {f["name"]: f for f in candidate}
    first = [by_name[name] for name in EVENT_COLUMNS if name in by_name]
    rest = [f for f in candidate if f["name"] not in EVENT_COLUMNS]
    return first + rest


def allowed_schema(existing: list[dict], candidate: list[dict], max_columns: int = MAX_COLUMNS) -> list[dict]:
    """``existing`` widened by ``candidate``, a top-level column at a time (event columns and
    DroppedTags first, then ``candidate``'s order), skipping each column whose addition (or whose new
    nested fields) would take column_count past ``max_columns``. Existing columns always stay, even
    over the limit. Raises SchemaConflict as merge does."""
    result = list(existing)
    index = {f["name"].lower(): i for i, f in enumerate(result)}
    count = column_count(result)
    for f in _priority(candidate):
        i = index.get(f["name"].lower())
        if i is None:
            grown = column_count([f])
            if count + grown <= max_columns:
                index[f["name"].lower()] = len(result)
                result.append(f)
                count += grown
            continue
        widened = merge([result[i]], [f])[0]
        if widened is result[i]:
            continue
        grown = column_count([widened]) - column_count([result[i]])
        if count + grown <= max_columns:
            result[i] = widened
            count += grown
    return result


def to_bigquery(schema: list[dict]) -> list[bigquery.SchemaField]:
    """google.cloud.bigquery SchemaField objects for ``schema``."""
    from google.cloud import bigquery

    return [
        bigquery.SchemaField(
            f["name"],
            field_type(f),
            mode=_mode(f),
            fields=to_bigquery(f.get("fields", [])) if field_type(f) == RECORD else (),
        )
        for f in schema
    ]


def _arrow_type(f: dict) -> pyarrow.DataType:
    import pyarrow as pa

    t = field_type(f)
    if t == RECORD:
        return pa.struct([_arrow_field(sub) for sub in f.get("fields", [])])
    scalars = {
        "STRING": pa.string(),
        "INTEGER": pa.int64(),
        "FLOAT": pa.float64(),
        "BOOLEAN": pa.bool_(),
        "DATE": pa.date32(),
        "TIME": pa.time64("us"),
        "TIMESTAMP": pa.timestamp("us", tz="UTC"),
        "DATETIME": pa.timestamp("us"),
        "BYTES": pa.binary(),
        "NUMERIC": pa.decimal128(38, 9),
        "JSON": pa.string(),
    }
    try:
        return scalars[t]
    except KeyError:
        raise ValueError(f"column {f['name']}: no pyarrow type for {t}") from None


def _arrow_field(f: dict) -> pyarrow.Field:
    import pyarrow as pa

    arrow_type = _arrow_type(f)
    mode = _mode(f)
    if mode == REPEATED:
        return pa.field(f["name"], pa.list_(arrow_type))
    return pa.field(f["name"], arrow_type, nullable=mode != REQUIRED)


def to_arrow(schema: list[dict]) -> pyarrow.Schema:
    """A pyarrow schema for ``schema``: DATE -> date32, TIME -> time64[us], TIMESTAMP ->
    timestamp[us, UTC], FLOAT -> float64, INTEGER -> int64, RECORD -> struct, REPEATED -> list.
    (To load such Parquet into BigQuery with REPEATED columns, set ParquetOptions
    enable_list_inference=True on the load job.)"""
    import pyarrow as pa

    return pa.schema([_arrow_field(f) for f in schema])
