"""Filter files: which studies, series and instances an export (or a delete) covers.

Each line is `/studies/STUDY[/series/SERIES[/instances/SOP]]`; blank lines and surrounding
whitespace are ignored; any other line makes the whole file malformed. Lines may overlap (a study
and one of its series): the selection is merged so that every instance is covered once, and the
store is only listed under what the lines name.

A file is read one way, by `filter_targets`, both when the launcher checks it and when the pipeline
selects: lines end in `\\n` or `\\r\\n` (what editors and spreadsheets write), the file is UTF-8 and may
start with a byte-order mark, and its first line may be a CSV header (a column name, as a BigQuery or
DuckDB CSV export writes one). A line that holds any other line break (a lone `\\r`, `\\v`, `\\f`, U+0085,
U+2028, ...) is malformed, so that the file means the same to every reader.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from dicomlib.uids import InstanceRef, dicomweb_path, valid_uid

LINE = re.compile(r"/studies/([^/]*)(?:/series/([^/]*)(?:/instances/([^/]*))?)?")
# What str.splitlines() breaks lines at, besides "\n" (and the "\r" of "\r\n", removed first).
OTHER_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
# A CSV header of one column: a column name, quoted or not. It cannot name a UID (those are digits).
HEADER = re.compile(r'"?[A-Za-z_][A-Za-z0-9_]*"?')


class FilterError(ValueError):
    """A malformed line; the message is `filter file line N: why`."""

    def __init__(self, number: int, reason: str) -> None:
        super().__init__(f"filter file line {number}: {reason}")


@dataclass(frozen=True)
class Target:
    """One thing a filter names: a study (series and sop None), a series, or an instance."""

    study: str
    series: str | None = None
    sop: str | None = None

    def covers(self, ref: InstanceRef) -> bool:
        return ref.study == self.study and self.series in (None, ref.series) and self.sop in (None, ref.sop)

    def path(self) -> str:
        """The target as its filter line."""
        return dicomweb_path(self.study, self.series, self.sop)


def parse_line(text: str, number: int = 1) -> Target:
    """One filter line (also the form of delete_dicom's `--target`)."""
    match = LINE.fullmatch(text.strip())
    if not match:
        shown = text.strip()[:120]
        raise FilterError(number, f"{shown!r} is not /studies/UID[/series/UID[/instances/UID]]")
    uids = [uid for uid in match.groups() if uid is not None]
    for uid in uids:
        if not valid_uid(uid):
            raise FilterError(number, f"{uid[:80]!r} is not a UID (1-64 digits and dots)")
    return Target(*uids)


def filter_targets(data: bytes) -> Iterator[Target]:
    """The Target of each line of a filter file's bytes, in the file's order; FilterError at the
    first malformed line. Lazy, so that a file of millions of lines is never held as lines."""
    first = True
    for number, raw in enumerate(io.BytesIO(data), start=1):
        try:
            text = raw.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError:
            raise FilterError(number, "is not UTF-8 text") from None
        if number == 1:
            text = text.removeprefix("\ufeff")
        odd = OTHER_BREAKS.search(text)
        if odd:
            raise FilterError(
                number, f"holds the line break U+{ord(odd[0]):04X}; end lines with \\n or \\r\\n"
            )
        if not text.strip():
            continue
        if first and HEADER.fullmatch(text.strip()):
            first = False
            continue
        first = False
        yield parse_line(text, number)


def merge(targets: Iterable[Target]) -> list[Target]:
    """Drop duplicates and targets inside a wider one, so each instance is selected once."""
    unique = list(dict.fromkeys(targets))
    studies = {t.study for t in unique if t.series is None}
    series = {(t.study, t.series) for t in unique if t.series is not None and t.sop is None}
    return [
        t
        for t in unique
        if t.series is None
        or (t.study not in studies and (t.sop is None or (t.study, t.series) not in series))
    ]
