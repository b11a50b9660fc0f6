"""Apply a de-identification profile to a data set, recursively into sequences: pure, no I/O.

Profiles (the Cloud Healthcare API's `dicom.filterProfile`):
- ATTRIBUTE_CONFIDENTIALITY_BASIC_PROFILE: PS3.15 Table E.1-1's Basic Profile column (table.py).
  A combined code is resolved to the action that keeps the attribute valid for the strictest Type it can
  have (the standard leaves the choice to the IOD's Type): X/Z -> Z, X/D, Z/D and X/Z/D -> D,
  X/Z/U* -> U for a UID, recursion into a sequence (its UIDs replaced), Z otherwise. D on a date
  (DA, DT) is the patient's keyed date shift; on a sequence it recurses into the items.
  Attributes the table does not list are kept.
- MINIMAL_KEEP_LIST_PROFILE: only the attributes a valid image needs (MINIMAL_KEEP); the Type 2
  patient and study attributes stay, empty (MINIMAL_EMPTY); everything else is removed.
- KEEP_ALL_PROFILE: every attribute kept, private ones too; only UIDs are replaced.
- DEIDENTIFY_TAG_CONTENTS: every attribute kept; text values (AE LO LT PN SH ST UC UT) are searched
  for sensitive text (text.py) and each finding replaced by `[INFO_TYPE]`; dates shifted; ages over 89
  set to 090Y.
In every profile: UIDs that the table marks U are replaced (uids.py) unless `skipIdRedaction`; private
attributes are removed unless kept (KEEP_ALL keeps them); keepList attributes are kept as they are and
removeList attributes removed, whatever the profile says; group lengths are dropped (they would be
stale). Then PatientIdentityRemoved, DeidentificationMethod and its code sequence (CID 7050) are set.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from dicomlib.deidentify import pixels, text
from dicomlib.deidentify.config import DeidConfig
from dicomlib.deidentify.dates import shift_da, shift_days, shift_dt
from dicomlib.deidentify.table import basic_action
from dicomlib.deidentify.text import words
from dicomlib.deidentify.uids import map_uid

BASIC, MINIMAL, KEEP_ALL, TAG_CONTENTS = (
    "ATTRIBUTE_CONFIDENTIALITY_BASIC_PROFILE",
    "MINIMAL_KEEP_LIST_PROFILE",
    "KEEP_ALL_PROFILE",
    "DEIDENTIFY_TAG_CONTENTS",
)
# The Provenance's deidentify-action values (seed 004)
DELETED, RESET, REMOVED, REGENERATED_UID, CLEANED, RECURSED = (
    "DELETED",
    "RESET",
    "REMOVED",
    "REGENERATED UID",
    "CLEANED",
    "RECURSED",
)
TEXT_VRS = frozenset({"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
DUMMY: dict[str, Any] = {
    "AE": "ANONYMOUS",
    "AS": "000Y",
    "CS": "ANONYMOUS",
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "IS": "0",
    "LO": "ANONYMOUS",
    "LT": "ANONYMOUS",
    "PN": "ANONYMOUS",
    "SH": "ANONYMOUS",
    "ST": "ANONYMOUS",
    "TM": "000000",
    "UC": "ANONYMOUS",
    "UT": "ANONYMOUS",
    "UR": "",
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "UL": 0,
    "US": 0,
    "SV": 0,
    "UV": 0,
}
MINIMAL_KEEP = words(
    """
    SpecificCharacterSet ImageType SOPClassUID SOPInstanceUID StudyInstanceUID SeriesInstanceUID
    FrameOfReferenceUID Modality SeriesNumber InstanceNumber AcquisitionNumber PatientOrientation
    ImagePositionPatient ImageOrientationPatient PixelSpacing SliceThickness SliceLocation
    SpacingBetweenSlices SamplesPerPixel PhotometricInterpretation PlanarConfiguration NumberOfFrames
    FrameIncrementPointer Rows Columns BitsAllocated BitsStored HighBit PixelRepresentation
    SmallestImagePixelValue LargestImagePixelValue WindowCenter WindowWidth RescaleIntercept
    RescaleSlope RescaleType LossyImageCompression LossyImageCompressionRatio
    LossyImageCompressionMethod PixelData FloatPixelData DoubleFloatPixelData
    RedPaletteColorLookupTableDescriptor GreenPaletteColorLookupTableDescriptor
    BluePaletteColorLookupTableDescriptor RedPaletteColorLookupTableData
    GreenPaletteColorLookupTableData BluePaletteColorLookupTableData PixelAspectRatio
    """
)
MINIMAL_EMPTY = words(
    """
    PatientName PatientID PatientBirthDate PatientSex StudyDate StudyTime ReferringPhysicianName
    StudyID AccessionNumber
    """
)
METHOD_CODES = {
    BASIC: [("113100", "Basic Application Confidentiality Profile")],
    MINIMAL: [("113100", "Basic Application Confidentiality Profile")],
    TAG_CONTENTS: [
        ("113100", "Basic Application Confidentiality Profile"),
        ("113105", "Clean Descriptors Option"),
    ],
    KEEP_ALL: [],
}
DATE_SHIFT_CODE = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
CLEAN_PIXELS_CODE = ("113101", "Clean Pixel Data Option")
CLEAN_DESCRIPTORS_CODE = ("113105", "Clean Descriptors Option")
# REDACT_SENSITIVE_TEXT_CLEAN_DESCRIPTORS also cleans these descriptors (free text the Clean
# Descriptors Option of PS3.15 E.3.5 names, Table E.1-1's "Clean Desc." column) with the text
# detector, wherever the profile kept them.
DESCRIPTORS = words(
    """
    StudyDescription SeriesDescription ImageComments AcquisitionComments AdditionalPatientHistory
    AdmittingDiagnosesDescription DerivationDescription ProtocolName PerformedProcedureStepDescription
    RequestedProcedureDescription ScheduledProcedureStepDescription RequestedProcedureComments
    ImagingServiceRequestComments PatientComments StudyComments VisitComments ReasonForStudy
    ReasonForTheRequestedProcedure ContrastBolusAgent InterpretationText Occupation
    MedicalAlerts Allergies CommentsOnThePerformedProcedureStep FrameComments IdentifyingComments
    ServiceEpisodeDescription DischargeDiagnosisDescription PatientState SpecialNeeds
    """
)


@dataclass
class TagRecord:
    """What was done to one attribute: the Provenance's dicom-tags entry."""

    tag_id: str  # eight hex digits; inside a sequence, the sequence's tags first, joined by "/"
    action: str
    reason: str
    findings: list[text.Finding] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)


@dataclass
class Result:
    """The de-identified data set, what was done to each attribute, and counts per action."""

    dataset: Dataset
    records: list[TagRecord]
    actions: Counter[str]
    images: list[pixels.ImageFinding] = field(default_factory=list)  # burnt-in text redacted

    @property
    def findings(self) -> int:
        return sum(len(record.findings) for record in self.records)


class _Run:
    """One data set's de-identification: the key, the patient's terms and date shift, the records."""

    def __init__(self, ds: Dataset, config: DeidConfig, key: bytes) -> None:
        self.config = config
        self.key = key
        self.terms = text.own_terms(ds)
        # descriptors are cleaned of the patient's terms and, in CLEAN_DESCRIPTORS, of removed values
        self.descriptor_terms = self.terms
        if config.text_redaction_mode == pixels.CLEAN_DESCRIPTORS:
            self.descriptor_terms = self.terms + text.context_terms(_removed_values(ds), self.terms)
        patient = str(ds.get("PatientID", "") or ds.get("PatientName", "") or ds.get("StudyInstanceUID", ""))
        self.days = shift_days(patient, key)
        self.shifted = False
        self.records: list[TagRecord] = []
        self.actions: Counter[str] = Counter()

    def record(self, path: str, action: str, reason: str, **extra: Any) -> None:
        self.records.append(TagRecord(path, action, reason, **extra))
        self.actions[action] += 1

    def walk(self, ds: Dataset, prefix: str = "") -> None:
        for tag in list(ds.keys()):
            self.element(ds, tag, f"{prefix}{int(tag):08X}")

    def element(self, ds: Dataset, tag: BaseTag, path: str) -> None:
        config = self.config
        if tag in config.remove_tags:
            del ds[tag]
            self.record(path, DELETED, f"Matched ID: {int(tag):08X} (removeList)")
            return
        if tag in config.keep_tags:
            return
        if tag.element == 0:
            del ds[tag]  # a group length would be stale
            return
        if tag.is_private:
            if config.profile != KEEP_ALL:
                del ds[tag]
                self.record(path, DELETED, "Matched expression: private attribute")
            return
        action = self.action(tag, _vr(ds, tag))
        if action != "K":  # a kept value is never converted from its bytes: most of them are kept
            self.apply(ds, tag, ds[tag], action, path)

    def action(self, tag: BaseTag, vr: str) -> str:
        """The single action code for this attribute, of this VR, under the profile."""
        profile = self.config.profile
        table = basic_action(int(tag))
        if table is not None and "U" in table and vr == "UI":
            return "K" if self.config.skip_id_redaction else "U"
        if profile == BASIC:
            return _resolve(table, vr) if table else ("R" if vr == "SQ" else "K")
        if profile == MINIMAL:
            keyword = keyword_for_tag(tag)
            if keyword in MINIMAL_KEEP:
                return "K"
            return "Z" if keyword in MINIMAL_EMPTY else "X"
        if profile == KEEP_ALL:
            return "R" if vr == "SQ" else "K"
        # DEIDENTIFY_TAG_CONTENTS
        if vr == "SQ":
            return "R"
        if vr in TEXT_VRS or vr in ("DA", "DT", "AS"):
            return "C"
        return "K"

    def apply(self, ds: Dataset, tag: BaseTag, element: DataElement, action: str, path: str) -> None:
        vr = element.VR
        if action == "K":
            return
        if action == "X":
            del ds[tag]
            self.record(path, DELETED, f"Matched ID: {int(tag):08X}")
        elif action == "Z":
            element.value = Sequence() if vr == "SQ" else None
            self.record(path, RESET, f"Matched ID: {int(tag):08X}")
        elif action == "R" or (action == "D" and vr == "SQ"):
            for item in element.value or []:
                self.walk(item, f"{path}/")
            self.actions[RECURSED] += 1
        elif action == "U":
            element.value = _each(element.value, lambda uid: map_uid(uid, self.key))
            self.record(path, REGENERATED_UID, f"Matched ID: {int(tag):08X}")
        elif action == "D":
            element.value = self.dummy(element)
            self.record(path, REMOVED, f"Matched ID: {int(tag):08X}")
        elif action == "C":
            self.clean(element, path)

    def dummy(self, element: DataElement) -> Any:
        vr = element.VR
        if vr in ("DA", "DT") and element.value not in (None, ""):
            return self.shift(element)
        if vr == "UI":
            return _each(element.value, lambda uid: map_uid(uid, self.key))
        if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
            return b""
        return DUMMY.get(vr, "")

    def shift(self, element: DataElement) -> Any:
        """The date shift, value by value; a value that is not a valid date is removed."""
        self.shifted = True
        shift = shift_da if element.VR == "DA" else shift_dt

        def one(value: str) -> str:
            return shift(str(value), self.days) or ""

        return _each(element.value, one)

    def clean(self, element: DataElement, path: str) -> None:
        """DEIDENTIFY_TAG_CONTENTS (and C codes): replace findings in a text value; shift dates."""
        vr = element.VR
        if element.value in (None, ""):
            return
        if vr in ("DA", "DT"):
            original = str(element.value)
            element.value = self.shift(element)
            finding = text.Finding(0, len(original.encode()), text.DATE, original, 1.0)
            self.record(path, CLEANED, f"Matched VR: {vr}", findings=[finding], replaced=[str(element.value)])
            return
        if vr == "AS":
            age = str(element.value)
            if age[:3].isdigit() and age.endswith("Y") and int(age[:3]) > 89:
                element.value = "090Y"
                finding = text.Finding(0, len(age), text.AGE, age, 1.0)
                self.record(path, CLEANED, "Matched VR: AS", findings=[finding], replaced=["090Y"])
            return
        values = element.value if isinstance(element.value, MultiValue) else [element.value]
        findings: list[text.Finding] = []
        cleaned = []
        for value in values:
            value_text = str(value)
            if vr == "PN":
                found = [text.Finding(0, len(value_text.encode()), text.PERSON_NAME, value_text, 1.0)]
            else:
                terms = self.descriptor_terms if element.keyword in DESCRIPTORS else self.terms
                found = text.find(value_text, terms)
            findings += found
            cleaned.append(text.redact(value_text, found) if found else value_text)
        if findings:
            element.value = cleaned if len(cleaned) > 1 else cleaned[0]
            self.record(path, CLEANED, f"Matched VR: {vr}", findings=findings, replaced=cleaned)


def _vr(ds: Dataset, tag: BaseTag) -> str:
    """The element's VR as its conversion would give it, without converting a value when the file
    says it: an implicit VR (None) or UN (which pydicom replaces with the dictionary's) converts."""
    raw = ds.get_item(tag)
    vr = raw.VR if raw is not None else None
    return vr if vr and vr != "UN" else ds[tag].VR


def _removed_values(ds: Dataset) -> Iterator[str]:
    """The text values of the top-level attributes whose Basic Profile action removes or replaces them
    (D, Z, X, U and their combinations), descriptors aside: the contextual phrases of the Clean
    Descriptors Option."""
    for element in ds:
        action = basic_action(int(element.tag))
        if action in (None, "K", "C") or element.keyword in DESCRIPTORS:
            continue
        if element.VR not in TEXT_VRS or element.value in (None, ""):
            continue
        yield from (str(value) for value in (element.value if element.VM > 1 else [element.value]))


def _resolve(code: str, vr: str) -> str:
    """One action from a combined code: the one that keeps the strictest Type valid."""
    if code == "X/Z/U*":  # a reference sequence: its UIDs replaced, so it stays valid and consistent
        return "U" if vr == "UI" else "R" if vr == "SQ" else "Z"
    if code in ("X/D", "Z/D", "X/Z/D"):
        return "D"
    if code == "X/Z":
        return "Z"
    return code


def _each(value: Any, change: Any) -> Any:
    if isinstance(value, MultiValue | list):
        return [change(v) for v in value]
    return None if value is None else change(value)


def deidentify(ds: Dataset, config: DeidConfig, key: bytes, in_place: bool = False) -> Result:
    """De-identify a copy of `ds` (the caller's data set is left as it was); with `in_place`, `ds`
    itself, saving the copy (a third of the time of a tag-only de-identification) when the caller
    read it only to de-identify it. The result's data set may be a new one all the same when burnt-in
    text was redacted in a compressed syntax (pixels.py)."""
    if not key:
        raise ValueError("the de-identification key is empty")
    out = ds if in_place else copy.deepcopy(ds)
    run = _Run(ds, config, key)
    run.walk(out)
    profile = config.profile
    mode = config.text_redaction_mode
    if mode == pixels.CLEAN_DESCRIPTORS and profile != TAG_CONTENTS:  # that profile cleaned them already
        for keyword in sorted(DESCRIPTORS):
            element = out.data_element(keyword) if keyword in out else None
            if element is not None and element.VR in TEXT_VRS and element.tag not in config.keep_tags:
                run.clean(element, f"{int(element.tag):08X}")
    out, images = pixels.redact_pixels(out, mode, run.terms)
    out.PatientIdentityRemoved = "NO" if profile == KEEP_ALL else "YES"
    codes = list(METHOD_CODES[profile])
    if run.shifted:
        codes.append(DATE_SHIFT_CODE)
    if mode != pixels.REDACT_NO_TEXT and "PixelData" in out:
        codes.append(CLEAN_PIXELS_CODE)
    if mode == pixels.CLEAN_DESCRIPTORS and CLEAN_DESCRIPTORS_CODE not in codes:
        codes.append(CLEAN_DESCRIPTORS_CODE)
    out.DeidentificationMethod = f"dicom-etl {profile}"[:64]
    items = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)
    out.DeidentificationMethodCodeSequence = Sequence(items)
    meta = getattr(out, "file_meta", None)
    if meta is not None:
        if "SOPInstanceUID" in out:
            meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        for keyword in (
            "SourceApplicationEntityTitle",
            "SendingApplicationEntityTitle",
            "ReceivingApplicationEntityTitle",
        ):
            if keyword in meta:
                del meta[keyword]
    return Result(out, run.records, run.actions, images)
