"""UIDs and the study/series/instance references built from them, with their one path form."""

from __future__ import annotations

import re
from typing import NamedTuple

UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


def valid_uid(value: str) -> bool:
    """1 to 64 digits and dots, no empty component: safe as a path segment ('..' is not)."""
    return len(value) <= 64 and UID_RE.fullmatch(value) is not None


class InstanceRef(NamedTuple):
    study: str
    series: str
    sop: str

    def path(self) -> str:
        """The DICOMweb path of the instance, also the form of a filter-file line."""
        return dicomweb_path(self.study, self.series, self.sop)


def dicomweb_path(study: str, series: str | None = None, sop: str | None = None) -> str:
    """`/studies/{study}[/series/{series}[/instances/{sop}]]`: a DICOMweb resource and a filter line."""
    path = f"/studies/{study}"
    if series is not None:
        path += f"/series/{series}"
        if sop is not None:
            path += f"/instances/{sop}"
    return path
