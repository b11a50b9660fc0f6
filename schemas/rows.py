"""Rows of the metadata table: a flattened instance with its own schema (Flat), a row cut to a
table's schema (restrict, naming what it drops in DroppedTags), and the rows of events."""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from typing import Any

from schemas.bigquery import (
    DICOM_STREAM,
    DROPPED_TAGS,
    DROPPED_TAGS_FIELD,
    EVENT_FIELDS,
    RECORD,
    field_type,
    merge,
)


@dataclass(frozen=True)
class Flat:
    row: dict[str, Any]
    schema: list[dict]


def _covered(f: dict, target: dict) -> bool:
    """Whether every nested field of the row's RECORD field ``f`` is in the schema's ``target``."""
    have_by_name = {t["name"].lower(): t for t in target.get("fields", [])}
    for sub in f.get("fields", []):
        t = have_by_name.get(sub["name"].lower())
        if t is None or (field_type(sub) == RECORD and field_type(t) == RECORD and not _covered(sub, t)):
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
        if field_type(f) == RECORD and field_type(target) == RECORD and not _covered(f, target):
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
            and field_type(sub) == RECORD
            and field_type(t) == RECORD
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
            if (
                v is not None
                and field_type(sub) == RECORD
                and field_type(t) == RECORD
                and not _covered(sub, t)
            ):
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
            and field_type(f) == RECORD
            and field_type(target) == RECORD
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


def with_event(
    flat: Flat,
    event: str,
    when: datetime.datetime,
    storage_class: str | None = None,
    size: int | None = None,
) -> Flat:
    """A row stamped with its event: Type CREATE or DELETE, LastUpdated (UTC), and what the store
    knows of the instance (StorageClass, BlobStorageSize)."""
    row = dict(flat.row, Type=event, LastUpdated=when)
    if storage_class is not None:
        row["StorageClass"] = storage_class
    if size is not None:
        row["BlobStorageSize"] = size
    return Flat(row=row, schema=merge(EVENT_FIELDS, flat.schema))


def delete_row(study: str, series: str, sop: str, when: datetime.datetime) -> Flat:
    """The row a deletion writes: the instance's UIDs, Type DELETE and when."""
    uid_field = {"type": "STRING", "mode": "NULLABLE"}
    row = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": sop}
    schema = [{"name": name, **uid_field} for name in row]
    return with_event(Flat(row=row, schema=schema), "DELETE", when)
