"""A sensitive-text detector that runs here, with no network service: it finds the patient's own
identifying values wherever they recur, person names, dates, phone numbers, e-mail addresses, ages and
ID-like numbers in a text value, and replaces each finding with `[INFO_TYPE]`.

Findings carry UTF-8 byte offsets into the value (the Provenance's byte-start/byte-end) and a
confidence: 0.9 for the patient's own values and structured patterns, 0.6 for names found by the name
list. Where findings overlap, the longer one wins (then the more confident).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.dataset import Dataset

PERSON_NAME, DATE, PHONE, EMAIL, ID, AGE, LOCATION = (
    "PERSON_NAME",
    "DATE",
    "PHONE_NUMBER",
    "EMAIL_ADDRESS",
    "GENERIC_ID",
    "AGE",
    "LOCATION",
)
# The Healthcare API's Clean Descriptors Option: a phrase in a descriptor that matches the value of an
# attribute the Basic Profile removes becomes `[CTX]`.
CONTEXT = "CTX"


def words(text: str) -> frozenset[str]:
    """The whitespace-separated words of a block of text: long word lists stay readable."""
    return frozenset(text.split())


# Common given names (US census and international frequency lists, abridged): a capitalised word found
# here, with the capitalised word after it, is a person's name.
GIVEN_NAMES = words(
    """
    james john robert michael william david richard joseph thomas charles christopher daniel matthew
    anthony mark donald steven paul andrew joshua kenneth kevin brian george timothy ronald edward jason
    jeffrey ryan jacob gary nicholas eric jonathan stephen larry justin scott brandon benjamin samuel
    gregory alexander frank patrick raymond jack dennis jerry tyler aaron jose adam nathan henry peter
    zachary douglas harold kyle carl arthur gerald roger keith jeremy terry lawrence sean christian
    albert joe ethan austin jesse willie billy bryan bruce jordan ralph roy noah dylan eugene wayne alan
    juan louis russell gabriel randy philip harry vincent bobby johnny logan mary patricia jennifer
    linda elizabeth barbara susan jessica sarah karen lisa nancy betty margaret sandra ashley kimberly
    emily donna michelle carol amanda dorothy melissa deborah stephanie rebecca sharon laura cynthia
    kathleen amy angela shirley anna brenda pamela emma nicole helen samantha katherine christine debra
    rachel carolyn janet catherine maria heather diane ruth julie olivia joyce virginia victoria kelly
    lauren christina joan evelyn judith megan andrea cheryl hannah jacqueline martha gloria teresa ann
    sara madison frances kathryn janice jean abigail alice julia judy sophia grace denise amber doris
    marilyn danielle beverly isabella theresa diana natalie brittany charlotte marie kayla alexis lori
    hans peter klaus jurgen stefan wolfgang pierre jean luc marco giovanni luca sofia hiroshi yuki
    mohammed ahmed ali fatima wei li ming raj priya anil sunita ivan olga sergei natasha
    """
)
SURNAMES = words(
    """
    smith johnson williams brown jones garcia miller davis rodriguez martinez hernandez lopez gonzalez
    wilson anderson thomas taylor moore jackson martin lee perez thompson white harris sanchez clark
    ramirez lewis robinson walker young allen king wright scott torres nguyen hill flores green adams
    nelson baker hall rivera campbell mitchell carter roberts gomez phillips evans turner diaz parker
    cruz edwards collins reyes stewart morris morales murphy cook rogers gutierrez ortiz morgan cooper
    peterson bailey reed kelly howard ramos kim cox ward richardson watson brooks chavez wood james
    bennett gray mendoza ruiz hughes price alvarez castillo sanders patel myers long ross foster jimenez
    doe mueller schmidt schneider fischer weber meyer wagner becker schulz hoffmann dupont durand
    rossi russo ferrari tanaka suzuki watanabe sato wang zhang liu chen yang singh kumar ivanov
    """
)
# Words common to institutions' names and addresses: alone they identify no one.
PLACE_WORDS = words(
    """
    hospital hospitals clinic clinics general medical center centre health healthcare university
    institute saint memorial regional community county city children's childrens women's imaging
    radiology department street road avenue suite floor building north south east west
    """
)
TITLE = r"(?:Dr|Mr|Mrs|Ms|Miss|Prof|Sr|Sra|Herr|Frau)\.?"
CAP_WORD = r"[A-Z][a-z'\-]+"
PATTERNS: tuple[tuple[str, re.Pattern[str], float], ...] = (
    (EMAIL, re.compile(r"[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+"), 0.9),
    (
        PHONE,
        re.compile(
            r"(?<![\w])(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{2,5}\)[\s.\-]?|\d{2,5}[\s.\-])\d{3,4}[\s.\-]?\d{3,4}(?![\w])"
        ),
        0.8,
    ),
    (
        DATE,
        re.compile(
            r"(?<!\d)(?:\d{4}-\d{1,2}-\d{1,2}|\d{1,2}[/.\-]\d{1,2}[/.\-]\d{2,4}|(?:19|20)\d{2}[01]\d[0-3]\d)(?!\d)"
            r"|\b\d{1,2}\s+(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.?,?\s+\d{4}\b"
            r"|\b(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.?\s+\d{1,2}(?:st|nd|rd|th)?,?\s+\d{4}\b"
        ),
        0.8,
    ),
    (AGE, re.compile(r"\b\d{1,3}[\s\-]?(?:years?|yrs?|y/o|yo)(?:[\s\-]old)?\b", re.IGNORECASE), 0.7),
    (PERSON_NAME, re.compile(rf"\b{TITLE}\s+{CAP_WORD}(?:\s+{CAP_WORD})?"), 0.8),
    (PERSON_NAME, re.compile(r"\b[A-Za-z'\-]+\^[A-Za-z'\-]+(?:\^[A-Za-z'\-]*)*"), 0.8),
    # ID-like: a token of letters, digits and -/. with at least four digits and five characters
    (
        ID,
        re.compile(
            r"(?<![\w.\-])(?=[\w\-/.]*\d[\w\-/.]*\d[\w\-/.]*\d[\w\-/.]*\d)[A-Za-z0-9][\w\-/.]{4,}(?<![.\-/])"
        ),
        0.6,
    ),
)
NAME_PAIR = re.compile(rf"(?=\b({CAP_WORD})\s+({CAP_WORD})\b)")  # overlapping: "Patient Mary Smith"


@dataclass(frozen=True)
class Finding:
    """One piece of sensitive text in a value."""

    start: int  # UTF-8 byte offsets in the value
    end: int
    info_type: str
    quote: str
    confidence: float


@dataclass(frozen=True)
class Term:
    """One of the patient's own identifying values, searched for wherever it may recur."""

    text: str
    info_type: str


# The patient's (and the study's people's and places') own values, from the top level of the instance.
OWN_VALUES = {
    "PatientName": PERSON_NAME,
    "PatientID": ID,
    "OtherPatientIDs": ID,
    "IssuerOfPatientID": LOCATION,
    "PatientBirthDate": DATE,
    "PatientBirthName": PERSON_NAME,
    "PatientMotherBirthName": PERSON_NAME,
    "PatientAddress": LOCATION,
    "PatientTelephoneNumbers": PHONE,
    "AccessionNumber": ID,
    "InstitutionName": LOCATION,
    "InstitutionAddress": LOCATION,
    "ReferringPhysicianName": PERSON_NAME,
    "PerformingPhysicianName": PERSON_NAME,
    "NameOfPhysiciansReadingStudy": PERSON_NAME,
    "OperatorsName": PERSON_NAME,
    "PhysiciansOfRecord": PERSON_NAME,
    "RequestingPhysician": PERSON_NAME,
    "StudyID": ID,
}


def own_terms(ds: Dataset) -> list[Term]:
    """The values of OWN_VALUES present in `ds`, split into the parts that may recur on their own (a
    name's components, a birth date's common spellings), longest first."""
    terms: dict[str, str] = {}
    for keyword, info_type in OWN_VALUES.items():
        element = ds.data_element(keyword) if keyword in ds else None
        if element is None or element.value in (None, ""):
            continue
        values = element.value if element.VM > 1 else [element.value]
        for value in values:
            for part in _parts(str(value), info_type):
                terms.setdefault(part, info_type)
    sequence = ds.get("OtherPatientIDsSequence")
    for item in sequence or []:
        if item.get("PatientID"):
            terms.setdefault(str(item.PatientID).strip(), ID)
    return sorted((Term(text, kind) for text, kind in terms.items()), key=lambda term: -len(term.text))


def context_terms(values: Iterable[str], own: Iterable[Term]) -> list[Term]:
    """CONTEXT terms: each value of three characters or more (a name's parts joined by spaces) that
    is not one of the patient's own terms already, longest first."""
    known = {term.text.lower() for term in own}
    found: dict[str, str] = {}
    for value in values:
        phrase = " ".join(part for part in re.split(r"[\^=]", value) if part.strip()).strip()
        if len(phrase) >= 3 and phrase.lower() not in known:
            found.setdefault(phrase, CONTEXT)
    return sorted((Term(text, kind) for text, kind in found.items()), key=lambda term: -len(term.text))


def _parts(value: str, info_type: str) -> Iterable[str]:
    value = value.strip()
    if not value:
        return
    if info_type == PERSON_NAME:
        whole = " ".join(part for part in re.split(r"[\^=]", value) if part.strip())
        if whole:
            yield whole
        for part in re.split(r"[\^=\s,]+", value):
            if len(part) >= 3 and not part.endswith("."):
                yield part
        return
    if info_type == DATE:
        yield value
        try:
            day = datetime.datetime.strptime(value, "%Y%m%d").date()
        except ValueError:
            return
        for form in ("%Y-%m-%d", "%m/%d/%Y", "%d/%m/%Y", "%d.%m.%Y", "%d %B %Y", "%B %d, %Y", "%d %b %Y"):
            yield day.strftime(form)
        return
    if len(value) >= 3:
        yield value
    if info_type == LOCATION:  # a place's distinctive words recur alone ("seen at Elsewhere")
        for part in re.split(r"[\s,.^]+", value):
            if len(part) >= 4 and part.lower() not in PLACE_WORDS:
                yield part
    if info_type == PHONE:
        digits = re.sub(r"\D", "", value)
        if len(digits) >= 6:
            yield digits


def find(text: str, terms: Iterable[Term] = ()) -> list[Finding]:
    """Every finding in `text`, non-overlapping, in order."""
    spans: list[tuple[int, int, str, float]] = []
    for term in terms:
        for match in re.finditer(re.escape(term.text), text, re.IGNORECASE):
            if _word_edges(text, match.start(), match.end()):
                spans.append((match.start(), match.end(), term.info_type, 0.9))
    for info_type, pattern, confidence in PATTERNS:
        for match in pattern.finditer(text):
            if info_type != DATE or _plausible_date(match.group()):
                spans.append((match.start(), match.end(), info_type, confidence))
    for match in NAME_PAIR.finditer(text):
        first, last = match.group(1).lower(), match.group(2).lower()
        if first in GIVEN_NAMES or last in SURNAMES:
            spans.append((match.start(1), match.end(2), PERSON_NAME, 0.6))
    return _resolve(text, spans)


def _word_edges(text: str, start: int, end: int) -> bool:
    """A term counts only as a whole word (or at the edges of non-word characters)."""
    before = text[start - 1] if start else " "
    after = text[end] if end < len(text) else " "
    return not (before.isalnum() and text[start].isalnum()) and not (
        after.isalnum() and text[end - 1].isalnum()
    )


def _plausible_date(text: str) -> bool:
    if re.fullmatch(r"\d{8}", text):
        try:
            datetime.datetime.strptime(text, "%Y%m%d")
        except ValueError:
            return False
    return True


def _resolve(text: str, spans: list[tuple[int, int, str, float]]) -> list[Finding]:
    """Keep the longest (then the most confident) of overlapping spans; offsets become UTF-8 bytes."""
    chosen: list[tuple[int, int, str, float]] = []
    for span in sorted(spans, key=lambda s: (-(s[1] - s[0]), -s[3], s[0])):
        if all(span[1] <= other[0] or span[0] >= other[1] for other in chosen):
            chosen.append(span)
    chosen.sort()
    findings = []
    for start, end, info_type, confidence in chosen:
        byte_start = len(text[:start].encode("utf-8"))
        byte_end = byte_start + len(text[start:end].encode("utf-8"))
        findings.append(Finding(byte_start, byte_end, info_type, text[start:end], confidence))
    return findings


def redact(text: str, findings: list[Finding]) -> str:
    """`text` with each finding replaced by `[INFO_TYPE]`."""
    data = text.encode("utf-8")
    out = bytearray()
    position = 0
    for finding in findings:
        out += data[position : finding.start] + f"[{finding.info_type}]".encode()
        position = finding.end
    out += data[position:]
    return out.decode("utf-8")
