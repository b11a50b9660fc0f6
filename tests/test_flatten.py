"""dicomlib.flatten: one data set as one row of the metadata table (CONTRACT.md, "Metadata table").

The corpus test checks every readable file against an independent oracle, dcmtk's dcm2json, run on
a copy cut just before Pixel Data (what stop_before_pixels reads; dcm2json refuses encapsulated
pixel data, and binary bulk would only bloat its output). Its DICOM JSON is converted here by this
file's own parsers (regular expressions and strptime, not the flattener's) following the documented
rules, and compared attribute by attribute, inside sequence items too: every attribute is in the row
with the expected value or named in DroppedTags, and the row holds nothing else. dcmtk is helped
where it differs from pydicom by design: a file it cannot parse as written (UN with a known VR,
implicit VR data under an explicit transfer syntax) goes through `dcmconv +uc -vr` first, and a
Specific Character Set its iconv lacks (ISO 2022 IR 87) is replaced by ISO_IR 100 so that it reads
the file at all; then the values of charset-affected VRs are not compared (CHARSET_UNCHECKED;
test_a_charset_file_decodes_its_names checks one of them). dcm2json rewrites Specific Character Set
as ISO_IR 192 (it writes UTF-8), so that attribute's value is never compared.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import math
import random
import re
import subprocess
import tempfile
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.datadict import DicomDictionary, get_entry, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from dicomlib.flatten import flatten
from dicomlib.flatten.columns import OTHER_ELEMENTS_FIELD, in_tag_order
from dicomlib.flatten.elements import MAX_VALUE_BYTES
from dicomlib.flatten.walk import MAX_SEQUENCE_DEPTH
from schemas.bigquery import DROPPED_TAGS_FIELD, EVENT_FIELDS, column_count, merge, to_arrow
from schemas.rows import Flat, restrict
from tests.schema_rules import nesting_depth

pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom warns about many odd corpus files

# Files the oracle cannot check, with the reason. Keep it short.
ORACLE_EXCEPTIONS = {
    # Cut short inside IsocenterPosition in a sequence: pydicom reads up to the cut, dcmtk refuses
    # the whole file ("premature end of stream"). The import pipeline rejects it as `truncated`.
    "rtplan_truncated.dcm",
}
# Files whose text dcm2json cannot decode: the values of SH LO ST LT UC UT PN left unchecked (their
# presence still is). The ones its iconv refuses outright are read with the Specific Character Set
# replaced by ISO_IR 100 (same length, nothing else moves).
IR87 = "ISO 2022 IR 87 (JIS X 0208): dcmtk's iconv (glibc) has no such charset and refuses the file"
CHARSET_UNCHECKED = {
    "chrH31.dcm": IR87,
    "chrH32.dcm": IR87,
    "chrJapMulti.dcm": IR87,
    "chrJapMultiExplicitIR6.dcm": IR87,
    "chrSQEncoding1.dcm": IR87,
    "J2K_pixelrep_mismatch.dcm": IR87,
    "chrSQEncoding.dcm": "an item's own ISO 2022 IR 13\\ISO 2022 IR 87: dcm2json leaves its escapes",
}
BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
CHARSET_VRS = {"SH", "LO", "ST", "LT", "UC", "UT", "PN"}
TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
REASONS = {"excluded_vr", "too_large", "invalid_value", "too_deep", "column_limit"}


def read(path: Path | str) -> Dataset | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return None
    return ds if len(ds) else None


def dropped(flat: Flat) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for entry in flat.row.get("DroppedTags", []):
        out.setdefault(entry["TagName"], set()).add(entry["Reason"])
    return out


# --- the oracle ------------------------------------------------------------------------------


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, timeout=60)


def charset_offsets(ds: Dataset) -> list[tuple[int, int]]:
    """(file offset, length) of every Specific Character Set value, sequence items included."""
    out = []
    elem = ds._dict.get(0x00080005)
    if elem is not None:
        if isinstance(elem, RawDataElement):
            out.append((elem.value_tell, elem.length))
        else:
            text = "\\".join(elem.value) if isinstance(elem.value, list | MultiValue) else elem.value
            out.append((elem.file_tell, len(text) + len(text) % 2))
    for tag in list(ds._dict):
        if ds[tag].VR == "SQ":
            for child in ds[tag].value:
                out.extend(charset_offsets(child))
    return out


def unconverted_un(js: dict) -> bool:
    """Whether dcm2json left a public attribute with a known VR as UN (pydicom converts those)."""
    for key, element in js.items():
        if element["vr"] == "UN" and not int(key[:4], 16) & 1 and int(key, 16) in DicomDictionary:
            return True
        if element["vr"] == "SQ" and any(unconverted_un(item) for item in element.get("Value") or []):
            return True
    return False


class Oracle:
    """dcm2json's reading of a file: ``js`` (None if it failed), ``patched`` when the charset had
    to be replaced, ``converted`` when the file went through dcmconv, whose output has its own file
    meta group (so that group is not compared)."""

    def __init__(self, path: Path, work: Path) -> None:
        with open(path, "rb") as fp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            end = fp.tell()  # pydicom stops at the Pixel Data tag (or at the end of a deflated file)
        data = bytearray(path.read_bytes()[:end])
        source = work / "cut.dcm"
        source.write_bytes(data)
        self.patched = self.converted = False
        self.error = ""
        original = result = self._json(source)
        if result.returncode or unconverted_un(json.loads(result.stdout.decode("utf-8", errors="replace"))):
            fixed = work / "dcmconv.dcm"  # UN with a known VR, implicit VR under an explicit syntax
            if _run("dcmconv", "+F", "+uc", "-vr", str(source), str(fixed)).returncode == 0:
                converted = self._json(fixed)
                if not converted.returncode:
                    self.converted, result = True, converted
        if result.returncode and b"character" in original.stderr:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                offsets = charset_offsets(ds)
            for tell, length in offsets:  # the same length: nothing else moves
                data[tell : tell + length] = b"ISO_IR 100".ljust(length)
            source = work / "latin.dcm"
            source.write_bytes(data)
            self.patched = True
            result = self._json(source)
        self.js = None if result.returncode else json.loads(result.stdout.decode("utf-8", errors="replace"))
        self.error = result.stderr.decode(errors="replace") if result.returncode else ""

    @staticmethod
    def _json(source: Path) -> subprocess.CompletedProcess:
        return _run("dcm2json", "+m", "-fc", "-ee", str(source))


DA_RE = re.compile(r"(\d{4})\.?(\d\d)\.?(\d\d)")
TM_RE = re.compile(r"(\d\d)(?::?(\d\d)(?::?(\d\d)(?:\.(\d{1,6}))?)?)?")
DT_RE = re.compile(
    r"(\d{4})(?:(\d\d)(?:(\d\d)(?:(\d\d)(?:(\d\d)(?:(\d\d)(?:\.(\d{1,6}))?)?)?)?)?)?(?:([+-])(\d\d)(\d\d))?"
)


class Invalid(Exception):
    pass


def expect_date(s: str) -> datetime.date:
    m = DA_RE.fullmatch(s)
    if not m:
        raise Invalid(s)
    try:
        return datetime.datetime.strptime("".join(m.groups()), "%Y%m%d").date()
    except ValueError:
        raise Invalid(s) from None


def expect_time(s: str) -> datetime.time:
    m = TM_RE.fullmatch(s)
    if not m:
        raise Invalid(s)
    h, mi, sec, frac = m.groups()
    try:
        return datetime.time(
            int(h), int(mi or 0), int(sec or 0), int((frac or "0") + "0" * (6 - len(frac or "0")))
        )
    except ValueError:
        raise Invalid(s) from None


def expect_datetime(s: str) -> datetime.datetime:
    m = DT_RE.fullmatch(s)
    if not m:
        raise Invalid(s)
    y, mo, d, h, mi, sec, frac, sign, oh, om = m.groups()
    try:
        naive = datetime.datetime(
            int(y), int(mo or 1), int(d or 1), int(h or 0), int(mi or 0), int(sec or 0),
            int((frac or "0").ljust(6, "0")),
        )  # fmt: skip
        offset = datetime.timedelta(hours=int(oh or 0), minutes=int(om or 0)) * (-1 if sign == "-" else 1)
        return (naive - offset).replace(tzinfo=datetime.UTC)
    except (ValueError, OverflowError):
        raise Invalid(s) from None


def expect_pn(value: dict | None) -> dict:
    record = {}
    for group in ("Alphabetic", "Ideographic", "Phonetic"):
        text = (value or {}).get(group)
        if not text:
            continue
        parts = dict(
            zip(
                ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix"),
                text.split("^", 4),
                strict=False,
            )
        )
        parts = {k: v.strip() for k, v in parts.items() if v.strip()}
        if parts:
            record[group] = parts
    return record


def column_of(tag: int) -> tuple[str, str, str, bool]:
    """(name, kind, type, repeated) by the documented rules, from the DICOM dictionary."""
    if tag >> 16 & 1:
        return f"Tag_{tag:08X}", "other", "STRING", True
    try:
        vr, vm, _, _, keyword = get_entry(tag)
    except KeyError:
        return f"Tag_{tag:08X}", "other", "STRING", True
    if not keyword:
        return f"Tag_{tag:08X}", "other", "STRING", True
    first = next((v for v in vr.split(" or ") if v not in BINARY_VRS), vr)
    types = {
        "DA": "DATE",
        "TM": "TIME",
        "DT": "TIMESTAMP",
        "FL": "FLOAT",
        "FD": "FLOAT",
        "PN": "PN",
        "SQ": "SQ",
    }
    types.update(dict.fromkeys(["AT", "SL", "SS", "UL", "US", "SV", "UV"], "INTEGER"))
    kind = "group" if tag not in DicomDictionary and (tag >> 24) in (0x50, 0x60, 0x7F) else "public"
    return keyword, kind, types.get(first, "STRING"), vm != "1"


def expected_value(element: dict, vr: str, type_: str, repeated: bool) -> Any:
    """The column value dcm2json's element should give; raises Invalid if it cannot be held."""
    values = element.get("Value")
    if not values or all(v in (None, "", {}) for v in values):
        return None

    def one(v: Any) -> Any:
        if type_ == "STRING":
            if vr == "AT":
                return f"{int(v, 16):08X}"
            return v.strip() if isinstance(v, str) else v  # DS/IS come as JSON numbers
        if type_ == "INTEGER":
            return int(v, 16) if vr == "AT" else int(v)
        if type_ == "FLOAT":
            return float(v)
        if type_ == "PN":
            return expect_pn(v)
        parse = {"DATE": expect_date, "TIME": expect_time, "TIMESTAMP": expect_datetime}[type_]
        return parse(v.strip())

    if repeated:
        out = []
        for v in values:
            if v in (None, "", {}):
                if type_ == "STRING":
                    out.append("")
                elif type_ == "PN":
                    out.append({})
            else:
                out.append(one(v))
        return out
    if len(values) > 1:
        if type_ != "STRING":
            raise Invalid(values)
        return "\\".join(str(one(v)) if v is not None else "" for v in values)
    return one(values[0])


def same(actual: Any, expected: Any) -> bool:
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(same(a, e) for a, e in zip(actual, expected, strict=True))
        )
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and actual.keys() == expected.keys()
            and all(same(actual[k], expected[k]) for k in expected)
        )
    if isinstance(expected, float) or (isinstance(expected, int) and isinstance(actual, str)):
        try:
            a = float(actual)
        except (TypeError, ValueError):
            return False
        return (
            a == expected
            or math.isclose(a, expected, rel_tol=1e-6)
            or (math.isnan(a) and math.isnan(expected))
        )
    if isinstance(expected, str) and isinstance(actual, str):
        pad = " \x00\r\n\t"  # dcmtk keeps a trailing NUL, and drops the CR LF ending a text
        return actual.strip(pad) == expected.strip(pad)
    return actual == expected and type(actual) is type(expected)


def compare(
    js: dict,
    row: dict,
    drops: dict[str, set[str]],
    prefix: str,
    top: bool,
    unchecked: bool,
    problems: list[str],
) -> None:
    """Every attribute of dcm2json's data set ``js`` in ``row`` or in DroppedTags, and nothing else."""
    names = {"OtherElements", "DroppedTags"} if top else {"OtherElements"}
    others = {entry["Tag"]: entry for entry in row.get("OtherElements", [])}
    seen_others = set()
    for key, element in js.items():
        tag = int(key, 16)
        if not tag & 0xFFFF or (top and tag >= 0x7FE00008):
            continue  # group lengths; Pixel Data and what follows it are not metadata
        name, kind, type_, repeated = column_of(tag)
        path = prefix + name
        names.add(name)
        vr = element["vr"]
        if path in drops:
            if not drops[path] <= REASONS:
                problems.append(f"{path}: unknown reasons {drops[path]}")
            continue
        if tag == 0x00080005 or (unchecked and vr in CHARSET_VRS):  # dcm2json writes ISO_IR 192
            if name not in row and name not in others:
                problems.append(f"{path}: missing")
            seen_others.add(name)
            continue
        if vr == "SQ":
            items = element.get("Value") or []
            column = row.get(name)
            if column is None:  # no items, or nothing but dropped attributes in them
                for child in items:
                    compare(child, {}, drops, f"{path}.", False, unchecked, problems)
                continue
            if len(column) != len(items):
                problems.append(f"{path}: {len(column)} items, dcm2json has {len(items)}")
                continue
            for item, item_row in zip(items, column, strict=True):
                compare(item, item_row, drops, f"{path}.", False, unchecked, problems)
            continue
        if kind == "other":
            seen_others.add(name)
            entry = others.get(name)
            if entry is None:
                problems.append(f"{path}: not in OtherElements nor DroppedTags")
            elif vr in TEXT_VRS and vr != "PN" and element.get("Value"):
                want = ["" if v is None else v for v in element["Value"]]
                if not same(entry["Data"], want if vr not in ("DS", "IS") else [float(v) for v in want]):
                    problems.append(f"{path}: OtherElements {entry['Data']!r}, dcm2json {want!r}")
            continue
        if vr in BINARY_VRS:
            problems.append(f"{path}: binary VR {vr} kept")
            continue
        try:
            expected = expected_value(element, vr, type_, repeated)
        except (Invalid, ValueError):
            problems.append(f"{path}: invalid {element.get('Value')!r} not in DroppedTags")
            continue
        if kind == "group":
            entries = [e for e in row.get(name, []) if e["Id"] == f"{tag >> 16:04X}"]
            if len(entries) != 1:
                problems.append(f"{path}: no entry for group {tag >> 16:04X}")
                continue
            actual = entries[0]["Value"]
        elif name not in row:
            problems.append(f"{path}: missing")
            continue
        else:
            actual = row[name]
        if not same(actual, expected):
            problems.append(f"{path}: row {actual!r}, dcm2json {expected!r}")
    for name in row:
        if name not in names:
            problems.append(f"{prefix}{name}: in the row, not in the file")
    for tag_name in others:
        if tag_name not in seen_others and f"{prefix}{tag_name}" not in drops:
            problems.append(f"{prefix}{tag_name}: in OtherElements, not in the file")


@pytest.fixture(scope="session")
def corpus_flats(corpus: list[Path]) -> list[tuple[Path, Flat]]:
    """Every readable corpus file with a data set, flattened."""
    out = []
    for path in corpus:
        ds = read(path)
        if ds is not None:
            out.append((path, flatten(ds)))
    return out


def test_every_corpus_file_agrees_with_dcm2json(corpus_flats: list[tuple[Path, Flat]]) -> None:
    def check(job: tuple[int, Path, Flat]) -> list[str]:
        index, path, flat = job
        with tempfile.TemporaryDirectory() as work:
            oracle = Oracle(path, Path(work))
        if path.name in ORACLE_EXCEPTIONS:
            return [] if oracle.js is None else [f"{path.name}: dcm2json reads it now: not an exception"]
        if oracle.js is None:
            return [f"{path.name}: dcm2json failed: {oracle.error[:300]}"]
        if oracle.patched != (CHARSET_UNCHECKED.get(path.name) == IR87):
            return [f"{path.name}: charset replaced: {oracle.patched}, CHARSET_UNCHECKED disagrees"]
        js, row = oracle.js, flat.row
        if oracle.converted:  # dcmconv wrote its own file meta group
            js = {k: v for k, v in js.items() if not k.startswith("0002")}
            meta = {elem.keyword for elem in read(path).file_meta}
            row = {k: v for k, v in row.items() if k not in meta}
        problems: list[str] = []
        compare(js, row, dropped(flat), "", True, path.name in CHARSET_UNCHECKED, problems)
        return [f"{path.name}: {p}" for p in problems]

    jobs = [(i, path, flat) for i, (path, flat) in enumerate(corpus_flats)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = [p for found in pool.map(check, jobs) for p in found]
    assert len(corpus_flats) > 230
    assert not problems, "\n".join(problems[:60]) + f"\n... {len(problems)} in all"


def test_the_schema_describes_exactly_the_row(corpus_flats: list[tuple[Path, Flat]]) -> None:
    def check(value: Any, f: dict, path: str, problems: list[str]) -> None:
        if value is None:
            return
        values = value if f["mode"] == "REPEATED" else [value]
        if f["mode"] == "REPEATED" and not isinstance(value, list):
            problems.append(f"{path}: REPEATED but {value!r}")
            return
        types = {
            "STRING": str, "INTEGER": int, "FLOAT": float, "DATE": datetime.date,
            "TIME": datetime.time, "TIMESTAMP": datetime.datetime, "RECORD": dict,
        }  # fmt: skip
        for v in values:
            if v is None and f["mode"] == "REPEATED":
                problems.append(f"{path}: NULL in an array")
            elif v is not None and not isinstance(v, types[f["type"]]):
                problems.append(f"{path}: {f['type']} but {v!r}")
            elif f["type"] == "DATE" and isinstance(v, datetime.datetime):
                problems.append(f"{path}: DATE but {v!r}")
            elif f["type"] == "TIMESTAMP" and v.tzinfo is not datetime.UTC:
                problems.append(f"{path}: TIMESTAMP not in UTC: {v!r}")
            elif f["type"] == "RECORD":
                by_name = {sub["name"]: sub for sub in f["fields"]}
                for key, sub_value in v.items():
                    if key not in by_name:
                        problems.append(f"{path}.{key}: not in the schema")
                    else:
                        check(sub_value, by_name[key], f"{path}.{key}", problems)

    problems: list[str] = []
    for path, flat in corpus_flats:
        assert [f["name"] for f in flat.schema] == list(flat.row), path.name
        for f in flat.schema:
            check(flat.row[f["name"]], f, f"{path.name}:{f['name']}", problems)
        assert nesting_depth(flat.schema) <= 15
    assert not problems, "\n".join(problems[:40])


def test_a_row_from_dicom_json_is_the_row_from_the_file(corpus_flats: list[tuple[Path, Flat]]) -> None:
    """WADO-RS metadata read with Dataset.from_json flattens as the file does, apart from the file
    meta group (DICOM JSON has none), bulk data (excluded VRs either way) and DS/IS, which DICOM JSON
    writes as numbers: "0.50" comes back as "0.5"."""
    number = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")

    def normal(value: Any, key: str = "") -> Any:
        """Numbers written as strings (DS, IS, also in OtherElements) compared as numbers."""
        if isinstance(value, dict):
            return {k: normal(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [normal(v, key) for v in value]
        if isinstance(value, str) and number.fullmatch(value.strip()):
            return float(value)
        return value

    compared = 0
    differences = []
    for path, flat in corpus_flats:
        ds = read(path)
        assert ds is not None
        try:
            obj = ds.to_json_dict(bulk_data_threshold=1, bulk_data_element_handler=lambda e: "uri")
        except Exception:
            continue  # pydicom cannot write some odd values as JSON (an IS "1A")
        from_json = flatten(Dataset.from_json(obj, bulk_data_uri_handler=lambda *a: b""))
        meta = {elem.keyword for elem in getattr(ds, "file_meta", [])}
        row = {k: v for k, v in flat.row.items() if k not in meta and k != "DroppedTags"}
        drops = [d for d in flat.row.get("DroppedTags", []) if d["TagName"] not in meta]
        json_row = {k: v for k, v in from_json.row.items() if k != "DroppedTags"}
        json_drops = from_json.row.get("DroppedTags", [])
        compared += 1
        if normal(row) != normal(json_row) or drops != json_drops:
            differing = sorted(
                k for k in row.keys() | json_row.keys() if normal(row.get(k), k) != normal(json_row.get(k), k)
            )
            differences.append(
                f"{path.name}: {[(k, row.get(k), json_row.get(k)) for k in differing[:3]]} "
                f"{(drops, json_drops) if drops != json_drops else ''}"
            )
    assert compared > 230
    assert not differences, "\n".join(differences)


def test_corpus_figures(corpus_flats: list[tuple[Path, Flat]]) -> None:
    reasons = Counter(
        entry["Reason"] for _, flat in corpus_flats for entry in flat.row.get("DroppedTags", [])
    )
    assert set(reasons) <= REASONS
    assert reasons["excluded_vr"] > 100  # FileMetaInformationVersion alone is in almost every file


# --- conversions -----------------------------------------------------------------------------


def one(vr: str, value: Any, keyword: str) -> Flat:
    ds = Dataset()
    ds.add_new(keyword, vr, value)
    return flatten(ds)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20010203", datetime.date(2001, 2, 3)),
        ("2001.02.03", datetime.date(2001, 2, 3)),  # ACR-NEMA
        ("20000229", datetime.date(2000, 2, 29)),
        ("20010230", None),
        ("20011301", None),
        ("00000101", None),
        ("2001023", None),
        ("abcdefgh", None),
        ("20010203-20010204", None),  # a range is a query, not a value
    ],
)
def test_da(value: str, expected: datetime.date | None) -> None:
    flat = one("DA", value, "StudyDate")
    if expected is None:
        assert "StudyDate" not in flat.row
        assert dropped(flat) == {"StudyDate": {"invalid_value"}}
    else:
        assert flat.row["StudyDate"] == expected
        assert flat.schema == [{"name": "StudyDate", "type": "DATE", "mode": "NULLABLE"}]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10", datetime.time(10)),
        ("1015", datetime.time(10, 15)),
        ("101530", datetime.time(10, 15, 30)),
        ("101530.5", datetime.time(10, 15, 30, 500000)),
        ("101530.123456", datetime.time(10, 15, 30, 123456)),
        ("10:15:30.25", datetime.time(10, 15, 30, 250000)),  # ACR-NEMA
        ("235959.999999", datetime.time(23, 59, 59, 999999)),
        ("25", None),
        ("1060", None),
        ("101560", None),  # a leap second: TIME cannot hold it
        ("101530.1234567", None),
        ("1015.5", None),
        ("1", None),
        ("ab", None),
    ],
)
def test_tm(value: str, expected: datetime.time | None) -> None:
    flat = one("TM", value, "StudyTime")
    if expected is None:
        assert dropped(flat) == {"StudyTime": {"invalid_value"}}
    else:
        assert flat.row["StudyTime"] == expected
        assert flat.schema[0]["type"] == "TIME"


UTC = datetime.UTC


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2001", datetime.datetime(2001, 1, 1, tzinfo=UTC)),
        ("200103", datetime.datetime(2001, 3, 1, tzinfo=UTC)),
        ("20010304", datetime.datetime(2001, 3, 4, tzinfo=UTC)),
        ("2001030410", datetime.datetime(2001, 3, 4, 10, tzinfo=UTC)),
        ("200103041015", datetime.datetime(2001, 3, 4, 10, 15, tzinfo=UTC)),
        ("20010304101530", datetime.datetime(2001, 3, 4, 10, 15, 30, tzinfo=UTC)),
        ("20010304101530.25", datetime.datetime(2001, 3, 4, 10, 15, 30, 250000, tzinfo=UTC)),
        ("20010304101530+0100", datetime.datetime(2001, 3, 4, 9, 15, 30, tzinfo=UTC)),
        ("20010304101530.000001-0530", datetime.datetime(2001, 3, 4, 15, 45, 30, 1, tzinfo=UTC)),
        ("2001+0100", datetime.datetime(2000, 12, 31, 23, tzinfo=UTC)),
        ("20011304", None),
        ("2001030425", None),
        ("20010304101530+01", None),
        ("20010304101530+0199", None),
        ("200", None),
        ("00010101000000+0100", None),  # before year 1 in UTC
    ],
)
def test_dt(value: str, expected: datetime.datetime | None) -> None:
    flat = one("DT", value, "AcquisitionDateTime")
    if expected is None:
        assert dropped(flat) == {"AcquisitionDateTime": {"invalid_value"}}
    else:
        got = flat.row["AcquisitionDateTime"]
        assert got == expected and got.tzinfo is UTC
        assert flat.schema[0]["type"] == "TIMESTAMP"


def test_numbers_at_and_strings() -> None:
    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "", "AXIAL"]
    ds.PixelSpacing = ["0.50", "+5.0E-01"]  # DS kept as written
    ds.InstanceNumber = "0012"
    ds.Rows = 512
    ds.SliceThickness = "1.25 "
    tag = Tag("RescaleSlope")
    ds._dict[tag] = RawDataElement(tag, "DS", 4, b"abc ", 0, False, True)  # no DS, but a STRING holds it
    ds.add_new("FrameIncrementPointer", "AT", [0x00181063, 0x00181065])
    ds.add_new("ReferencedWaveformChannels", "US", [1, 2])
    ds.add_new("EchoTrainLength", "IS", "3")
    ds.add_new("RecommendedDisplayFrameRateInFloat", "FL", 25.5)
    ds.add_new("SelectorFDValue", "FD", [1.5, -2.25])
    ds.add_new("SelectorSVValue", "SV", [-(2**63)])
    ds.add_new("SelectorUVValue", "UV", [2**63])  # not an INT64
    ds.PatientComments = "  leading spaces stay in LT  "
    ds.StudyDescription = "A\\B"  # two values where the VM is 1: kept as written
    flat = flatten(ds)
    row = flat.row
    assert row["ImageType"] == ["ORIGINAL", "PRIMARY", "", "AXIAL"]
    assert row["PixelSpacing"] == ["0.50", "+5.0E-01"]
    assert row["InstanceNumber"] == "0012"
    assert row["Rows"] == 512
    assert row["SliceThickness"] == "1.25"
    assert row["RescaleSlope"] == "abc"
    assert row["FrameIncrementPointer"] == [0x00181063, 0x00181065]
    assert row["ReferencedWaveformChannels"] == [1, 2]
    assert row["RecommendedDisplayFrameRateInFloat"] == 25.5
    assert row["SelectorFDValue"] == [1.5, -2.25]
    assert row["SelectorSVValue"] == [-(2**63)]
    assert "SelectorUVValue" not in row
    assert row["PatientComments"] == "  leading spaces stay in LT"
    assert row["StudyDescription"] == "A\\B"
    assert dropped(flat) == {"SelectorUVValue": {"invalid_value"}}
    types = {f["name"]: (f["type"], f["mode"]) for f in flat.schema}
    assert types["ImageType"] == ("STRING", "REPEATED")
    assert types["PixelSpacing"] == ("STRING", "REPEATED")
    assert types["InstanceNumber"] == ("STRING", "NULLABLE")
    assert types["Rows"] == ("INTEGER", "NULLABLE")
    assert types["FrameIncrementPointer"] == ("INTEGER", "REPEATED")
    assert types["RecommendedDisplayFrameRateInFloat"] == ("FLOAT", "NULLABLE")
    assert types["DroppedTags"] == ("RECORD", "REPEATED")


def test_raw_binary_values_and_odd_lengths() -> None:
    """Values read from a file are decoded from their bytes: both byte orders, and a value whose
    length does not fit its VR is invalid_value rather than an exception."""
    ds = pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm"), stop_before_pixels=True)
    flat = flatten(ds)
    assert flat.row["Rows"] == 64 and flat.row["BitsAllocated"] == 16
    little = flatten(pydicom.dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True))
    assert little.row["Rows"] == 64
    assert little.row["PixelSpacing"] == flat.row["PixelSpacing"]

    odd = Dataset()
    odd._dict[Tag(0x00280010)] = RawDataElement(Tag(0x00280010), "US", 3, b"\x01\x02\x03", 0, False, True)
    odd._dict[Tag(0x00280011)] = RawDataElement(Tag(0x00280011), "US", 2, b"\x00\x02", 0, False, True)
    odd._dict[Tag(0x00080020)] = RawDataElement(Tag(0x00080020), None, 8, b"20010230", 0, True, True)
    flat = flatten(odd)
    assert flat.row == {
        "Columns": 512,
        "DroppedTags": [
            {"TagName": "StudyDate", "Reason": "invalid_value"},
            {"TagName": "Rows", "Reason": "invalid_value"},
        ],
    }


def test_pn_with_three_groups_and_several_values() -> None:
    ds = Dataset()
    ds.PatientName = "Yamada^Tarou^^Dr^Jr=山田^太郎=やまだ^たろう"
    ds.PerformingPhysicianName = ["Smith^John", "", "Doe^Jane^Q"]
    ds.ReferringPhysicianName = ""
    flat = flatten(ds)
    assert flat.row["PatientName"] == {
        "Alphabetic": {"FamilyName": "Yamada", "GivenName": "Tarou", "NamePrefix": "Dr", "NameSuffix": "Jr"},
        "Ideographic": {"FamilyName": "山田", "GivenName": "太郎"},
        "Phonetic": {"FamilyName": "やまだ", "GivenName": "たろう"},
    }
    assert flat.row["PerformingPhysicianName"] == [
        {"Alphabetic": {"FamilyName": "Smith", "GivenName": "John"}},
        {},
        {"Alphabetic": {"FamilyName": "Doe", "GivenName": "Jane", "MiddleName": "Q"}},
    ]
    assert flat.row["ReferringPhysicianName"] is None  # present, empty
    pn = {f["name"]: f for f in flat.schema}["PatientName"]
    assert (pn["type"], pn["mode"]) == ("RECORD", "NULLABLE")
    assert [g["name"] for g in pn["fields"]] == ["Alphabetic", "Ideographic", "Phonetic"]
    assert [c["name"] for c in pn["fields"][0]["fields"]] == [
        "FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix",
    ]  # fmt: skip
    assert {f["name"]: f for f in flat.schema}["PerformingPhysicianName"]["mode"] == "REPEATED"


def test_a_charset_file_decodes_its_names() -> None:
    ds = read(get_charset_files("chrH31.dcm")[0])
    flat = flatten(ds)
    assert flat.row["PatientName"] == {
        "Alphabetic": {"FamilyName": "Yamada", "GivenName": "Tarou"},
        "Ideographic": {"FamilyName": "山田", "GivenName": "太郎"},
        "Phonetic": {"FamilyName": "やまだ", "GivenName": "たろう"},
    }


def item(**attributes: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_sequences_nest_as_repeated_records_with_the_union_of_their_items() -> None:
    ds = Dataset()
    ds.ReferencedImageSequence = Sequence([
        item(ReferencedSOPClassUID="1.2", ReferencedSOPInstanceUID="1.2.3"),
        item(ReferencedSOPClassUID="1.2", ReferencedFrameNumber=["1", "2"]),
    ])  # fmt: skip
    ds.ReferencedImageSequence[1].add_new(0x00091001, "LO", "private")
    ds.ReferencedImageSequence[0].add_new("ReferencedSegmentNumber", "OB", b"\x00\x01")  # wrong VR on purpose
    ds.ProcedureCodeSequence = Sequence([])  # no items: no column
    ds.AnatomicRegionSequence = Sequence([Dataset()])  # nothing in the item: no column
    flat = flatten(ds)
    assert flat.row["ReferencedImageSequence"] == [
        {"ReferencedSOPClassUID": "1.2", "ReferencedSOPInstanceUID": "1.2.3"},
        {
            "ReferencedSOPClassUID": "1.2",
            "ReferencedFrameNumber": ["1", "2"],
            "OtherElements": [{"Tag": "Tag_00091001", "Data": ["private"]}],
        },
    ]
    seq = flat.schema[0]
    assert (seq["name"], seq["type"], seq["mode"]) == ("ReferencedImageSequence", "RECORD", "REPEATED")
    assert [f["name"] for f in seq["fields"]] == [
        "ReferencedSOPClassUID", "ReferencedSOPInstanceUID", "ReferencedFrameNumber", "OtherElements",
    ]  # fmt: skip
    assert {f["name"]: f for f in seq["fields"]}["OtherElements"] == OTHER_ELEMENTS_FIELD
    assert "ProcedureCodeSequence" not in flat.row and "AnatomicRegionSequence" not in flat.row
    assert dropped(flat) == {"ReferencedImageSequence.ReferencedSegmentNumber": {"excluded_vr"}}


def test_private_attributes_and_private_sequences() -> None:
    ds = Dataset()
    ds.PatientID = "1"
    block = ds.private_block(0x0029, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "hello")
    block.add_new(0x02, "US", [1, 2])
    block.add_new(0x03, "OB", b"\x00\x01")
    block.add_new(0x04, "SQ", Sequence([item(PatientID="inner"), item(PatientName="A^B")]))
    block.add_new(0x05, "DS", ["1.5", "2"])
    block.add_new(0x06, "AT", 0x00100010)
    ds.add_new(0x00091234, "LO", "")  # no private creator: still a private tag
    ds.add_new(0x00080002, "UL", 7)  # (0008,0002) is in no dictionary
    flat = flatten(ds)
    assert flat.row["OtherElements"] == [
        {"Tag": "Tag_00080002", "Data": ["7"]},
        {"Tag": "Tag_00091234", "Data": []},
        {"Tag": "Tag_00290010", "Data": ["ACME 1.0"]},
        {"Tag": "Tag_00291001", "Data": ["hello"]},
        {"Tag": "Tag_00291002", "Data": ["1", "2"]},
        {"Tag": "Tag_00291005", "Data": ["1.5", "2"]},
        {"Tag": "Tag_00291006", "Data": ["00100010"]},
    ]
    assert flat.row["Tag_00291004"] == [
        {"PatientID": "inner"},
        {"PatientName": {"Alphabetic": {"FamilyName": "A", "GivenName": "B"}}},
    ]
    fields = {f["name"]: f for f in flat.schema}
    assert (fields["Tag_00291004"]["type"], fields["Tag_00291004"]["mode"]) == ("RECORD", "REPEATED")
    assert fields["OtherElements"] == OTHER_ELEMENTS_FIELD
    assert list(flat.row)[-2:] == ["OtherElements", "DroppedTags"]
    assert dropped(flat) == {"Tag_00291003": {"excluded_vr"}}


def test_overlays_are_repeating_group_columns() -> None:
    ds = read(get_testdata_file("MR-SIEMENS-DICOM-WithOverlays.dcm"))
    groups = sorted({elem.tag >> 16 for elem in ds if 0x6000 <= elem.tag >> 16 <= 0x601E})
    assert groups
    flat = flatten(ds)
    ids = [f"{g:04X}" for g in groups]
    assert [e["Id"] for e in flat.row["OverlayRows"]] == ids
    assert flat.row["OverlayRows"][0]["Value"] == ds[groups[0] << 16 | 0x0010].value
    assert [e["Value"] for e in flat.row["OverlayOrigin"]] == [
        list(ds[g << 16 | 0x0050].value) for g in groups
    ]
    fields = {f["name"]: f for f in flat.schema}
    assert fields["OverlayRows"] == {
        "name": "OverlayRows",
        "type": "RECORD",
        "mode": "REPEATED",
        "fields": [
            {"name": "Id", "type": "STRING", "mode": "NULLABLE"},
            {"name": "Value", "type": "INTEGER", "mode": "NULLABLE"},
        ],
    }
    assert fields["OverlayOrigin"]["fields"][1] == {"name": "Value", "type": "INTEGER", "mode": "REPEATED"}
    assert dropped(flat)["OverlayData"] == {"excluded_vr"}


def test_excluded_vrs_and_the_exclude_vrs_parameter() -> None:
    ds = Dataset()
    ds.PatientID = "1"
    ds.PatientName = "A^B"
    ds.add_new("ICCProfile", "OB", b"\x00" * 4)
    ds.add_new("RedPaletteColorLookupTableData", "OW", b"\x00" * 4)
    ds.add_new("VectorGridData", "OF", b"\x00" * 4)
    ds.add_new("FilterLookupTableData", "OD", b"\x00" * 8)
    ds.add_new("LongPrimitivePointIndexList", "OL", b"\x00" * 4)
    ds.add_new("SelectorOVValue", "OV", b"\x00" * 8)
    ds.add_new("PixelData", "OW", b"\x00" * 8)  # left out silently, as stop_before_pixels would
    ds.add_new(0x00191010, "UN", b"\x00\x01")
    ds.ReferencedImageSequence = Sequence([item(ReferencedSOPInstanceUID="1.2")])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.FileMetaInformationVersion = b"\x00\x01"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    flat = flatten(ds)
    assert set(flat.row) == {"TransferSyntaxUID", "PatientName", "PatientID", "ReferencedImageSequence",
                             "DroppedTags"}  # fmt: skip
    assert dropped(flat) == {
        name: {"excluded_vr"}
        for name in ["FileMetaInformationVersion", "ICCProfile", "RedPaletteColorLookupTableData",
                     "VectorGridData", "FilterLookupTableData", "LongPrimitivePointIndexList",
                     "SelectorOVValue", "Tag_00191010"]
    }  # fmt: skip
    flat = flatten(ds, exclude_vrs=["PN", "SQ", "ui"])
    assert set(flat.row) == {"PatientID", "DroppedTags"}
    assert {"PatientName", "ReferencedImageSequence", "TransferSyntaxUID"} <= set(dropped(flat))


def test_a_value_over_a_million_bytes_is_too_large(tmp_path: Path) -> None:
    ds = Dataset()
    ds.StrainAdditionalInformation = "x" * MAX_VALUE_BYTES  # UT, exactly the limit: kept
    ds.TextValue = "y" * (MAX_VALUE_BYTES + 1)  # UT
    ds.ReferencedImageSequence = Sequence([item(DecompositionDescription="z" * (MAX_VALUE_BYTES + 2))])
    ds.PatientID = "1"
    flat = flatten(ds)
    assert len(flat.row["StrainAdditionalInformation"]) == MAX_VALUE_BYTES
    assert "TextValue" not in flat.row and "ReferencedImageSequence" not in flat.row
    assert dropped(flat) == {
        "TextValue": {"too_large"},
        "ReferencedImageSequence.DecompositionDescription": {"too_large"},
    }
    # the same from a file's raw bytes
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.file_meta.MediaStorageSOPClassUID = "1.2.3"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.save_as(tmp_path / "large.dcm", enforce_file_format=True)
    from_file = flatten(read(tmp_path / "large.dcm"))
    assert {k: v for k, v in dropped(from_file).items() if k != "FileMetaInformationVersion"} == dropped(flat)
    assert from_file.row["StrainAdditionalInformation"] == flat.row["StrainAdditionalInformation"]


def nested(levels: int) -> Dataset:
    """A data set with ``levels`` sequences nested, a PN at the bottom."""
    inner = item(PatientName="Deep^Down", PatientID="bottom")
    for _ in range(levels):
        inner = item(ReferencedImageSequence=Sequence([inner]))
    return inner


def test_deep_nesting_is_bounded() -> None:
    flat = flatten(nested(MAX_SEQUENCE_DEPTH))
    assert nesting_depth(flat.schema) == MAX_SEQUENCE_DEPTH + 2 == 15  # the PN's two levels
    assert "DroppedTags" not in flat.row
    flat = flatten(nested(MAX_SEQUENCE_DEPTH + 3))
    assert nesting_depth(flat.schema) <= 15
    path = ".".join(["ReferencedImageSequence"] * (MAX_SEQUENCE_DEPTH + 1))
    assert dropped(flat) == {path: {"too_deep"}}
    assert column_count(flat.schema) > 0


def test_odd_values_never_raise() -> None:
    ds = Dataset()
    ds.add_new("Rows", "US", 70000)  # out of range for US (as from DICOM JSON)
    ds.add_new("Columns", "US", "12")  # a string where a number belongs
    ds.add_new("StudyDate", "DA", 20010101)  # a number where a string belongs
    ds.add_new("StudyTime", "TM", 1.5)
    ds.add_new("ReferencedImageSequence", "LO", "not a sequence")
    ds.add_new("PatientID", "SQ", Sequence([item(PatientID="x")]))
    flat = flatten(ds)
    assert flat.row["Columns"] == 12  # an IS-like string in an INTEGER column is parsed
    assert flat.row["StudyDate"] == datetime.date(2001, 1, 1)  # and a number as a DA string
    assert dropped(flat) == {
        name: {"invalid_value"} for name in ["Rows", "StudyTime", "ReferencedImageSequence", "PatientID"]
    }


def test_restrict_without_dropped_tags_warns_on_dicom_stream(caplog: pytest.LogCaptureFixture) -> None:
    ds = Dataset()
    ds.PatientID = "1"
    ds.StudyDate = "20010101"
    ds.add_new("ICCProfile", "OB", b"\x00\x01")
    flat = flatten(ds)
    schema = [{"name": "PatientID", "type": "STRING", "mode": "NULLABLE"}]
    with caplog.at_level(logging.WARNING, logger="dicom_stream"):
        cut, unrecorded = restrict(flat, schema)
    assert unrecorded == 2  # StudyDate (column_limit) and ICCProfile (excluded_vr): nowhere to list them
    assert cut.row == {"PatientID": "1"} and cut.schema == schema
    warned = [r for r in caplog.records if r.name == "dicom_stream" and r.levelno == logging.WARNING]
    assert len(warned) == 2
    assert any("StudyDate" in r.getMessage() and "column_limit" in r.getMessage() for r in warned)
    # with DroppedTags in the table, both are recorded in the row and nothing is logged
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dicom_stream"):
        cut, unrecorded = restrict(flat, [*schema, DROPPED_TAGS_FIELD])
    assert unrecorded == 0 and not caplog.records
    assert cut.row["DroppedTags"] == [
        {"TagName": "ICCProfile", "Reason": "excluded_vr"},
        {"TagName": "StudyDate", "Reason": "column_limit"},
    ]


def test_corrupted_files_never_raise_and_load_into_arrow() -> None:
    """Random bytes changed in the headers of a few files: whatever pydicom still reads flattens
    without an exception, into a row that its own schema holds."""
    rng = random.Random(20240229)
    names = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "rtplan.dcm", "test-SR.dcm"]
    blobs = [Path(get_testdata_file(name)).read_bytes() for name in names]
    flattened = invalid = 0
    for _ in range(400):
        data = bytearray(rng.choice(blobs))
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(132, min(len(data), 3000))] = rng.randrange(256)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(io.BytesIO(bytes(data)), stop_before_pixels=True)
        except Exception:
            continue
        flat = flatten(ds)
        pa.Table.from_pylist([flat.row], schema=to_arrow(flat.schema))
        flattened += 1
        invalid += any(d["Reason"] == "invalid_value" for d in flat.row.get("DroppedTags", []))
    assert flattened > 250 and invalid > 20


# --- a run's columns --------------------------------------------------------------------------


def test_a_runs_columns_are_in_tag_order_whatever_order_its_rows_came_in() -> None:
    """Workers meet rows in any order: merged in any order, the columns (and each sequence's) come
    out the same; one instance's top-level columns as its row has them (schemas.rows.with_event). A
    sequence's fields are in tag order, where one instance has them in the order its items give them."""
    names = ("CT_small.dcm", "rtplan.dcm", "MR_small.dcm", "SC_rgb_jpeg_dcmtk.dcm", "image_dfl.dcm")
    schemas = [
        merge(EVENT_FIELDS, flatten(pydicom.dcmread(get_testdata_file(name))).schema) for name in names
    ]
    for schema in schemas:
        assert [f["name"] for f in in_tag_order(schema)] == [f["name"] for f in schema]
    orders = [schemas, schemas[::-1], random.Random(5).sample(schemas, len(schemas))]
    runs = []
    for order in orders:
        merged: list[dict] = []
        for schema in order:
            merged = merge(merged, schema)
        runs.append(in_tag_order(merged))
    assert runs[0] == runs[1] == runs[2]
    rtplan = next(f for f in runs[0] if f["name"] == "BeamSequence")
    assert [f["name"] for f in rtplan["fields"]] == sorted(
        (f["name"] for f in rtplan["fields"]),
        key=lambda name: (name == "OtherElements", tag_for_keyword(name) or 0),
    )
