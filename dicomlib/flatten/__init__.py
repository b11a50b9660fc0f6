"""One DICOM data set as one row of the metadata table (CONTRACT.md, "Metadata table").

``flatten(ds)`` returns the row and the schema of exactly its columns. The rules, with the decisions
the contract leaves open marked *decision*:

Columns
  Every attribute is a column named by its keyword: the file meta group (``ds.file_meta``) first,
  then the data set, each by tag; retired attributes included, group lengths (gggg,0000) left out
  silently everywhere. *decision*: the top-level data set ends where ``stop_before_pixels`` stops
  reading, before (7FE0,0008) Float Pixel Data, (7FE0,0009) and (7FE0,0010) Pixel Data: those and
  any later attributes are left out silently, so a data set from WADO-RS metadata (Pixel Data as
  bulk data) gives the row its file gives.

Types and modes
  The column's type comes from the *dictionary* VR of the keyword, so a keyword always has one
  type whatever VR a file gives it; the value is converted from the element's own VR, and a value
  the column cannot hold is dropped as ``invalid_value``. Dictionary VRs with alternatives take the
  first non-binary one (``US or SS`` -> INTEGER; ``US or OW`` is an INTEGER column that an OW
  element never reaches, being excluded). AE AS CS LO LT SH ST UC UI UR UT DS IS -> STRING (DS and
  IS as written, e.g. "0.50"), DA -> DATE, TM -> TIME, DT -> TIMESTAMP, FL FD -> FLOAT, AT SL SS UL
  US SV UV -> INTEGER (AT as the tag's 32-bit value), PN -> RECORD {Alphabetic, Ideographic,
  Phonetic} of RECORD {FamilyName, GivenName, MiddleName, NamePrefix, NameSuffix} (all fields
  always in the schema), SQ -> REPEATED RECORD of the union of its items' columns. Mode REPEATED
  where the dictionary VM is not "1", else NULLABLE.

Values
  Strings lose their padding: leading and trailing spaces (and NULs) for AE AS CS DA DS DT IS LO SH
  TM UI UR, trailing ones for LT ST UT UC PN. An attribute present with no value is a column whose
  value is None. *decision*: several values in a NULLABLE STRING column (a VM violation) are kept
  joined by "\\", as DICOM wrote them; several values in another NULLABLE column are
  ``invalid_value``. In a REPEATED column an empty value in the middle stays as "" (STRING) or {}
  (PN), and is skipped in other types (BigQuery arrays hold no NULL). PN components past the
  fifth stay in NameSuffix, groups past the third in Phonetic (split at most 4 and 2 times).
  DA: YYYYMMDD (and ACR-NEMA YYYY.MM.DD). TM: HH, HHMM, HHMMSS, HHMMSS.F{1,6} (colons of
  ACR-NEMA's HH:MM:SS ignored); a leap second (60) is ``invalid_value`` since TIME cannot hold it.
  DT: YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX], completed to the earliest instant, offset applied,
  as UTC; *decision*: without an offset the value is taken as UTC (Timezone Offset From UTC is not
  consulted). Integers must fit their VR's range (and INT64); an IS string in an INTEGER column,
  or a DS in a FLOAT one, is parsed.

Private and unknown attributes
  Odd groups go to ``OtherElements`` {Tag "Tag_GGGGEEEE", Data REPEATED STRING}, at the top level
  and in each item; a private SQ becomes a column ``Tag_GGGGEEEE``. *decision*: a public tag not in
  pydicom's dictionary (no keyword) is treated the same way, as a private one. Data holds each
  value as a string: text as decoded, numbers in Python's repr, AT as 8 hex digits, PN as written.

Repeating groups
  Tags of the group-repeating dictionary entries (curves 50xx, overlays 60xx, and 7Fxx) become one
  column per keyword, REPEATED RECORD {Id STRING (the group, 4 upper-case hex digits), Value}.
  *decision*: the retired element-repeating entries (002031xx, 002804x0, 1000xxx0, 1010xxxx) are
  plain keyword columns; a second attribute with the same keyword in one data set (or a data set
  element repeating one of the file meta group) is ``invalid_value``, the first kept.

DroppedTags
  REPEATED RECORD {TagName, Reason}, top level only, each (TagName, Reason) once. TagName is the
  keyword (Tag_GGGGEEEE without one); *decision*: inside sequences, the path of column names from
  the top, dot-separated and without item indexes, e.g.
  ``ReferencedImageSequence.ReferencedSOPInstanceUID``. Reasons: ``excluded_vr`` (OB OD OF OL OV
  OW UN and any VR in ``exclude_vrs``, by the element's own VR), ``too_large`` (a value of more than
  1,000,000 bytes as encoded in the file; for a data set from JSON, its UTF-8 length),
  ``invalid_value`` (see above; also any value pydicom cannot decode), ``too_deep`` (*decision*: a
  sequence nested in 13 others; BigQuery nests RECORDs 15 levels at most, and a sequence at level
  13 still has room for a PN's two), and ``column_limit`` (added by schemas.rows.restrict).
  *decision*: a sequence with no items, or whose items hold nothing, has no column (a RECORD needs
  fields); it is not listed either, having no value to lose.

Layers: columns.py decides each tag's column once (keyword, dictionary VR and VM -> field, cached);
elements.py reads an element's values, straight from its raw bytes for the common VRs (pydicom's
own conversion, with its validation, is the fallback: SQ, ambiguous or implicit private VRs, ISO
2022 escapes); values.py converts them to the column's type; walk.py walks the data set and its
sequences into the row.
"""

from dicomlib.flatten.walk import flatten

__all__ = ["flatten"]
