"""Keyed per-patient date shift: every date of one patient moves back by the same number of days, so
intervals between them (age at study, follow-up times) are kept while the dates themselves are not."""

from __future__ import annotations

import datetime

from dicomlib.deidentify.uids import keyed

MAX_SHIFT_DAYS = 3650  # up to ten years back; never zero


def shift_days(patient: str, key: bytes) -> int:
    """The patient's shift in days, 1 to MAX_SHIFT_DAYS, from the key and the patient's identity."""
    return 1 + int.from_bytes(keyed(key, b"date-shift", patient)[:8], "big") % MAX_SHIFT_DAYS


def shift_da(value: str, days: int) -> str | None:
    """A DA value (YYYYMMDD) moved back by `days`; None if it is not a valid date (then it is removed)."""
    text = value.strip()
    try:
        day = datetime.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        return None
    try:
        return (day - datetime.timedelta(days=days)).strftime("%Y%m%d")
    except OverflowError:
        return None


def shift_dt(value: str, days: int) -> str | None:
    """A DT value: its date part shifted, the time and offset kept; None if its date part is invalid
    (a DT of only a year or a month has no day to shift: removed too)."""
    text = value.strip()
    if len(text) < 8:
        return None
    shifted = shift_da(text[:8], days)
    return None if shifted is None else shifted + text[8:]
