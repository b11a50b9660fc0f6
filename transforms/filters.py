"""Filter files: which studies, series and instances an export (or a delete) covers.

Each line is `/studies/STUDY[/series/SERIES[/instances/SOP]]`; blank lines and surrounding
whitespace are ignored; any other line makes the whole file malformed. Lines may overlap (a study
and one of its series): the selection is merged so that every instance is covered once, and the
store is only listed under what the lines name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from transforms.dicom_header import valid_uid
from transforms.objects import read_bytes
from transforms.store import InstanceRef

LINE = re.compile(r"/studies/([^/]*)(?:/series/([^/]*)(?:/instances/([^/]*))?)?")


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


def parse_filter(text: str) -> list[Target]:
    """The merged targets of a filter file's text: none inside another, in the file's order."""
    return merge(
        parse_line(line, number) for number, line in enumerate(text.splitlines(), start=1) if line.strip()
    )


def read_filter(uri: str) -> list[Target]:
    """Read and parse a local or gs:// filter file."""
    return parse_filter(read_bytes(uri).decode("utf-8-sig", errors="replace"))


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
