"""dicomlib/deidentify: planted PHI (top level, nested sequences, private attributes, free text) gone from
every byte after each profile; UIDs consistent, deterministic and key-dependent; date shifts keep
intervals; every PS3.15 Table E.1-1 attribute handled as its code says (one test case per row); the
configuration's checks; the detector's recall on planted PHI."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian

from dicomlib.deidentify import ConfigError, deidentify, parse_config
from dicomlib.deidentify.profile import BASIC, KEEP_ALL, MINIMAL, TAG_CONTENTS
from dicomlib.deidentify.table import basic_action, rows
from dicomlib.deidentify.text import find, redact
from dicomlib.uids import valid_uid

KEY = b"test key: not a secret"
PHI = [
    "Jonathan",
    "Quixley",
    "PID7734921",
    "19580314",
    "1958-03-14",
    "617-555-0199",
    "jq@example.org",
    "Elsewhere General",
    "ACC99887766",
    "Welby",
]


def planted() -> Dataset:
    """A real CT (pydicom's corpus) with PHI planted everywhere it can hide in attributes."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "Quixley^Jonathan"
    ds.PatientID = "PID7734921"
    ds.PatientBirthDate = "19580314"
    ds.PatientTelephoneNumbers = "617-555-0199"
    ds.InstitutionName = "St. Elsewhere General Hospital"
    ds.ReferringPhysicianName = "Welby^Marcus"
    ds.AccessionNumber = "ACC99887766"
    ds.StudyDate = "20200105"
    ds.SeriesDate = "20200107"
    ds.StudyDescription = "Follow-up for Jonathan Quixley, DOB 1958-03-14"
    ds.ImageComments = "Call 617-555-0199 or mail jq@example.org; ref ACC99887766, Dr. Welby"
    request = Dataset()
    request.RequestedProcedureDescription = "CT for Quixley PID7734921"
    request.ScheduledProcedureStepID = "ACC99887766"
    inner = Dataset()
    inner.CodeMeaning = "seen at Elsewhere General on 1958-03-14"
    inner.CodeValue = "X1"
    inner.CodingSchemeDesignator = "99LOCAL"
    request.ReasonForRequestedProcedureCodeSequence = Sequence([inner])
    ds.RequestAttributesSequence = Sequence([request])
    other = Dataset()
    other.PatientID = "PID7734921"
    ds.OtherPatientIDsSequence = Sequence([other])
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "Quixley Jonathan PID7734921")
    block.add_new(0x02, "OB", b"Welby 617-555-0199 ")
    return ds


def as_bytes(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def config_for(profile: str) -> object:
    return parse_config(f'{{"dicom": {{"filterProfile": "{profile}"}}}}')


@pytest.mark.parametrize("profile", [BASIC, MINIMAL, TAG_CONTENTS])
def test_no_planted_phi_in_any_byte_after_each_profile(profile: str) -> None:
    source = planted()
    data = as_bytes(source)
    assert all(phi.encode() in data for phi in PHI)  # the plants are really there
    result = deidentify(source, parse_config(f'{{"dicom": {{"filterProfile": "{profile}"}}}}'), KEY)
    out = as_bytes(result.dataset)
    left = [phi for phi in PHI if phi.encode() in out or phi.upper().encode() in out]
    assert left == []
    again = dcmread(io.BytesIO(out))
    assert again.PatientIdentityRemoved == "YES"
    assert again.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert again.file_meta.MediaStorageSOPInstanceUID == again.SOPInstanceUID
    assert source.PatientName == "Quixley^Jonathan"  # the source is never changed


def read_back(ds: Dataset, encoding: str) -> Dataset:
    """`ds` as read from a file, its values still raw bytes: explicit VR, implicit VR (no VR in the file),
    or explicit with every text attribute's VR written as UN (a converter that lost the VRs)."""
    if encoding == "implicit":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    if encoding == "un":
        for element in ds.iterall():
            if element.VR in ("LO", "LT", "PN", "SH", "ST", "UT", "DA") and element.value:
                raw = (
                    element.value.encode() if isinstance(element.value, str) else str(element.value).encode()
                )
                element.VR, element.value = "UN", raw + b" " * (len(raw) % 2)
    return dcmread(io.BytesIO(as_bytes(ds)))


@pytest.mark.parametrize("encoding", ["explicit", "implicit", "un"])
@pytest.mark.parametrize("profile", [BASIC, MINIMAL, TAG_CONTENTS])
def test_no_planted_phi_in_any_byte_of_an_instance_read_from_a_file(profile: str, encoding: str) -> None:
    """As the pipeline reads them: values not yet converted, and a VR from the file, from the
    dictionary (implicit VR) or to be replaced by the dictionary's (UN)."""
    source = read_back(planted(), encoding)
    assert all(phi.encode() in as_bytes(source) for phi in PHI)
    out = as_bytes(deidentify(source, config_for(profile), KEY, in_place=True).dataset)
    assert [phi for phi in PHI if phi.encode() in out or phi.upper().encode() in out] == []


def test_keep_all_keeps_attributes_but_replaces_uids() -> None:
    source = planted()
    result = deidentify(source, parse_config('{"dicom": {"filterProfile": "KEEP_ALL_PROFILE"}}'), KEY)
    assert result.dataset.PatientName == "Quixley^Jonathan"
    assert result.dataset.PatientIdentityRemoved == "NO"
    assert result.dataset.StudyInstanceUID != source.StudyInstanceUID
    assert (0x0009, 0x1001) in result.dataset


def test_tag_contents_replaces_findings_with_their_info_types() -> None:
    result = deidentify(
        planted(), parse_config('{"dicom": {"filterProfile": "DEIDENTIFY_TAG_CONTENTS"}}'), KEY
    )
    ds = result.dataset
    assert ds.StudyDescription == "Follow-up for [PERSON_NAME], DOB [DATE]"
    assert "[PHONE_NUMBER]" in ds.ImageComments and "[EMAIL_ADDRESS]" in ds.ImageComments
    assert ds.PatientName == "[PERSON_NAME]"
    assert ds.Manufacturer == "GE MEDICAL SYSTEMS"  # no finding: unchanged
    records = {record.tag_id: record for record in result.records}
    assert records["00081030"].findings[0].quote == "Jonathan Quixley"
    assert "00400275/00321060" in records  # nested: the sequence's tag first


def test_uids_are_consistent_across_instances_and_references_deterministic_and_keyed() -> None:
    first, second = planted(), planted()
    second.SOPInstanceUID = "1.2.3.4.5.6.7.8"
    reference = Dataset()
    reference.ReferencedSOPClassUID = first.SOPClassUID
    reference.ReferencedSOPInstanceUID = first.SOPInstanceUID
    second.ReferencedImageSequence = Sequence([reference])
    config = parse_config(None)
    a, b = deidentify(first, config, KEY).dataset, deidentify(second, config, KEY).dataset
    assert a.StudyInstanceUID == b.StudyInstanceUID != first.StudyInstanceUID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    assert b.ReferencedImageSequence[0].ReferencedSOPClassUID == first.SOPClassUID  # a class is kept
    for uid in (a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID):
        assert uid.startswith("2.25.") and valid_uid(uid)
    assert deidentify(first, config, KEY).dataset.SOPInstanceUID == a.SOPInstanceUID
    assert deidentify(first, config, b"another key").dataset.SOPInstanceUID != a.SOPInstanceUID


def test_date_shift_is_per_patient_keeps_intervals_and_depends_on_the_key() -> None:
    config = parse_config('{"dicom": {"filterProfile": "DEIDENTIFY_TAG_CONTENTS"}}')
    ds = deidentify(planted(), config, KEY).dataset
    import datetime

    def day(text: str) -> datetime.date:
        return datetime.datetime.strptime(text, "%Y%m%d").date()

    assert ds.StudyDate != "20200105"
    assert (day(ds.SeriesDate) - day(ds.StudyDate)).days == 2
    assert (day(ds.StudyDate) - day(ds.PatientBirthDate)).days == (day("20200105") - day("19580314")).days
    other = deidentify(planted(), config, b"another key").dataset
    assert other.StudyDate != ds.StudyDate


def test_keep_list_and_remove_list_override_the_profile() -> None:
    config = parse_config(
        '{"dicom": {"keepList": {"tags": ["PatientSex", "00081030"]},'
        ' "removeList": {"tags": ["Manufacturer"]}}}'
    )
    source = planted()
    ds = deidentify(source, config, KEY).dataset
    assert ds.StudyDescription == source.StudyDescription  # X in the table, kept by keepList
    assert ds.PatientSex == source.PatientSex
    assert "Manufacturer" not in ds


def test_skip_id_redaction_keeps_uids() -> None:
    source = planted()
    ds = deidentify(source, parse_config('{"dicom": {"skipIdRedaction": true}}'), KEY).dataset
    assert ds.SOPInstanceUID == source.SOPInstanceUID


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"dicom": {"filterProfil": "KEEP_ALL_PROFILE"}}', "dicom.filterProfil"),
        ('{"dicom": {"filterProfile": "KEEP_SOME"}}', "dicom.filterProfile"),
        ('{"dicomm": {}}', "dicomm"),
        ('{"image": {"textRedactionMode": "REDACT_SOME"}}', "image.textRedactionMode"),
        ('{"dicom": {"keepList": {"tags": ["NotAKeyword"]}}}', "dicom.keepList.tags"),
        ('{"dicom": {"skipIdRedaction": "yes"}}', "dicom.skipIdRedaction"),
        (
            '{"operationMetadata": {"fhirOutput": {"fhirStore": "x"}}}',
            "operationMetadata.fhirOutput.fhirStore",
        ),
        ("{not json", "config"),
    ],
)
def test_config_errors_name_the_field(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert caught.value.field == field


def _value(vr: str) -> object:
    """A value of the VR that holds identifiable content."""
    samples: dict[str, object] = {
        "DA": "20200102",
        "DT": "20200102123000",
        "TM": "123000",
        "UI": "1.2.840.99999.1.2.3",
        "PN": "Quixley^Jonathan",
        "AS": "045Y",
        "AT": 0x00100010,
        "DS": "1.5",
        "IS": "12",
        "FL": 1.5,
        "FD": 1.5,
        "SL": 7,
        "SS": 7,
        "UL": 7,
        "US": 7,
        "SV": 7,
        "UV": 7,
        "OB": b"Jonathan",
        "OW": b"Jonathan",
        "OD": b"Jonathan",
        "OF": b"Jonathan",
        "OL": b"Jonathan",
        "OV": b"Jonathan",
        "UN": b"Jonathan",
    }
    return samples.get(vr, "QUIXLEY")


TABLE = rows()


@pytest.mark.parametrize("row", TABLE, ids=[f"{row.tag}-{row.action}" for row in TABLE])
def test_every_table_e1_1_attribute_is_handled_as_its_basic_profile_code(row: object) -> None:
    tag = int(row.tag.replace("x", "0"), 16)  # type: ignore[attr-defined]
    code = row.action  # type: ignore[attr-defined]
    assert basic_action(tag) == code
    try:
        vr = dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        vr = "LO"  # a tag newer than pydicom's dictionary: still handled by its tag
    ds = Dataset()
    if vr == "SQ":
        item = Dataset()
        item.PatientName = "Quixley^Jonathan"
        ds.add_new(tag, vr, Sequence([item]))
    else:
        ds.add_new(tag, vr, _value(vr))
    original = ds[tag].value
    out = deidentify(ds, parse_config(None), KEY).dataset
    resolved = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D"}.get(code, code)
    if code == "X/Z/U*":
        resolved = "U" if vr == "UI" else "D" if vr == "SQ" else "Z"  # D on a sequence: recursed
    if resolved == "X":
        assert tag not in out
        return
    assert tag in out
    value = out[tag].value
    if resolved == "Z":
        assert value in (None, "", b"") or (vr == "SQ" and len(value) == 0)
    elif resolved == "U" or (resolved == "D" and vr == "UI"):
        assert str(value).startswith("2.25.")
    elif resolved == "D" and vr == "SQ":
        assert "PatientName" in value[0] and not value[0].PatientName  # recursed: the item cleaned
    elif resolved == "D":
        assert value != original
    else:
        raise AssertionError(f"unexpected code {code}")


PLANTED_FREE_TEXT = [
    ("Seen by Dr. Alvarez today", "Dr. Alvarez"),
    ("Patient Mary Thompson arrived", "Mary Thompson"),
    ("signed: Mrs Hiroko Tanaka", "Mrs Hiroko Tanaka"),
    ("prior exam from Robert Kowalczyk", "Robert Kowalczyk"),
    ("compare with Jones^Anne", "Jones^Anne"),
    ("contact: 617-555-0144", "617-555-0144"),
    ("phone (020) 7946 0958", "(020) 7946 0958"),
    ("tel +49 30 1234 5678", "+49 30 1234 5678"),
    ("mail a.person@hospital.example.com", "a.person@hospital.example.com"),
    ("born 1961-07-23", "1961-07-23"),
    ("on 07/23/1961 at noon", "07/23/1961"),
    ("date 19610723", "19610723"),
    ("seen 3 March 2019", "3 March 2019"),
    ("seen March 3, 2019", "March 3, 2019"),
    ("MRN 00483921", "00483921"),
    ("ID AB-448812", "AB-448812"),
    ("SSN 123-45-6789", "123-45-6789"),
    ("a 92 year old woman", "92 year old"),
    ("Prof. Kensington reviewed", "Prof. Kensington"),
    ("Elizabeth Okafor called", "Elizabeth Okafor"),
]


def test_detector_recall_on_planted_phi() -> None:
    """The share of planted items fully covered by a finding; printed for the README."""
    hits = 0
    for text, phi in PLANTED_FREE_TEXT:
        findings = find(text)
        if phi not in redact(text, findings):
            hits += 1
    recall = hits / len(PLANTED_FREE_TEXT)
    print(f"detector recall on planted PHI: {hits}/{len(PLANTED_FREE_TEXT)} = {recall:.2f}")
    assert recall >= 0.9


def test_detector_leaves_clinical_text_alone() -> None:
    text = "CT abdomen with contrast, 5 mm slices, 120 kV, no acute findings. Liver normal."
    assert find(text) == []


def test_findings_have_byte_offsets_of_the_utf8_value() -> None:
    text = "Zoë saw Dr. Welby"
    (finding,) = find(text)
    assert text.encode()[finding.start : finding.end].decode() == "Dr. Welby"
    assert finding.info_type == "PERSON_NAME"


def test_keep_all_is_not_claimed_as_identity_removed() -> None:
    assert deidentify(planted(), config_for(KEEP_ALL), KEY).dataset.PatientIdentityRemoved == "NO"  # type: ignore[arg-type]
