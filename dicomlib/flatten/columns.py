"""Columns: which column each tag becomes (name, type, mode), decided once per tag and cached."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import DicomDictionary, RepeatersDictionary, dictionary_VR, get_entry, tag_for_keyword
from pydicom.valuerep import BYTES_VR

from schemas.bigquery import EVENT_COLUMNS, NULLABLE, RECORD, REPEATED, field

EXCLUDED_VRS = frozenset(map(str, BYTES_VR))  # OB OD OF OL OV OW UN: binary, never in a row
OTHER_ELEMENTS = "OtherElements"
OTHER_ELEMENTS_FIELD = field(
    OTHER_ELEMENTS, RECORD, REPEATED, [field("Tag", "STRING"), field("Data", "STRING", REPEATED)]
)
PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
PN_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
_PN_FIELDS = [field(g, RECORD, NULLABLE, [field(c, "STRING") for c in PN_COMPONENTS]) for g in PN_GROUPS]
# Column types by VR; "PN" and "SQ" are RECORDs built apart.
STRING_VRS = frozenset({"AE", "AS", "CS", "LO", "LT", "SH", "ST", "UC", "UI", "UR", "UT", "DS", "IS"})
TYPE_BY_VR = {vr: "STRING" for vr in STRING_VRS} | {
    "DA": "DATE",
    "TM": "TIME",
    "DT": "TIMESTAMP",
    "FL": "FLOAT",
    "FD": "FLOAT",
    **{vr: "INTEGER" for vr in ("AT", "SL", "SS", "UL", "US", "SV", "UV")},
    "PN": "PN",
    "SQ": "SQ",
}
# kinds of tags
PUBLIC, GROUP_REPEATER, OTHER = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Tag:
    """The cached decisions for one tag."""

    kind: int
    name: str  # column name: keyword, or Tag_GGGGEEEE
    col_vr: str  # the VR the column's type comes from ("" for private/unknown)
    col_type: str  # STRING ... or PN / SQ / "" (binary-only dictionary VR)
    repeated: bool
    implicit_vr: str | None  # the VR of an implicit-VR element when unambiguous, else None
    field: Any  # the column's field dict (the Value field for a repeating group); None for SQ
    group_id: str  # repeating groups: the group in hex


TAGS: dict[int, Tag] = {}
RG_FIELDS: dict[int, dict] = {}  # repeating-group columns by tag & 0xFF00FFFF


def tag_info(tag: int) -> Tag:
    """The cached decisions for `tag`, made on first sight."""
    info = TAGS.get(tag)
    if info is None:
        if len(TAGS) > 200_000:  # private tags are unbounded in principle
            TAGS.clear()
        info = TAGS[tag] = _make_tag(tag)
    return info


def _column_field(name: str, col_type: str, repeated: bool) -> dict | None:
    mode = REPEATED if repeated else NULLABLE
    if col_type == "PN":
        return field(name, RECORD, mode, _PN_FIELDS)
    if col_type in ("SQ", ""):
        return None
    return field(name, col_type, mode)


def _make_tag(tag: int) -> Tag:
    group = tag >> 16
    other_name = f"Tag_{tag:08X}"
    if group & 1:
        implicit = "LO" if 0x0010 <= (tag & 0xFFFF) <= 0x00FF else None  # private creators
        return Tag(OTHER, other_name, "", "STRING", True, implicit, None, "")
    try:
        dict_vr, vm, _, _, keyword = get_entry(tag)
    except KeyError:
        return Tag(OTHER, other_name, "", "STRING", True, None, None, "")
    if not keyword:
        return Tag(OTHER, other_name, "", "STRING", True, None, None, "")
    candidates = dict_vr.split(" or ")
    col_vr = next((vr for vr in candidates if vr in TYPE_BY_VR), candidates[0])
    col_type = TYPE_BY_VR.get(col_vr, "")
    repeated = vm != "1"
    implicit = dict_vr if len(candidates) == 1 and dict_vr in TYPE_BY_VR or dict_vr in EXCLUDED_VRS else None
    if tag not in DicomDictionary and _is_group_repeater(tag):
        value_field = _column_field("Value", col_type, repeated)
        return Tag(GROUP_REPEATER, keyword, col_vr, col_type, repeated, implicit, value_field, f"{group:04X}")
    return Tag(
        PUBLIC, keyword, col_vr, col_type, repeated, implicit, _column_field(keyword, col_type, repeated), ""
    )


def _is_group_repeater(tag: int) -> bool:
    """Whether the tag's dictionary entry is a repeating group (50xx, 60xx, 7Fxx): its mask varies
    the group, not the element."""
    group = f"{tag >> 16:04X}"
    for mask in RepeatersDictionary:
        if mask[2:4] == "xx" and mask[:2] == group[:2] and mask[4:] == f"{tag & 0xFFFF:04X}":
            return True
    return False


def repeating_group_field(tag: int | None, info: Tag, value_field: dict) -> dict:
    """The column of a repeating group: REPEATED RECORD {Id, Value}; cached by `tag` (one column
    for every group of the entry) unless None (a sequence's, whose Value depends on its items)."""
    key = None if tag is None else tag & 0xFF00FFFF
    cached = RG_FIELDS.get(key) if key is not None else None
    if cached is None:
        cached = field(info.name, RECORD, REPEATED, [field("Id", "STRING"), value_field])
        if key is not None:
            RG_FIELDS[key] = cached
    return cached


_REPEATER_TAGS = {entry[4]: int(mask.replace("x", "0"), 16) for mask, entry in RepeatersDictionary.items()}


def in_tag_order(fields: list[dict]) -> list[dict]:
    """Columns (the top level's, or a sequence's items') in the order the flattener gives one
    instance's row: the event columns first, as EVENT_COLUMNS has them, then by tag, OtherElements last;
    each sequence's fields likewise. A run merges its rows' columns in the order its workers met
    them, which varies with how the run is split (worker processes, Dataflow): in this order the
    table's schema, and which columns --max_columns keeps, do not."""
    ordered = []
    for f in sorted(fields, key=_column_key):
        if f.get("fields") and _is_sequence(f["name"]):
            f = {**f, "fields": in_tag_order(f["fields"])}
        ordered.append(f)
    return ordered


def _tag_of(name: str) -> int | None:
    if re.fullmatch(r"Tag_[0-9A-F]{8}", name):
        return int(name[4:], 16)
    tag = tag_for_keyword(name)
    return _REPEATER_TAGS.get(name) if tag is None else tag


def _column_key(f: dict) -> tuple[int, int, str]:
    name = f["name"]
    if name in EVENT_COLUMNS:
        return (0, EVENT_COLUMNS.index(name), "")
    if name == OTHER_ELEMENTS:
        return (2, 0, "")
    tag = _tag_of(name)
    return (1, -1 if tag is None else tag, name)


def _is_sequence(name: str) -> bool:
    """A column of sequence items: a private sequence (Tag_GGGGEEEE) or a public SQ attribute."""
    if name.startswith("Tag_"):
        return True
    tag = tag_for_keyword(name)
    return tag is not None and dictionary_VR(tag) == "SQ"
