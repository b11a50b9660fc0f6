"""FHIR R4 Provenance resources of a de-identification, in the shape of the Cloud Healthcare API's
(seed 004): one for the operation, one per instance. Pure: building dicts, no I/O.

Note: the seed nests `extension` inside extensions that also carry a value (`tag-id`, `frame-index`);
that is kept as the seed has it, so that searches written for the Healthcare API's resources work here.
"""

from __future__ import annotations

import hashlib
from typing import Any

from dicomlib.deidentify.pixels import ImageFinding
from dicomlib.deidentify.profile import Result

OPERATION_SYSTEM = "https://g.co/healthcare/operation"


def provenance_id(*parts: str) -> str:
    """A stable resource id (FHIR: 1-64 of [A-Za-z0-9-.]), so that a re-run updates, not duplicates."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]


def operation_resource(
    resource_id: str, operation: str, source: str, destination: str, config: str, occurred: str, recorded: str
) -> dict[str, Any]:
    """The Provenance of the whole operation: its name, when, the source and destination stores and the
    configuration used (never the key)."""
    return {
        "resourceType": "Provenance",
        "id": resource_id,
        "target": [{"identifier": {"value": destination}}],
        "occurredDateTime": occurred,
        "recorded": recorded,
        "agent": [{"who": {"identifier": {"system": OPERATION_SYSTEM, "value": operation}}}],
        "entity": [
            {
                "role": "source",
                "what": {"identifier": {"value": source}},
                "extension": [{"url": "https://g.co/deidentify-config", "valueString": config}],
            }
        ],
    }


def instance_resource(
    operation_id: str, source: str, target: str, recorded: str, result: Result, size: int
) -> dict[str, Any]:
    """The Provenance of one instance: where it came from and went, its image size, the burnt-in text
    boxes redacted in each frame (dicom-images) and what was done to each attribute (dicom-tags)."""
    ds = result.dataset
    extensions: list[dict[str, Any]] = []
    if "Columns" in ds and "Rows" in ds:
        extensions += [
            {"url": "https://g.co/WIDTH", "valueDecimal": int(ds.Columns)},
            {"url": "https://g.co/HEIGHT", "valueDecimal": int(ds.Rows)},
        ]
    extensions.append({"url": "https://g.co/DICOM_STRUCTURED_SIZE", "valueDecimal": size})
    if result.images:
        extensions.append({"url": "https://g.co/dicom-images", "extension": _image_extensions(result.images)})
    tags = [_tag_extension(record) for record in result.records]
    if tags:
        extensions.append({"url": "https://g.co/dicom-tags", "extension": tags})
    return {
        "resourceType": "Provenance",
        "id": provenance_id(operation_id, source),
        "target": [{"identifier": {"value": target}}],
        "recorded": recorded,
        "agent": [{"who": {"reference": f"Provenance/{operation_id}"}}],
        "entity": [{"role": "source", "what": {"identifier": {"value": source}}, "extension": extensions}],
    }


def _tag_extension(record: Any) -> dict[str, Any]:
    details: list[dict[str, Any]] = []
    for finding in record.findings:
        details += [
            {"url": "byte-start", "valueDecimal": finding.start},
            {"url": "byte-end", "valueDecimal": finding.end},
            {"url": "finding-infotype", "valueString": finding.info_type},
            {"url": "text-original", "valueString": finding.quote},
            {"url": "text-replaced", "valueString": finding.info_type},
        ]
    details += [
        {"url": "deidentify-action", "valueString": record.action},
        {"url": "deidentify-reason", "valueString": record.reason},
    ]
    return {"url": "tag-id", "valueString": record.tag_id, "extension": details}


def _image_extensions(images: list[ImageFinding]) -> list[dict[str, Any]]:
    """Per frame with redacted boxes: frame-index with, box after box, its edges in pixels, the edges
    relative to the frame's width (left, right) and height (top, bottom), quote, infoType and
    confidence, in the seed's flat form."""
    frames: dict[int, list[dict[str, Any]]] = {}
    for box in images:
        frames.setdefault(box.frame, []).extend(
            [
                {"url": "left", "valueDecimal": box.left},
                {"url": "right", "valueDecimal": box.right},
                {"url": "top", "valueDecimal": box.top},
                {"url": "bottom", "valueDecimal": box.bottom},
                {"url": "relative-left", "valueDecimal": round(box.left / box.width, 4)},
                {"url": "relative-right", "valueDecimal": round(box.right / box.width, 4)},
                {"url": "relative-top", "valueDecimal": round(box.top / box.height, 4)},
                {"url": "relative-bottom", "valueDecimal": round(box.bottom / box.height, 4)},
                {"url": "quote", "valueString": box.quote},
                {"url": "infoType", "valueString": box.info_type},
                {"url": "confidence", "valueDecimal": box.confidence},
            ]
        )
    return [
        {"url": "frame-index", "valueDecimal": frame, "extension": boxes}
        for frame, boxes in sorted(frames.items())
    ]
