"""Elements: their values read from a file's raw bytes for the common VRs (fast), or from
pydicom's conversion (SQ, ambiguous or implicit private VRs, ISO 2022 escapes)."""

from __future__ import annotations

import struct
from typing import Any

import pydicom
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR, DEFAULT_CHARSET_VR, PersonName

from dicomlib.flatten.columns import STRING_VRS
from dicomlib.flatten.values import PAD, Invalid

SPECIFIC_CHARACTER_SET = BaseTag(0x00080005)
MAX_VALUE_BYTES = 1_000_000  # larger values are too_large (and the header reader leaves them unread)
# Raw decoding: which VRs are split on "\\", and how their values are stripped.
_ASCII_VRS = frozenset(map(str, DEFAULT_CHARSET_VR))  # AE AS CS DA DS DT IS TM UI UR
_CHARSET_VRS = frozenset(map(str, CUSTOMIZABLE_CHARSET_VR))  # LO LT PN SH ST UC UT
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
DEFAULT_ENCODINGS = ("iso8859",)
_ENCODINGS: dict[tuple[str, ...], tuple[str, ...]] = {}
FALLBACK = object()  # sentinel: let pydicom convert the element
RAW_DECODED_VRS = _ASCII_VRS | _CHARSET_VRS | frozenset(_BINARY)


def raw_values(raw: RawDataElement, vr: str, encodings: tuple[str, ...]) -> Any:
    """Values of a raw element decoded from its bytes: a list (None if empty), FALLBACK when
    pydicom must convert it; raises Invalid for a binary value of the wrong length."""
    data = raw.value
    if not data:
        return None
    if vr in _ASCII_VRS or vr in _CHARSET_VRS:
        if vr in _ASCII_VRS:
            text = data.decode("latin-1")
        else:
            if len(encodings) > 1 and b"\x1b" in data:
                return FALLBACK  # ISO 2022 code extensions: pydicom decodes each part
            try:
                text = data.decode(encodings[0])
            except UnicodeError:
                text = data.decode(encodings[0], errors="replace")
            except LookupError:
                return FALLBACK
        parts = [text] if vr in _SINGLE_VALUED or "\\" not in text else text.split("\\")
        strip = str.rstrip if vr in _RSTRIP_ONLY else str.strip
        parts = [strip(p, PAD) for p in parts]
        if vr == "PN":
            return [p.split("=", 2) if p else "" for p in parts] if any(parts) else None
        return parts if any(parts) else None
    fmt = _BINARY.get(vr)
    if fmt is None:
        return FALLBACK
    code, size = fmt
    count, rest = divmod(len(data), size)
    if rest:
        raise Invalid(f"{len(data)} bytes for {vr}")
    if vr == "AT":
        numbers = struct.unpack(f"{'<' if raw.is_little_endian else '>'}{2 * count}H", data)
        return [(numbers[i] << 16) | numbers[i + 1] for i in range(0, 2 * count, 2)]
    return list(struct.unpack(f"{'<' if raw.is_little_endian else '>'}{count}{code}", data))


def element_values(elem: DataElement) -> list | None:
    """Values of a converted element as a list of str / int / float / PersonName (None if empty)."""
    value = elem.value
    if value is None or value == "" or value == b"":
        return None
    vr = elem.VR
    values = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
    if vr in STRING_VRS or vr in ("DA", "TM", "DT"):
        strip = str.rstrip if vr in _RSTRIP_ONLY else str.strip
        out = [strip(v if isinstance(v, str) else ("" if v is None else str(v)), PAD) for v in values]
        if vr in _SINGLE_VALUED and len(out) > 1:
            out = ["\\".join(out)]
        return out if any(out) else None
    if vr == "PN":
        out = [v if v is not None and str(v).rstrip(PAD) else "" for v in values]
        return out if any(out) else None
    return [v for v in values if v is not None] or None


def value_size(values: list) -> int:
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


def encodings_of(ds: pydicom.Dataset, parent: tuple[str, ...]) -> tuple[str, ...]:
    """The Python encodings of a data set's Specific Character Set, else its parent's."""
    elem = ds._dict.get(SPECIFIC_CHARACTER_SET)
    if elem is None:
        return parent
    if isinstance(elem, RawDataElement):
        terms = tuple(t.strip(PAD) for t in (elem.value or b"").decode("latin-1").split("\\"))
    else:
        value = elem.value
        if not value:
            terms = ()
        else:
            terms = tuple(
                str(t).strip(PAD) for t in (value if isinstance(value, list | MultiValue) else [value])
            )
    cached = _ENCODINGS.get(terms)
    if cached is None:
        try:
            cached = tuple(convert_encodings(list(terms) or [""])) or DEFAULT_ENCODINGS
        except Exception:
            cached = DEFAULT_ENCODINGS
        _ENCODINGS[terms] = cached
    return cached
