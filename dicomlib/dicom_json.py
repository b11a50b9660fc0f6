"""DICOM JSON (PS3.18 F.2) as QIDO-RS and STOW-RS answer it: attribute values and instance references."""

from __future__ import annotations

from typing import Any

from dicomlib.uids import InstanceRef


def first_value(item: dict[str, Any], tag: str) -> Any:
    """The first value of a DICOM JSON attribute, None if it has none."""
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def instance_ref(
    item: dict[str, Any], study: str | None = None, series: str | None = None
) -> InstanceRef | None:
    study = first_value(item, "0020000D") or study
    series = first_value(item, "0020000E") or series
    sop = first_value(item, "00080018")
    return InstanceRef(study, series, sop) if study and series and sop else None
