"""STOW-RS answers (PS3.18 10.5.3), in DICOM JSON or XML (PS3.19 Native DICOM Model): which SOP
Instance UIDs the server stored, and which it refused with what FailureReason."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from typing import Any, NamedTuple

from dicomlib.dicom_json import first_value

PROCESSING_FAILURE = 0x0110  # the Healthcare API's FailureReason for a UID it holds with other data
DUPLICATE_INSTANCE = 0x0111
FAILURE_REASONS = {
    PROCESSING_FAILURE: "processing failure",
    DUPLICATE_INSTANCE: "duplicate SOP instance",
    0x0122: "SOP class not supported",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}


class Failed(NamedTuple):
    """A FailedSOPSequence item: its FailureReason and the server's FailureDetail, if any."""

    code: int
    detail: str = ""

    def describe(self, status: int) -> str:
        meaning = FAILURE_REASONS.get(self.code, "unknown reason")
        detail = f": {self.detail}" if self.detail else ""
        return f"FailureReason {self.code:#06x} ({meaning}){detail}, HTTP {status}"


class StowAnswer(NamedTuple):
    """A STOW-RS response: the SOP Instance UIDs stored, and those that failed."""

    referenced: set[str]
    failed: dict[str, Failed]


def parse_stow_response(body: bytes) -> StowAnswer:
    """SOP Instance UIDs stored, and those failed with their FailureReason, from JSON or XML.

    Raises ValueError when the body is not a STOW-RS response: one holds a ReferencedSOPSequence or
    a FailedSOPSequence (an error body such as Google's `{"error": {...}}` holds neither).
    """
    text = body.strip()
    if not text:
        raise ValueError("empty STOW-RS response")
    if text.startswith(b"<"):
        items = _xml_sequences(ElementTree.fromstring(text))
    else:
        document = json.loads(text)
        document = document[0] if isinstance(document, list) and document else document
        if not isinstance(document, dict):
            raise ValueError("unexpected STOW-RS response")
        items = {
            tag: [
                (first_value(item, "00081155"), first_value(item, "00081197"), _failure_detail(item))
                for item in document[tag].get("Value") or []
            ]
            for tag in ("00081199", "00081198")
            if isinstance(document.get(tag), dict)
        }
    if not items:
        raise ValueError("neither ReferencedSOPSequence nor FailedSOPSequence in the answer")
    referenced = {sop for sop, _, _ in items.get("00081199", []) if sop}
    failed = {sop: Failed(int(code or 0), detail) for sop, code, detail in items.get("00081198", []) if sop}
    return StowAnswer(referenced, failed)


def stow_answer(body: bytes) -> StowAnswer | None:
    """The STOW-RS response in `body`, or None if the body is none (an error body)."""
    try:
        return parse_stow_response(body)
    except (ValueError, ElementTree.ParseError):
        return None


def _failure_detail(item: dict[str, Any]) -> str:
    """The Healthcare API's private FailureDetail (0009,xx97, creator GOOGLE) of a failed item."""
    for tag, attribute in item.items():
        if tag.upper().startswith("0009") and tag.endswith("97") and isinstance(attribute, dict):
            values = attribute.get("Value") or [""]
            return str(values[0])
    return ""


def _xml_sequences(root: ElementTree.Element) -> dict[str, list[tuple[Any, Any, str]]]:
    """ReferencedSOPSequence and FailedSOPSequence items of a PS3.19 Native DICOM Model."""

    def local(element: ElementTree.Element) -> str:
        return element.tag.rsplit("}", 1)[-1]

    def attribute(item: ElementTree.Element, wanted: Any) -> str | None:
        for child in item:
            if local(child) == "DicomAttribute" and wanted(child.get("tag", "").upper(), child):
                values = [v.text for v in child if local(v) == "Value"]
                return values[0] if values else None
        return None

    def detail(tag: str, child: ElementTree.Element) -> bool:
        return child.get("keyword") == "FailureDetail" or (tag.startswith("0009") and tag.endswith("97"))

    sequences: dict[str, list[tuple[Any, Any, str]]] = {}
    for child in root:
        tag = child.get("tag", "").upper()
        if local(child) == "DicomAttribute" and tag in ("00081199", "00081198"):
            sequences[tag] = [
                (
                    attribute(item, lambda t, _: t == "00081155"),
                    attribute(item, lambda t, _: t == "00081197"),
                    attribute(item, detail) or "",
                )
                for item in child
                if local(item) == "Item"
            ]
    return sequences
