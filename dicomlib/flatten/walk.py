"""The walk through a data set and its sequences, element by element, into one row and its fields."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import pydicom
from pydicom.dataelem import DataElement, RawDataElement

from dicomlib.flatten.columns import (
    EXCLUDED_VRS,
    GROUP_REPEATER,
    OTHER,
    OTHER_ELEMENTS,
    OTHER_ELEMENTS_FIELD,
    TAGS,
    TYPE_BY_VR,
    Tag,
    repeating_group_field,
    tag_info,
)
from dicomlib.flatten.elements import (
    DEFAULT_ENCODINGS,
    FALLBACK,
    MAX_VALUE_BYTES,
    RAW_DECODED_VRS,
    element_values,
    encodings_of,
    raw_values,
    value_size,
)
from dicomlib.flatten.values import Invalid, column_value, to_string
from schemas.bigquery import DROPPED_TAGS, DROPPED_TAGS_FIELD, RECORD, REPEATED, field, merge
from schemas.rows import Flat

MAX_SEQUENCE_DEPTH = 13  # sequences nested in at most 12 others: RECORD levels 1..13, PN 14..15
EXCLUDED_VR, TOO_LARGE, INVALID_VALUE, TOO_DEEP = "excluded_vr", "too_large", "invalid_value", "too_deep"


class _Dropped(Exception):
    """An element left out of the row, for `reason`."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass(slots=True)
class _Level:
    """One data set being flattened (the top level or a sequence item): where its columns go, the
    DroppedTags path of its columns, how deep it is nested and how its text is decoded."""

    prefix: str
    depth: int
    encodings: tuple[str, ...]
    row: dict[str, Any] = dataclass_field(default_factory=dict)
    fields: dict[str, dict] = dataclass_field(default_factory=dict)
    others: list[dict] = dataclass_field(default_factory=list)

    def finish(self) -> None:
        """Private and unknown attributes go into the level's OtherElements column."""
        if self.others:
            self.row[OTHER_ELEMENTS] = self.others
            self.fields[OTHER_ELEMENTS] = OTHER_ELEMENTS_FIELD


@dataclass(slots=True)
class _Walk:
    """What one flattening shares across levels: the excluded VRs and the drops, each listed once."""

    excluded: frozenset[str]
    drops: dict[tuple[str, str], None] = dataclass_field(default_factory=dict)

    def drop(self, name: str, reason: str) -> None:
        self.drops[(name, reason)] = None


def flatten(ds: pydicom.Dataset, exclude_vrs: Collection[str] = ()) -> Flat:
    """A data set (read with stop_before_pixels, file meta in ds.file_meta if any) as one row.
    Never raises on odd data: what cannot be held is dropped with a reason."""
    excluded = EXCLUDED_VRS | frozenset(vr.upper() for vr in exclude_vrs) if exclude_vrs else EXCLUDED_VRS
    walk = _Walk(excluded)
    top = _Level("", 0, encodings_of(ds, DEFAULT_ENCODINGS))
    meta = getattr(ds, "file_meta", None)
    if meta:
        _flatten_into(meta, _Level("", 0, DEFAULT_ENCODINGS, top.row, top.fields, top.others), walk)
    _flatten_into(ds, top, walk, top_level=True)
    top.finish()
    if walk.drops:
        top.row[DROPPED_TAGS] = [{"TagName": name, "Reason": reason} for name, reason in walk.drops]
        top.fields[DROPPED_TAGS] = DROPPED_TAGS_FIELD
    return Flat(top.row, list(top.fields.values()))


def _flatten_into(ds: pydicom.Dataset, level: _Level, walk: _Walk, top_level: bool = False) -> None:
    """Add the columns of data set `ds` to `level`, in tag order."""
    items = ds._dict
    tags = list(map(int, items))  # plain ints: BaseTag compares in Python, slowly
    elems = list(items.values())
    if tags != sorted(tags):
        order = sorted(range(len(tags)), key=tags.__getitem__)
        tags = [tags[i] for i in order]
        elems = [elems[i] for i in order]
    for tag, elem in zip(tags, elems, strict=True):
        if not tag & 0xFFFF:
            continue  # group length
        if top_level and tag >= 0x7FE00008:
            break  # Pixel Data, and what follows it: not metadata (stop_before_pixels stops here)
        info = TAGS.get(tag) or tag_info(tag)
        try:
            read = _read(ds, tag, elem, info, level, walk)
            if read is None:
                continue  # a sequence, added by _sequence
            vr, values = read
            if info.kind == OTHER:
                data = [] if values is None else [to_string(v, vr) for v in values]
                level.others.append({"Tag": info.name, "Data": data})
                continue
            if info.col_type in ("SQ", ""):
                raise Invalid(vr)  # e.g. an LO where the dictionary has a sequence
            value = None if values is None else column_value(values, vr, info.col_type, info.repeated)
        except _Dropped as dropped:
            walk.drop(level.prefix + info.name, dropped.reason)
            continue
        except Exception:  # odd data: Invalid, pydicom's conversion errors, ValueError, ...
            walk.drop(level.prefix + info.name, INVALID_VALUE)
            continue
        name = info.name
        if info.kind == GROUP_REPEATER:
            entries = level.row.get(name)
            if entries is None:
                entries = level.row[name] = []
                level.fields[name] = repeating_group_field(tag, info, info.field)
            entries.append({"Id": info.group_id, "Value": value})
        elif name in level.row:
            walk.drop(level.prefix + name, INVALID_VALUE)  # a second attribute with the same keyword
        else:
            level.row[name] = value
            level.fields[name] = info.field


def _read(
    ds: pydicom.Dataset, tag: int, elem: Any, info: Tag, level: _Level, walk: _Walk
) -> tuple[Any, Any] | None:
    """An element's VR and values (None if it has none): decoded from its raw bytes where this
    module can, else converted by pydicom. None for a sequence, which _sequence adds itself;
    _Dropped for an element the row leaves out."""
    if type(elem) is RawDataElement:
        vr = elem.VR or info.implicit_vr
        if elem.value is None and elem.length:  # left unread by the header reader: too large
            raise _Dropped(EXCLUDED_VR if vr in walk.excluded else TOO_LARGE)
        if vr is not None and vr != "UN":  # pydicom replaces a UN it knows better
            if vr in walk.excluded:
                raise _Dropped(EXCLUDED_VR)
            if vr in RAW_DECODED_VRS:
                if elem.value and len(elem.value) > MAX_VALUE_BYTES:
                    raise _Dropped(TOO_LARGE)
                values = raw_values(elem, vr, level.encodings)
                if values is not FALLBACK:
                    return vr, values
        elem = ds[tag]  # pydicom's conversion, with its validation
    vr = elem.VR
    if " or " in vr:  # left ambiguous by pydicom
        vr = "OW" if isinstance(elem.value, bytes) else vr.split(" or ")[0]
    if vr in walk.excluded:
        raise _Dropped(EXCLUDED_VR)
    if vr == "SQ":
        _sequence(elem, info, level, walk)
        return None
    if vr not in TYPE_BY_VR:
        raise Invalid(vr)
    values = element_values(elem)
    if values is not None and value_size(values) > MAX_VALUE_BYTES:
        raise _Dropped(TOO_LARGE)
    return vr, values


def _sequence(elem: DataElement, info: Tag, level: _Level, walk: _Walk) -> None:
    """A sequence as a REPEATED RECORD of its items' columns (for a repeating group, as the Value
    of its entry)."""
    name = info.name
    path = level.prefix + name
    repeating = info.kind == GROUP_REPEATER
    if info.kind != OTHER and info.col_type != "SQ":
        raise _Dropped(INVALID_VALUE)
    if level.depth >= MAX_SEQUENCE_DEPTH - repeating:
        raise _Dropped(TOO_DEEP)
    rows, item_fields = _items(elem.value or [], f"{path}.", level.depth + 1 + repeating, level, walk)
    if not item_fields:
        return  # no items, or nothing in them: no RECORD to make
    if repeating:
        value_field = field("Value", RECORD, REPEATED, item_fields)
        entries = level.row.get(name)
        if entries is None:
            level.row[name] = [{"Id": info.group_id, "Value": rows}]
            level.fields[name] = repeating_group_field(None, info, value_field)
        else:
            entries.append({"Id": info.group_id, "Value": rows})
            merged = merge([level.fields[name]], [repeating_group_field(None, info, value_field)])
            level.fields[name] = merged[0]
        return
    if name in level.row:
        raise _Dropped(INVALID_VALUE)
    level.row[name] = rows
    level.fields[name] = field(name, RECORD, REPEATED, item_fields)


def _items(items: Any, prefix: str, depth: int, parent: _Level, walk: _Walk) -> tuple[list[dict], list[dict]]:
    """The rows of a sequence's items and the union of their fields."""
    rows = []
    union: dict[str, dict] = {}
    for item in items:
        level = _Level(prefix, depth, encodings_of(item, parent.encodings))
        _flatten_into(item, level, walk)
        level.finish()
        rows.append(level.row)
        for name, f in level.fields.items():
            known = union.get(name)
            if known is None:
                union[name] = f
            elif known is not f and f["type"] == RECORD:
                union[name] = merge([known], [f])[0]
    return rows, list(union.values())
