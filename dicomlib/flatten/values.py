"""Values: an element's values converted to its column's type (STRING, INTEGER, FLOAT, DATE, TIME,
TIMESTAMP, PN record), or Invalid."""

from __future__ import annotations

import datetime
from typing import Any

from pydicom.valuerep import PersonName

from dicomlib.flatten.columns import PN_COMPONENTS, PN_GROUPS

_INT64 = (-(2**63), 2**63 - 1)
_INT_RANGE = {
    "US": (0, 0xFFFF),
    "SS": (-0x8000, 0x7FFF),
    "UL": (0, 0xFFFFFFFF),
    "SL": (-(2**31), 2**31 - 1),
    "AT": (0, 0xFFFFFFFF),
    "UV": (0, 2**63 - 1),  # UV above INT64 cannot be held
}
PAD = " \x00"


class Invalid(Exception):
    """A value the column cannot hold: dropped as invalid_value."""


def _digits(s: str) -> bool:
    return s.isascii() and s.isdigit()


def parse_date(s: str) -> datetime.date:
    """DA: YYYYMMDD, or ACR-NEMA's YYYY.MM.DD."""
    if len(s) == 10 and s[4] == "." and s[7] == ".":
        s = s[:4] + s[5:7] + s[8:]
    if len(s) != 8 or not _digits(s):
        raise Invalid(s)
    return datetime.date(int(s[:4]), int(s[4:6]), int(s[6:]))


def _fraction(frac: str) -> int:
    if not frac:
        return 0
    if len(frac) > 6 or not _digits(frac):
        raise Invalid(frac)
    return int(frac.ljust(6, "0"))


def parse_time(s: str) -> datetime.time:
    """TM: HH[MM[SS[.F{1,6}]]], ACR-NEMA's colons ignored."""
    if ":" in s:
        s = s.replace(":", "")
    main, dot, frac = s.partition(".")
    if len(main) not in (2, 4, 6) or not _digits(main) or (dot and len(main) != 6):
        raise Invalid(s)
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
            raise Invalid(offset)
        hours, minutes = int(offset[1:3]), int(offset[3:])
        if hours > 23 or minutes > 59:
            raise Invalid(offset)
        delta = datetime.timedelta(hours=hours, minutes=minutes)
        tz = datetime.timezone(-delta if offset[0] == "-" else delta)
    main, dot, frac = s.partition(".")
    if len(main) not in (4, 6, 8, 10, 12, 14) or not _digits(main) or (dot and len(main) != 14):
        raise Invalid(s)
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
    groups: Any
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
            part = part.strip(PAD)
            if part:
                components[cname] = part
        if components:
            record[name] = components
    return record


def to_string(value: Any, vr: str) -> str:
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
            raise Invalid(value)
        value = int(value)
    elif isinstance(value, str):
        value = int(value, 16) if vr == "AT" else int(value)  # IS as written, e.g. " +12"
    elif not isinstance(value, int) or isinstance(value, bool):
        raise Invalid(value)
    low, high = _INT_RANGE.get(vr, _INT64)
    if not low <= value <= high:
        raise Invalid(value)
    return int(value)


def _to_float(value: Any, vr: str) -> float:
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        return float(value)
    raise Invalid(value)


def _parser(parse: Any) -> Any:
    def convert(value: Any, vr: str) -> Any:
        if not isinstance(value, str):
            raise Invalid(value)
        return parse(value)

    return convert


def _to_pn(value: Any, vr: str) -> dict:
    if isinstance(value, int | float):
        raise Invalid(value)
    return _pn_record(value)


_CONVERT = {
    "STRING": to_string,
    "INTEGER": _to_int,
    "FLOAT": _to_float,
    "DATE": _parser(parse_date),
    "TIME": _parser(parse_time),
    "TIMESTAMP": _parser(parse_datetime),
    "PN": _to_pn,
}


def column_value(values: list, vr: str, col_type: str, repeated: bool) -> Any:
    """The values of one element, in its own VR ``vr``, as the column's value; raises Invalid
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
        return "\\".join(to_string(v, vr) for v in values)
    raise Invalid(values)
