"""One DICOM data set as one row of the metadata table (CONTRACT.md, "Metadata table").

``flatten(ds)`` returns the row and the schema of exactly its columns. The rules, with the decisions
the contract leaves open marked *decision*:

Columns
  Every attribute is a column named by its keyword: the file meta group (``ds.file_meta``) first,
  then the data set, each by tag; retired attributes included, group lengths (gggg,0000) left out
  silently everywhere. *decision*: the top-level data set ends where ``stop_before_pixels`` stops
  reading, before (7FE0,0008) Float Pixel Data, (7FE0,0009) and (7FE0,0010) Pixel Data: those and
  any later attributes are left out silently, so a data set from WADO-RS metadata (Pixel Data as
  bulk data) gives the row its file gives.

Types and modes
  The column's type comes from the *dictionary* VR of the keyword, so a keyword always has one
  type whatever VR a file gives it; the value is converted from the element's own VR, and a value
  the column cannot hold is dropped as ``invalid_value``. Dictionary VRs with alternatives take the
  first non-binary one (``US or SS`` -> INTEGER; ``US or OW`` is an INTEGER column that an OW
  element never reaches, being excluded). AE AS CS LO LT SH ST UC UI UR UT DS IS -> STRING (DS and
  IS as written, e.g. "0.50"), DA -> DATE, TM -> TIME, DT -> TIMESTAMP, FL FD -> FLOAT, AT SL SS UL
  US SV UV -> INTEGER (AT as the tag's 32-bit value), PN -> RECORD {Alphabetic, Ideographic,
  Phonetic} of RECORD {FamilyName, GivenName, MiddleName, NamePrefix, NameSuffix} (all fields
  always in the schema), SQ -> REPEATED RECORD of the union of its items' columns. Mode REPEATED
  where the dictionary VM is not "1", else NULLABLE.

Values
  Strings lose their padding: leading and trailing spaces (and NULs) for AE AS CS DA DS DT IS LO SH
  TM UI UR, trailing ones for LT ST UT UC PN. An attribute present with no value is a column whose
  value is None. *decision*: several values in a NULLABLE STRING column (a VM violation) are kept
  joined by "\\", as DICOM wrote them; several values in another NULLABLE column are
  ``invalid_value``. In a REPEATED column an empty value in the middle stays as "" (STRING) or {}
  (PN), and is skipped in other types (BigQuery arrays hold no NULL). PN components past the
  fifth stay in NameSuffix, groups past the third in Phonetic (split at most 4 and 2 times).
  DA: YYYYMMDD (and ACR-NEMA YYYY.MM.DD). TM: HH, HHMM, HHMMSS, HHMMSS.F{1,6} (colons of
  ACR-NEMA's HH:MM:SS ignored); a leap second (60) is ``invalid_value`` since TIME cannot hold it.
  DT: YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX], completed to the earliest instant, offset applied,
  as UTC; *decision*: without an offset the value is taken as UTC (Timezone Offset From UTC is not
  consulted). Integers must fit their VR's range (and INT64); an IS string in an INTEGER column,
  or a DS in a FLOAT one, is parsed.

Private and unknown attributes
  Odd groups go to ``OtherElements`` {Tag "Tag_GGGGEEEE", Data REPEATED STRING}, at the top level
  and in each item; a private SQ becomes a column ``Tag_GGGGEEEE``. *decision*: a public tag not in
  pydicom's dictionary (no keyword) is treated the same way, as a private one. Data holds each
  value as a string: text as decoded, numbers in Python's repr, AT as 8 hex digits, PN as written.

Repeating groups
  Tags of the group-repeating dictionary entries (curves 50xx, overlays 60xx, and 7Fxx) become one
  column per keyword, REPEATED RECORD {Id STRING (the group, 4 upper-case hex digits), Value}.
  *decision*: the retired element-repeating entries (002031xx, 002804x0, 1000xxx0, 1010xxxx) are
  plain keyword columns; a second attribute with the same keyword in one data set (or a data set
  element repeating one of the file meta group) is ``invalid_value``, the first kept.

DroppedTags
  REPEATED RECORD {TagName, Reason}, top level only, each (TagName, Reason) once. TagName is the
  keyword (Tag_GGGGEEEE without one); *decision*: inside sequences, the path of column names from
  the top, dot-separated and without item indexes, e.g.
  ``ReferencedImageSequence.ReferencedSOPInstanceUID``. Reasons: ``excluded_vr`` (OB OD OF OL OV
  OW UN and any VR in ``exclude_vrs``, by the element's own VR), ``too_large`` (a value of more than
  1,000,000 bytes as encoded in the file; for a data set from JSON, its UTF-8 length),
  ``invalid_value`` (see above; also any value pydicom cannot decode), ``too_deep`` (*decision*: a
  sequence nested in 13 others; BigQuery nests RECORDs 15 levels at most, and a sequence at level
  13 still has room for a PN's two), and ``column_limit`` (added by schemas.bigquery.restrict).
  *decision*: a sequence with no items, or whose items hold nothing, has no column (a RECORD needs
  fields); it is not listed either, having no value to lose.

Speed: the per-tag decisions (keyword, dictionary VR and VM -> field) are cached; elements read from
a file are decoded here straight from their raw bytes for the common VRs (pydicom's own conversion,
with its validation, is the fallback: SQ, ambiguous or implicit private VRs, ISO 2022 escapes).
"""

from __future__ import annotations

import datetime
import struct
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.charset import convert_encodings
from pydicom.datadict import DicomDictionary, RepeatersDictionary, get_entry
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from schemas.bigquery import (
    DROPPED_TAGS,
    DROPPED_TAGS_FIELD,
    NULLABLE,
    RECORD,
    REPEATED,
    field,
    merge,
)
from schemas.rows import Flat

MAX_VALUE_BYTES = 1_000_000
MAX_SEQUENCE_DEPTH = 13  # sequences nested in at most 12 others: RECORD levels 1..13, PN 14..15
EXCLUDED_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})

EXCLUDED_VR, TOO_LARGE, INVALID_VALUE, TOO_DEEP = "excluded_vr", "too_large", "invalid_value", "too_deep"

OTHER_ELEMENTS = "OtherElements"
OTHER_ELEMENTS_FIELD = field(
    OTHER_ELEMENTS, RECORD, REPEATED, [field("Tag", "STRING"), field("Data", "STRING", REPEATED)]
)
PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
PN_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
_PN_FIELDS = [field(g, RECORD, NULLABLE, [field(c, "STRING") for c in PN_COMPONENTS]) for g in PN_GROUPS]

# Column types by VR; "PN" and "SQ" are RECORDs built apart.
STRING_VRS = frozenset({"AE", "AS", "CS", "LO", "LT", "SH", "ST", "UC", "UI", "UR", "UT", "DS", "IS"})
_TYPE_BY_VR = {vr: "STRING" for vr in STRING_VRS} | {
    "DA": "DATE",
    "TM": "TIME",
    "DT": "TIMESTAMP",
    "FL": "FLOAT",
    "FD": "FLOAT",
    **{vr: "INTEGER" for vr in ("AT", "SL", "SS", "UL", "US", "SV", "UV")},
    "PN": "PN",
    "SQ": "SQ",
}

# Raw decoding: which VRs are split on "\\", and how their values are stripped.
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})  # default repertoire
_CHARSET_VRS = frozenset({"SH", "LO", "UC", "ST", "LT", "UT", "PN"})  # Specific Character Set applies
_SINGLE_VALUED = frozenset({"LT", "ST", "UT", "UR"})  # never split on "\\"
_RSTRIP_ONLY = frozenset({"LT", "ST", "UT", "UC", "PN"})  # leading spaces are significant
_BINARY = {
    "US": ("H", 2),
    "SS": ("h", 2),
    "UL": ("L", 4),
    "SL": ("l", 4),
    "FL": ("f", 4),
    "FD": ("d", 8),
    "SV": ("q", 8),
    "UV": ("Q", 8),
    "AT": ("H", 4),
}
_INT64 = (-(2**63), 2**63 - 1)
_INT_RANGE = {
    "US": (0, 0xFFFF),
    "SS": (-0x8000, 0x7FFF),
    "UL": (0, 0xFFFFFFFF),
    "SL": (-(2**31), 2**31 - 1),
    "AT": (0, 0xFFFFFFFF),
    "UV": (0, 2**63 - 1),  # UV above INT64 cannot be held
}
_PAD = " \x00"
_DEFAULT_ENCODINGS = ("iso8859",)

# kinds of tags
_PUBLIC, _GROUP_REPEATER, _OTHER = 0, 1, 2


@dataclass(frozen=True, slots=True)
class _Tag:
    """The cached decisions for one tag."""

    kind: int
    name: str  # column name: keyword, or Tag_GGGGEEEE
    col_vr: str  # the VR the column's type comes from ("" for private/unknown)
    col_type: str  # STRING ... or PN / SQ / "" (binary-only dictionary VR)
    repeated: bool
    implicit_vr: str | None  # the VR of an implicit-VR element when unambiguous, else None
    field: dict | None  # the column's field (the Value field for a repeating group); None for SQ
    group_id: str  # repeating groups: the group in hex


_TAGS: dict[int, _Tag] = {}
_ENCODINGS: dict[tuple[str, ...], tuple[str, ...]] = {}
_RG_FIELDS: dict[int, dict] = {}  # repeating-group columns by tag & 0xFF00FFFF


def _tag_info(tag: int) -> _Tag:
    info = _TAGS.get(tag)
    if info is None:
        if len(_TAGS) > 200_000:  # private tags are unbounded in principle
            _TAGS.clear()
        info = _TAGS[tag] = _make_tag(tag)
    return info


def _column_field(name: str, col_type: str, repeated: bool) -> dict | None:
    mode = REPEATED if repeated else NULLABLE
    if col_type == "PN":
        return field(name, RECORD, mode, _PN_FIELDS)
    if col_type in ("SQ", ""):
        return None
    return field(name, col_type, mode)


def _make_tag(tag: int) -> _Tag:
    group = tag >> 16
    other_name = f"Tag_{tag:08X}"
    if group & 1:
        implicit = "LO" if 0x0010 <= (tag & 0xFFFF) <= 0x00FF else None  # private creators
        return _Tag(_OTHER, other_name, "", "STRING", True, implicit, None, "")
    try:
        dict_vr, vm, _, _, keyword = get_entry(tag)
    except KeyError:
        return _Tag(_OTHER, other_name, "", "STRING", True, None, None, "")
    if not keyword:
        return _Tag(_OTHER, other_name, "", "STRING", True, None, None, "")
    candidates = dict_vr.split(" or ")
    col_vr = next((vr for vr in candidates if vr in _TYPE_BY_VR), candidates[0])
    col_type = _TYPE_BY_VR.get(col_vr, "")
    repeated = vm != "1"
    implicit = dict_vr if len(candidates) == 1 and dict_vr in _TYPE_BY_VR or dict_vr in EXCLUDED_VRS else None
    if tag not in DicomDictionary and _is_group_repeater(tag):
        value_field = _column_field("Value", col_type, repeated)
        return _Tag(
            _GROUP_REPEATER, keyword, col_vr, col_type, repeated, implicit, value_field, f"{group:04X}"
        )
    return _Tag(
        _PUBLIC, keyword, col_vr, col_type, repeated, implicit, _column_field(keyword, col_type, repeated), ""
    )


def _is_group_repeater(tag: int) -> bool:
    """Whether the tag's dictionary entry is a repeating group (50xx, 60xx, 7Fxx): its mask varies
    the group, not the element."""
    group = f"{tag >> 16:04X}"
    for mask in RepeatersDictionary:
        if mask[2:4] == "xx" and mask[:2] == group[:2] and mask[4:] == f"{tag & 0xFFFF:04X}":
            return True
    return False


def _rg_field(info: _Tag, value_field: dict) -> dict:
    return field(info.name, RECORD, REPEATED, [field("Id", "STRING"), value_field])


# --- values ----------------------------------------------------------------------------------


class _Invalid(Exception):
    pass


def _digits(s: str) -> bool:
    return s.isascii() and s.isdigit()


def parse_date(s: str) -> datetime.date:
    """DA: YYYYMMDD, or ACR-NEMA's YYYY.MM.DD."""
    if len(s) == 10 and s[4] == "." and s[7] == ".":
        s = s[:4] + s[5:7] + s[8:]
    if len(s) != 8 or not _digits(s):
        raise _Invalid(s)
    return datetime.date(int(s[:4]), int(s[4:6]), int(s[6:]))


def _fraction(frac: str) -> int:
    if not frac:
        return 0
    if len(frac) > 6 or not _digits(frac):
        raise _Invalid(frac)
    return int(frac.ljust(6, "0"))


def parse_time(s: str) -> datetime.time:
    """TM: HH[MM[SS[.F{1,6}]]], ACR-NEMA's colons ignored."""
    if ":" in s:
        s = s.replace(":", "")
    main, dot, frac = s.partition(".")
    if len(main) not in (2, 4, 6) or not _digits(main) or (dot and len(main) != 6):
        raise _Invalid(s)
    return datetime.time(
        int(main[:2]), int(main[2:4] or 0), int(main[4:6] or 0), _fraction(frac) if dot else 0
    )


def parse_datetime(s: str) -> datetime.datetime:
    """DT: YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX] -> an aware datetime in UTC, partial values
    completed to the earliest instant, no offset meaning UTC."""
    tz = datetime.UTC
    if len(s) > 5 and s[-5] in "+-":
        offset = s[-5:]
        s = s[:-5]
        if not _digits(offset[1:]):
            raise _Invalid(offset)
        hours, minutes = int(offset[1:3]), int(offset[3:])
        if hours > 23 or minutes > 59:
            raise _Invalid(offset)
        delta = datetime.timedelta(hours=hours, minutes=minutes)
        tz = datetime.timezone(-delta if offset[0] == "-" else delta)
    main, dot, frac = s.partition(".")
    if len(main) not in (4, 6, 8, 10, 12, 14) or not _digits(main) or (dot and len(main) != 14):
        raise _Invalid(s)
    value = datetime.datetime(
        int(main[:4]),
        int(main[4:6] or 1),
        int(main[6:8] or 1),
        int(main[8:10] or 0),
        int(main[10:12] or 0),
        int(main[12:14] or 0),
        _fraction(frac) if dot else 0,
        tzinfo=tz,
    )
    return value.astimezone(datetime.UTC) if tz is not datetime.UTC else value


def _pn_record(value: Any) -> dict:
    """PN groups (a PersonName, its components, or the "A^B=C^D" string) as a RECORD."""
    if isinstance(value, PersonName):
        groups = value.components
    elif isinstance(value, str):
        groups = value.split("=", 2)
    else:
        groups = value
    record = {}
    for name, group in zip(PN_GROUPS, groups, strict=False):
        if not group:
            continue
        components = {}
        for cname, part in zip(PN_COMPONENTS, group.split("^", 4), strict=False):
            part = part.strip(_PAD)
            if part:
                components[cname] = part
        if components:
            record[name] = components
    return record


def _to_string(value: Any, vr: str) -> str:
    if isinstance(value, str):
        return value
    if vr == "AT":
        return f"{value:08X}"
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, tuple | list):  # PN groups
        return "=".join(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _to_int(value: Any, vr: str) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise _Invalid(value)
        value = int(value)
    elif isinstance(value, str):
        value = int(value, 16) if vr == "AT" else int(value)  # IS as written, e.g. " +12"
    elif not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(value)
    low, high = _INT_RANGE.get(vr, _INT64)
    if not low <= value <= high:
        raise _Invalid(value)
    return int(value)


def _to_float(value: Any, vr: str) -> float:
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        return float(value)
    raise _Invalid(value)


def _parser(parse: Any) -> Any:
    def convert(value: Any, vr: str) -> Any:
        if not isinstance(value, str):
            raise _Invalid(value)
        return parse(value)

    return convert


def _to_pn(value: Any, vr: str) -> dict:
    if isinstance(value, int | float):
        raise _Invalid(value)
    return _pn_record(value)


_CONVERT = {
    "STRING": _to_string,
    "INTEGER": _to_int,
    "FLOAT": _to_float,
    "DATE": _parser(parse_date),
    "TIME": _parser(parse_time),
    "TIMESTAMP": _parser(parse_datetime),
    "PN": _to_pn,
}


def _column_value(values: list, vr: str, col_type: str, repeated: bool) -> Any:
    """The values of one element, in its own VR ``vr``, as the column's value; raises _Invalid
    (or ValueError and the like) when the column cannot hold them. ``values`` is not empty."""
    convert = _CONVERT[col_type]
    if repeated:
        out = []
        for v in values:
            if v != "":
                out.append(convert(v, vr))
            elif col_type == "STRING":  # an empty value keeps its place where the type allows
                out.append("")
            elif col_type == "PN":
                out.append({})
        if col_type == "PN" and not any(out):
            return None  # only empty names, e.g. "^^^^"
        return out
    if len(values) == 1:
        value = convert(values[0], vr)
        return None if col_type == "PN" and not value else value
    if col_type == "STRING":
        return "\\".join(_to_string(v, vr) for v in values)
    raise _Invalid(values)


# --- reading elements ------------------------------------------------------------------------

_FALLBACK = object()  # sentinel: let pydicom convert the element


def _raw_values(raw: RawDataElement, vr: str, encodings: tuple[str, ...]) -> Any:
    """Values of a raw element decoded from its bytes: a list (None if empty), _FALLBACK when
    pydicom must convert it; raises _Invalid for a binary value of the wrong length."""
    data = raw.value
    if not data:
        return None
    if vr in _ASCII_VRS or vr in _CHARSET_VRS:
        if vr in _ASCII_VRS:
            text = data.decode("latin-1")
        else:
            if len(encodings) > 1 and b"\x1b" in data:
                return _FALLBACK  # ISO 2022 code extensions: pydicom decodes each part
            try:
                text = data.decode(encodings[0])
            except UnicodeError:
                text = data.decode(encodings[0], errors="replace")
            except LookupError:
                return _FALLBACK
        parts = [text] if vr in _SINGLE_VALUED or "\\" not in text else text.split("\\")
        strip = str.rstrip if vr in _RSTRIP_ONLY else str.strip
        parts = [strip(p, _PAD) for p in parts]
        if vr == "PN":
            return [p.split("=", 2) if p else "" for p in parts] if any(parts) else None
        return parts if any(parts) else None
    fmt = _BINARY.get(vr)
    if fmt is None:
        return _FALLBACK
    code, size = fmt
    count, rest = divmod(len(data), size)
    if rest:
        raise _Invalid(f"{len(data)} bytes for {vr}")
    if vr == "AT":
        numbers = struct.unpack(f"{'<' if raw.is_little_endian else '>'}{2 * count}H", data)
        return [(numbers[i] << 16) | numbers[i + 1] for i in range(0, 2 * count, 2)]
    return list(struct.unpack(f"{'<' if raw.is_little_endian else '>'}{count}{code}", data))


def _element_values(elem: DataElement) -> list | None:
    """Values of a converted element as a list of str / int / float / PersonName (None if empty)."""
    value = elem.value
    if value is None or value == "" or value == b"":
        return None
    vr = elem.VR
    values = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
    if vr in STRING_VRS or vr in ("DA", "TM", "DT"):
        strip = str.rstrip if vr in _RSTRIP_ONLY else str.strip
        out = [strip(v if isinstance(v, str) else ("" if v is None else str(v)), _PAD) for v in values]
        if vr in _SINGLE_VALUED and len(out) > 1:
            out = ["\\".join(out)]
        return out if any(out) else None
    if vr == "PN":
        out = [v if v is not None and str(v).rstrip(_PAD) else "" for v in values]
        return out if any(out) else None
    return [v for v in values if v is not None] or None


def _value_size(elem: DataElement, values: list) -> int:
    """An estimate of a converted value's encoded size in bytes (exact for single-byte text)."""
    size = 0
    for v in values:
        if isinstance(v, str):
            size += len(v) + 1
        elif isinstance(v, PersonName):
            size += len(str(v)) + 1
        elif isinstance(v, bytes):
            size += len(v)
        else:
            size += 8
    if size > MAX_VALUE_BYTES // 4 and any(isinstance(v, str | PersonName) for v in values):
        size = sum(len(str(v).encode("utf-8", "replace")) + 1 for v in values) - 1
    return size


class _Context:
    __slots__ = ("excluded", "drops")

    def __init__(self, excluded: frozenset[str]) -> None:
        self.excluded = excluded
        self.drops: dict[tuple[str, str], None] = {}

    def drop(self, name: str, reason: str) -> None:
        self.drops[(name, reason)] = None


def _encodings(ds: pydicom.Dataset, parent: tuple[str, ...]) -> tuple[str, ...]:
    """The Python encodings of a data set's Specific Character Set, else its parent's."""
    elem = ds._dict.get(0x00080005)
    if elem is None:
        return parent
    if isinstance(elem, RawDataElement):
        terms = tuple(t.strip(_PAD) for t in (elem.value or b"").decode("latin-1").split("\\"))
    else:
        value = elem.value
        if not value:
            terms = ()
        else:
            terms = tuple(
                str(t).strip(_PAD) for t in (value if isinstance(value, list | MultiValue) else [value])
            )
    cached = _ENCODINGS.get(terms)
    if cached is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                cached = tuple(convert_encodings(list(terms) or [""])) or _DEFAULT_ENCODINGS
            except Exception:
                cached = _DEFAULT_ENCODINGS
        _ENCODINGS[terms] = cached
    return cached


def _convert_with_pydicom(ds: pydicom.Dataset, tag: int) -> DataElement:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds[tag]


def _flatten_into(
    ds: pydicom.Dataset,
    row: dict[str, Any],
    fields: dict[str, dict],
    others: list[dict],
    prefix: str,
    depth: int,
    encodings: tuple[str, ...],
    ctx: _Context,
    top: bool = False,
) -> None:
    """Add the columns of data set ``ds`` (a sequence item ``depth`` sequences deep, whose columns
    are named ``prefix + name`` in DroppedTags) to ``row`` and ``fields``; private and unknown
    attributes to ``others``."""
    excluded = ctx.excluded
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
        if top and tag >= 0x7FE00008:
            break  # Pixel Data, and what follows it: not metadata (stop_before_pixels stops here)
        info = _TAGS.get(tag) or _tag_info(tag)
        vr = None
        values: Any = _FALLBACK
        try:
            if type(elem) is RawDataElement:
                vr = elem.VR or info.implicit_vr
                if elem.value is None and elem.length:  # left unread by the header reader: too large
                    ctx.drop(prefix + info.name, EXCLUDED_VR if vr in excluded else TOO_LARGE)
                    continue
                if vr is not None and vr != "UN":  # pydicom replaces a UN it knows better
                    if vr in excluded:
                        ctx.drop(prefix + info.name, EXCLUDED_VR)
                        continue
                    if vr in _ASCII_VRS or vr in _CHARSET_VRS or vr in _BINARY:
                        length = len(elem.value) if elem.value else 0
                        if length > MAX_VALUE_BYTES:
                            ctx.drop(prefix + info.name, TOO_LARGE)
                            continue
                        values = _raw_values(elem, vr, encodings)
                if values is _FALLBACK:
                    elem = _convert_with_pydicom(ds, tag)
            if values is _FALLBACK:
                vr = elem.VR
                if " or " in vr:  # left ambiguous by pydicom
                    vr = "OW" if isinstance(elem.value, bytes) else vr.split(" or ")[0]
                if vr in excluded:
                    ctx.drop(prefix + info.name, EXCLUDED_VR)
                    continue
                if vr == "SQ":
                    _sequence(ds, elem, info, row, fields, others, prefix, depth, encodings, ctx)
                    continue
                if vr not in _TYPE_BY_VR:
                    raise _Invalid(vr)
                values = _element_values(elem)
                if values is not None and _value_size(elem, values) > MAX_VALUE_BYTES:
                    ctx.drop(prefix + info.name, TOO_LARGE)
                    continue
            kind = info.kind
            if kind == _OTHER:
                data = [] if values is None else [_to_string(v, vr) for v in values]
                others.append({"Tag": info.name, "Data": data})
                continue
            col_type = info.col_type
            if col_type in ("SQ", ""):
                raise _Invalid(vr)  # e.g. an LO where the dictionary has a sequence
            value = None if values is None else _column_value(values, vr, col_type, info.repeated)
        except Exception:  # odd data: _Invalid, pydicom's conversion errors, ValueError, ...
            ctx.drop(prefix + info.name, INVALID_VALUE)
            continue
        name = info.name
        if kind == _GROUP_REPEATER:
            entries = row.get(name)
            if entries is None:
                entries = row[name] = []
                fields[name] = _RG_FIELDS.get(tag & 0xFF00FFFF) or _RG_FIELDS.setdefault(
                    tag & 0xFF00FFFF, _rg_field(info, info.field)
                )
            entries.append({"Id": info.group_id, "Value": value})
        elif name in row:
            ctx.drop(prefix + name, INVALID_VALUE)
        else:
            row[name] = value
            fields[name] = info.field


def _sequence(
    ds: pydicom.Dataset,
    elem: DataElement,
    info: _Tag,
    row: dict[str, Any],
    fields: dict[str, dict],
    others: list[dict],
    prefix: str,
    depth: int,
    encodings: tuple[str, ...],
    ctx: _Context,
) -> None:
    name = info.name
    path = prefix + name
    if info.kind != _OTHER and info.col_type != "SQ":
        ctx.drop(path, INVALID_VALUE)
        return
    if depth >= MAX_SEQUENCE_DEPTH - (info.kind == _GROUP_REPEATER):
        ctx.drop(path, TOO_DEEP)
        return
    rows, item_fields = _items(
        elem.value or [], f"{path}.", depth + 1 + (info.kind == _GROUP_REPEATER), encodings, ctx
    )
    if not item_fields:
        return  # no items, or nothing in them: no RECORD to make
    if info.kind == _GROUP_REPEATER:
        value_field = field("Value", RECORD, REPEATED, item_fields)
        entries = row.get(name)
        if entries is None:
            row[name] = [{"Id": info.group_id, "Value": rows}]
            fields[name] = _rg_field(info, value_field)
        else:
            entries.append({"Id": info.group_id, "Value": rows})
            fields[name] = merge([fields[name]], [_rg_field(info, value_field)])[0]
        return
    if name in row:
        ctx.drop(path, INVALID_VALUE)
        return
    row[name] = rows
    fields[name] = field(name, RECORD, REPEATED, item_fields)


def _items(
    items: Any, prefix: str, depth: int, encodings: tuple[str, ...], ctx: _Context
) -> tuple[list[dict], list[dict]]:
    """The rows of a sequence's items and the union of their fields."""
    rows = []
    union: dict[str, dict] = {}
    for item in items:
        item_row: dict[str, Any] = {}
        item_fields: dict[str, dict] = {}
        others: list[dict] = []
        _flatten_into(item, item_row, item_fields, others, prefix, depth, _encodings(item, encodings), ctx)
        if others:
            item_row[OTHER_ELEMENTS] = others
            item_fields[OTHER_ELEMENTS] = OTHER_ELEMENTS_FIELD
        rows.append(item_row)
        for name, f in item_fields.items():
            known = union.get(name)
            if known is None:
                union[name] = f
            elif known is not f and f["type"] == RECORD:
                union[name] = merge([known], [f])[0]
    return rows, list(union.values())


def flatten(ds: pydicom.Dataset, exclude_vrs: Collection[str] = ()) -> Flat:
    """A data set (read with stop_before_pixels, file meta in ds.file_meta if any) as one row.
    Never raises on odd data: what cannot be held is dropped with a reason."""
    excluded = EXCLUDED_VRS | frozenset(vr.upper() for vr in exclude_vrs) if exclude_vrs else EXCLUDED_VRS
    ctx = _Context(excluded)
    row: dict[str, Any] = {}
    fields: dict[str, dict] = {}
    others: list[dict] = []
    meta = getattr(ds, "file_meta", None)
    if meta:
        _flatten_into(meta, row, fields, others, "", 0, _DEFAULT_ENCODINGS, ctx)
    _flatten_into(ds, row, fields, others, "", 0, _encodings(ds, _DEFAULT_ENCODINGS), ctx, top=True)
    if others:
        row[OTHER_ELEMENTS] = others
        fields[OTHER_ELEMENTS] = OTHER_ELEMENTS_FIELD
    if ctx.drops:
        row[DROPPED_TAGS] = [{"TagName": name, "Reason": reason} for name, reason in ctx.drops]
        fields[DROPPED_TAGS] = DROPPED_TAGS_FIELD
    return Flat(row, list(fields.values()))
