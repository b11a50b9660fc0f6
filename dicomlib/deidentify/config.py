"""The DICOM parts of the Cloud Healthcare API's DeidentifyConfig, parsed and checked before any work.

Accepted (every other field or value is a ConfigError naming it, so a typo never silently weakens a
de-identification):

    {"dicom": {"filterProfile": ..., "keepList": {"tags": [...]}, "removeList": {"tags": [...]},
               "skipIdRedaction": false},
     "image": {"textRedactionMode": ...},
     "operationMetadata": {"fhirOutput": {"fhirStore": "projects/.../fhirStores/S"}}}

Tags are given as keywords (`PatientID`) or as eight hex digits (`00100020`), as in the API.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import tag_for_keyword

PROFILES = (
    "ATTRIBUTE_CONFIDENTIALITY_BASIC_PROFILE",
    "MINIMAL_KEEP_LIST_PROFILE",
    "KEEP_ALL_PROFILE",
    "DEIDENTIFY_TAG_CONTENTS",
)
DEFAULT_PROFILE = "ATTRIBUTE_CONFIDENTIALITY_BASIC_PROFILE"
TEXT_REDACTION_MODES = (
    "REDACT_NO_TEXT",
    "REDACT_ALL_TEXT",
    "REDACT_SENSITIVE_TEXT",
    "REDACT_SENSITIVE_TEXT_CLEAN_DESCRIPTORS",
)
# Burnt-in text is read with OCR (pixels.py): every mode is supported.
SUPPORTED_TEXT_REDACTION_MODES = TEXT_REDACTION_MODES
FHIR_STORE = re.compile(r"projects/[^/]+/locations/[^/]+/datasets/[^/]+/fhirStores/[^/]+")
HEX_TAG = re.compile(r"[0-9A-Fa-f]{8}")


class ConfigError(ValueError):
    """A field of the configuration that is unknown or holds a bad value."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class DeidConfig:
    """The checked configuration; `text` is what the Provenance records as the configuration used."""

    profile: str = DEFAULT_PROFILE
    keep_tags: frozenset[int] = frozenset()
    remove_tags: frozenset[int] = frozenset()
    skip_id_redaction: bool = False
    text_redaction_mode: str = "REDACT_NO_TEXT"
    fhir_store: str | None = None
    text: str = "{}"


def parse_config(text: str | None) -> DeidConfig:
    """Parse the JSON text of a configuration (None or empty: the defaults)."""
    if not text or not text.strip():
        return DeidConfig()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError("config", f"not JSON: {error.msg} at line {error.lineno}") from None
    return config_from_dict(raw, text)


def config_from_dict(raw: Any, text: str | None = None) -> DeidConfig:
    """Check every field of a parsed configuration."""
    top = _object(raw, "config", ("dicom", "image", "operationMetadata"))
    dicom = _object(
        top.get("dicom", {}), "dicom", ("filterProfile", "keepList", "removeList", "skipIdRedaction")
    )
    profile = _choice(dicom.get("filterProfile", DEFAULT_PROFILE), "dicom.filterProfile", PROFILES)
    keep = _tags(dicom.get("keepList"), "dicom.keepList")
    remove = _tags(dicom.get("removeList"), "dicom.removeList")
    both = keep & remove
    if both:
        raise ConfigError("dicom.removeList.tags", f"{min(both):08X} is in keepList too")
    skip = dicom.get("skipIdRedaction", False)
    if not isinstance(skip, bool):
        raise ConfigError("dicom.skipIdRedaction", "must be true or false")
    image = _object(top.get("image", {}), "image", ("textRedactionMode",))
    mode = _choice(
        image.get("textRedactionMode", "REDACT_NO_TEXT"), "image.textRedactionMode", TEXT_REDACTION_MODES
    )
    if mode not in SUPPORTED_TEXT_REDACTION_MODES:
        raise ConfigError("image.textRedactionMode", f"{mode} needs OCR of burnt-in text, not supported yet")
    if mode != "REDACT_NO_TEXT" and shutil.which("tesseract") is None:  # before any work, not per instance
        raise ConfigError(
            "image.textRedactionMode", f"{mode} needs the tesseract command (apt-get install tesseract-ocr)"
        )
    metadata = _object(top.get("operationMetadata", {}), "operationMetadata", ("fhirOutput",))
    fhir_output = _object(metadata.get("fhirOutput", {}), "operationMetadata.fhirOutput", ("fhirStore",))
    fhir_store = fhir_output.get("fhirStore")
    if fhir_store is not None and (not isinstance(fhir_store, str) or not FHIR_STORE.fullmatch(fhir_store)):
        raise ConfigError(
            "operationMetadata.fhirOutput.fhirStore",
            f"{fhir_store!r} is not projects/P/locations/L/datasets/D/fhirStores/S",
        )
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":")) if text is None else text.strip()
    return DeidConfig(profile, keep, remove, skip, mode, fhir_store, canonical)


def _object(value: Any, field: str, known: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(field, "must be a JSON object")
    for key in value:
        if key not in known:
            prefix = "" if field == "config" else f"{field}."
            raise ConfigError(f"{prefix}{key}", f"unknown field (known: {', '.join(known)})")
    return value


def _choice(value: Any, field: str, known: tuple[str, ...]) -> str:
    if value not in known:
        raise ConfigError(field, f"{value!r} is not one of {', '.join(known)}")
    return str(value)


def _tags(value: Any, field: str) -> frozenset[int]:
    if value is None:
        return frozenset()
    tags = _object(value, field, ("tags",)).get("tags", [])
    if not isinstance(tags, list):
        raise ConfigError(f"{field}.tags", "must be a list of keywords or 8-digit hex tags")
    return frozenset(_tag(item, f"{field}.tags") for item in tags)


def _tag(item: Any, field: str) -> int:
    """A keyword (`PatientID`) or a tag in hex (`00100020`)."""
    if isinstance(item, str):
        if HEX_TAG.fullmatch(item):
            return int(item, 16)
        tag = tag_for_keyword(item)
        if tag is not None:
            return int(tag)
    raise ConfigError(field, f"{item!r} is neither a DICOM keyword nor 8 hex digits")
