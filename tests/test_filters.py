"""Filter files: the contract's grammar, and merging lines so that each instance is selected once."""

from __future__ import annotations

import contextlib
from pathlib import Path

import duckdb
import pydicom
import pytest

from dicomlib.filters import FilterError, Target, filter_targets, merge, parse_line
from dicomlib.uids import InstanceRef
from tests.command_line import ENTRIES, SAMPLE, Place


def parse_filter(data: bytes) -> list[Target]:
    """The merged targets of a filter file's bytes: none inside another, in the file's order."""
    return merge(filter_targets(data))


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, set[str]]]:
    """The sample imported into a store, and the Study Instance UIDs of its CT and of its MR."""
    place = Place(tmp_path_factory.mktemp("sample_store"))
    assert place.run("script", "import_dicom", f"--input={SAMPLE}/**.dcm", "--store=store").status == 0
    studies: dict[str, set[str]] = {"CT": set(), "MR": set()}
    for path in SAMPLE.rglob("*.dcm"):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        studies.setdefault(header.Modality, set()).add(header.StudyInstanceUID)
    return place.cwd / "store", studies


@pytest.mark.parametrize(
    ("line", "target"),
    [
        ("/studies/1.2.3", Target("1.2.3")),
        ("  /studies/1.2.3/series/4.5\t", Target("1.2.3", "4.5")),
        ("/studies/1.2.3/series/4.5/instances/6.7.8", Target("1.2.3", "4.5", "6.7.8")),
    ],
)
def test_a_line_names_a_study_a_series_or_an_instance(line: str, target: Target) -> None:
    assert parse_line(line) == target


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("studies/1.2.3", "is not /studies/UID"),
        ("/studies/1.2.3/", "is not /studies/UID"),
        ("/studies/1.2.3/instances/4.5", "is not /studies/UID"),
        ("/studies/1.2.3/series/4.5/instances/6.7/frames/1", "is not /studies/UID"),
        ("/Studies/1.2.3", "is not /studies/UID"),
        ("/studies//series/4.5", "is not a UID"),
        ("/studies/1.2.3/series/..", "is not a UID"),
        ("/studies/1.2.abc", "is not a UID"),
        ("/studies/" + "1." * 40 + "1", "is not a UID"),
        ("gs://bucket/studies/1.2.3", "is not /studies/UID"),
    ],
)
def test_any_other_line_is_malformed_and_named_by_its_number(line: str, words: str) -> None:
    with pytest.raises(FilterError, match=rf"^filter file line 3: .*{words}"):
        parse_filter(f"/studies/1.2\n\n{line}\n/studies/1.3\n".encode())


def test_blank_lines_and_surrounding_whitespace_are_ignored() -> None:
    assert parse_filter(b"\n  /studies/1.2  \n\r\n\t\n/studies/1.3\r\n") == [Target("1.2"), Target("1.3")]


def test_overlapping_lines_select_each_instance_once() -> None:
    text = """
    /studies/1.1/series/1.1.1/instances/1.1.1.1
    /studies/1.1
    /studies/1.2/series/1.2.1/instances/1.2.1.1
    /studies/1.2/series/1.2.1
    /studies/1.2/series/1.2.1
    /studies/1.3/series/1.3.1/instances/1.3.1.1
    /studies/1.3/series/1.3.2/instances/1.3.2.1
    """
    assert parse_filter(text.encode()) == [
        Target("1.1"),
        Target("1.2", "1.2.1"),
        Target("1.3", "1.3.1", "1.3.1.1"),
        Target("1.3", "1.3.2", "1.3.2.1"),
    ]


def test_a_target_covers_its_study_series_or_instance() -> None:
    ref = InstanceRef("1.2", "1.2.3", "1.2.3.4")
    assert Target("1.2").covers(ref) and Target("1.2", "1.2.3").covers(ref)
    assert Target("1.2", "1.2.3", "1.2.3.4").covers(ref)
    assert not Target("1.2", "1.2.9").covers(ref) and not Target("1.20").covers(ref)


# One reading of a filter file, by the launcher's check and by the pipeline alike


def test_a_byte_order_mark_and_crlf_line_ends_are_what_editors_write() -> None:
    text = "\ufeff/studies/1.2\r\n/studies/1.3/series/1.3.1\r\n\r\n"
    assert parse_filter(text.encode()) == [Target("1.2"), Target("1.3", "1.3.1")]


@pytest.mark.parametrize("header", ["line", "f0_", '"line"', "StudyInstanceUID", "  path  "])
def test_the_first_line_may_be_a_csv_header(header: str) -> None:
    """BigQuery and DuckDB CSV exports start with the column's name; a name cannot name a UID."""
    assert parse_filter(f"{header}\n/studies/1.2\n".encode()) == [Target("1.2")]
    assert parse_filter(f"\ufeff\n{header}\r\n/studies/1.2\r\n".encode()) == [Target("1.2")]


@pytest.mark.parametrize("line", ["line", "1.2.3", "studies/1.2.3", "('/studies/' || StudyInstanceUID)"])
def test_only_the_first_line_may_be_a_header_and_only_a_name(line: str) -> None:
    with pytest.raises(FilterError, match="^filter file line 2: "):
        parse_filter(f"/studies/1.2\n{line}\n".encode())
    if line != "line":
        with pytest.raises(FilterError, match="^filter file line 1: "):
            parse_filter(f"{line}\n/studies/1.2\n".encode())


@pytest.mark.parametrize("odd", ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"])
def test_any_other_line_break_makes_the_file_malformed(odd: str) -> None:
    """str.splitlines() breaks lines there and a text reader splitting on \\n does not: such a file
    would mean one thing to one reader and another to the next."""
    data = f"/studies/1.2\n/studies/1.3{odd}/studies/1.4\n".encode()
    with pytest.raises(FilterError, match=rf"^filter file line 2: holds the line break U\+{ord(odd):04X}"):
        parse_filter(data)


def test_a_file_that_is_not_utf8_is_malformed_at_its_line() -> None:
    with pytest.raises(FilterError, match="^filter file line 2: is not UTF-8 text"):
        parse_filter(b"/studies/1.2\n/studies/1.\xff3\n")


@pytest.mark.parametrize("entry", ENTRIES)
def test_the_pipeline_reads_the_file_as_the_launcher_checked_it(
    tmp_path: Path, sample_store: tuple[Path, dict[str, set[str]]], entry: str
) -> None:
    """An export with a filter file written by a spreadsheet (BOM, CRLF, a header) exports what it
    names; a file with another line break is refused by the launcher, before any work."""
    store, studies = sample_store
    place = Place(tmp_path)
    ct, mr = min(studies["CT"]), min(studies["MR"])
    (place.cwd / "filter.csv").write_bytes(f"\ufeffline\r\n/studies/{ct}\r\n/studies/{mr}\r\n".encode())
    result = place.run(entry, "export_dicom", f"--store={store}", "--output=out", "--filter_file=filter.csv")
    assert (result.status, result.err) == (0, [])
    assert {path.name for path in (place.cwd / "out").iterdir()} == {ct, mr}

    (place.cwd / "odd.txt").write_bytes(f"/studies/{ct}\u2028/studies/{mr}\n".encode())
    before = place.written()
    result = place.run(entry, "export_dicom", f"--store={store}", "--output=out2", "--filter_file=odd.txt")
    assert (result.status, result.stdout) == (2, "")
    assert result.err == [
        "error: --filter_file: filter file line 1: holds the line break U+2028; end lines with \\n or \\r\\n"
    ]
    assert place.written() == before


def test_a_filter_file_that_duckdb_writes_is_a_filter_file(
    tmp_path: Path, sample_store: tuple[Path, dict[str, set[str]]]
) -> None:
    """DuckDB's COPY ... TO 'x.csv' writes a header line: with the column named, it is accepted."""
    store, studies = sample_store
    place = Place(tmp_path)
    assert place.run("script", "export_metadata", f"--store={store}", "--destination=meta").status == 0
    view = (place.cwd / "meta" / "view.sql").read_text()
    query = f"SELECT DISTINCT '/studies/' || StudyInstanceUID AS line FROM ({view}) WHERE Modality = 'CT'"
    with contextlib.chdir(place.cwd / "meta"):
        duckdb.sql(f"COPY ({query}) TO '{place.cwd / 'ct.csv'}' (HEADER)")
    assert (place.cwd / "ct.csv").read_text().splitlines()[0] == "line"

    result = place.run("script", "export_dicom", f"--store={store}", "--output=out", "--filter_file=ct.csv")

    assert (result.status, result.err) == (0, [])
    assert {path.name for path in (place.cwd / "out").iterdir()} == studies["CT"]
