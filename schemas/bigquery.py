"""The metadata table's BigQuery schema: building, merging, limits, conversions.

A schema is BigQuery's JSON form, a list of fields ``{"name", "type", "mode"[, "fields"]}`` with the
legacy type names (STRING, INTEGER, FLOAT, DATE, TIME, TIMESTAMP, RECORD). The flattener
(transforms/flatten.py) shares field dicts between rows through its per-tag cache: treat every
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
- BigQuery nests RECORDs at most 15 levels deep (``nesting_depth``; a top-level RECORD is level 1).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow
    from google.cloud import bigquery

    from transforms.flatten import Flat

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


def _type(f: dict) -> str:
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
        old_type, new_type = _type(old), _type(f)
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
        and _type(x) == _type(y)
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


def nesting_depth(schema: list[dict]) -> int:
    """Levels of nested RECORDs: 0 with none, 1 for a top-level RECORD of leaves, and so on."""
    depth = 0
    for f in schema:
        if _type(f) == RECORD:
            depth = max(depth, 1 + nesting_depth(f.get("fields", [])))
    return depth


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


def _covered(f: dict, target: dict) -> bool:
    """Whether every nested field of the row's RECORD field ``f`` is in the schema's ``target``."""
    have_by_name = {t["name"].lower(): t for t in target.get("fields", [])}
    for sub in f.get("fields", []):
        t = have_by_name.get(sub["name"].lower())
        if t is None or (_type(sub) == RECORD and _type(t) == RECORD and not _covered(sub, t)):
            return False
    return True


def _cut_schema(fields: list[dict], have: list[dict]) -> list[dict]:
    """``fields`` cut to the names in ``have``, recursively; a RECORD left empty is cut too."""
    have_by_name = {f["name"].lower(): f for f in have}
    out = []
    for f in fields:
        target = have_by_name.get(f["name"].lower())
        if target is None:
            continue
        if _type(f) == RECORD and _type(target) == RECORD and not _covered(f, target):
            sub = _cut_schema(f.get("fields", []), target.get("fields", []))
            if sub:
                out.append({**f, "fields": sub})
        else:
            out.append(f)
    return out


def _cut_value(value: Any, f: dict, target: dict, path: str, drops: list[str]) -> Any:
    """The value of the row's RECORD field ``f`` (a dict, or a list of dicts when REPEATED) cut to
    the schema's ``target``; the names of the attributes cut are appended to ``drops``."""
    have_by_name = {t["name"].lower(): t for t in target.get("fields", [])}
    plan: dict[str, tuple[dict, dict] | None] = {}
    for sub in f.get("fields", []):
        t = have_by_name.get(sub["name"].lower())
        if (
            t is not None
            and _type(sub) == RECORD
            and _type(t) == RECORD
            and not _covered(sub, t)
            and not _cut_schema(sub.get("fields", []), t.get("fields", []))
        ):
            t = None  # nothing of the nested record is in the schema
        plan[sub["name"]] = None if t is None else (sub, t)

    def cut_one(item: dict) -> dict:
        out = {}
        for name, v in item.items():
            pair = plan.get(name)
            if pair is None:
                _name_drops(name, v, path, drops)
                continue
            sub, t = pair
            if v is not None and _type(sub) == RECORD and _type(t) == RECORD and not _covered(sub, t):
                v = _cut_value(v, sub, t, f"{path}{name}.", drops)
            out[name] = v
        return out

    if isinstance(value, list):
        return [cut_one(item) if isinstance(item, dict) else item for item in value]
    if isinstance(value, dict):
        return cut_one(value)
    return value


def _name_drops(name: str, value: Any, path: str, drops: list[str]) -> None:
    """The attributes a cut column held: OtherElements names each private tag it held."""
    if name == "OtherElements" and isinstance(value, list) and value:
        drops.extend(f"{path}{item.get('Tag')}" for item in value if isinstance(item, dict))
    else:
        drops.append(f"{path}{name}")


def restrict(flat: Flat, schema: list[dict]) -> tuple[Flat, int]:
    """``flat`` cut to ``schema``: columns and nested fields the schema lacks are removed and named
    in DroppedTags with the reason ``column_limit``. Without a DroppedTags column in ``schema``, each
    drop (those the row already listed included) is logged as a warning on the logger
    ``dicom_stream`` instead. Returns the cut row and the number of drops that could not be
    recorded in the row."""
    have_by_name = {f["name"].lower(): f for f in schema}
    fields_by_name = {f["name"]: f for f in flat.schema}
    drops: list[str] = []
    row: dict[str, Any] = {}
    kept: list[dict] = []
    for name, value in flat.row.items():
        if name == DROPPED_TAGS:
            continue
        target = have_by_name.get(name.lower())
        f = fields_by_name.get(name)
        if (
            target is not None
            and f is not None
            and _type(f) == RECORD
            and _type(target) == RECORD
            and not _covered(f, target)
        ):
            sub = _cut_schema(f.get("fields", []), target.get("fields", []))
            if not sub:
                target = None
            else:
                if value is not None:
                    value = _cut_value(value, f, target, f"{name}.", drops)
                f = {**f, "fields": sub}
        if target is None:
            _name_drops(name, value, "", drops)
            continue
        row[name] = value
        if f is not None:
            kept.append(f)
    listed = list(flat.row.get(DROPPED_TAGS) or [])
    seen = {(d.get("TagName"), d.get("Reason")) for d in listed}
    for tag_name in drops:
        if (tag_name, "column_limit") not in seen:
            seen.add((tag_name, "column_limit"))
            listed.append({"TagName": tag_name, "Reason": "column_limit"})
    unrecorded = 0
    if DROPPED_TAGS.lower() in have_by_name:
        if listed:
            row[DROPPED_TAGS] = listed
            kept.append(DROPPED_TAGS_FIELD)
    else:
        for d in listed:
            DICOM_STREAM.warning(
                "dropped %s (%s): the table has no DroppedTags column", d.get("TagName"), d.get("Reason")
            )
        unrecorded = len(listed)
    return dataclasses.replace(flat, row=row, schema=kept), unrecorded


def to_bigquery(schema: list[dict]) -> list[bigquery.SchemaField]:
    """google.cloud.bigquery SchemaField objects for ``schema``."""
    from google.cloud import bigquery

    return [
        bigquery.SchemaField(
            f["name"],
            _type(f),
            mode=_mode(f),
            fields=to_bigquery(f.get("fields", [])) if _type(f) == RECORD else (),
        )
        for f in schema
    ]


def _arrow_type(f: dict) -> pyarrow.DataType:
    import pyarrow as pa

    t = _type(f)
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
