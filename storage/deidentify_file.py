"""One instance de-identified from a local file into another. Runs in the isolated child process
(dicomlib.isolated): reading, decoding and re-encoding pixels and OCR happen there, so that what a
hostile file does to a codec costs that instance a dead letter, not the run."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple

from pydicom.dataset import Dataset

from dicomlib.convert import read_instance
from dicomlib.deidentify import DeidConfig, Result, deidentify, parse_config
from dicomlib.failures import ItemFailed
from dicomlib.uids import InstanceRef, valid_uid

IMAGE_SIZE = ("Rows", "Columns")  # what the Provenance reads of the new data set


class Deidentified(NamedTuple):
    ref: InstanceRef  # the copy's UIDs
    size: int  # the copy's bytes
    result: Result  # its data set holds only IMAGE_SIZE: the rest stays in the child


def deidentify_file(source: str, target: str, config_text: str, key: bytes) -> Deidentified:
    """Write the de-identified copy of the instance in `source` to `target`. A source that is not a
    whole, valid DICOM file fails with the reason a read gives it (truncated, malformed, ...)."""
    with open(source, "rb") as stream:
        ds = read_instance(stream)  # its header checked first; bounded: a deflate bomb is too_large
    result = deidentify(ds, _config(config_text), key, in_place=True)  # read for this alone
    out = result.dataset
    ref = InstanceRef(str(out.StudyInstanceUID), str(out.SeriesInstanceUID), str(out.SOPInstanceUID))
    bad = next((uid for uid in ref if not valid_uid(uid)), None)
    if bad is not None:  # UIDs kept (keepList, skipIdRedaction) may still be malformed
        raise ItemFailed("invalid_uid", f"the copy's UID {bad[:80]!r} is not 1-64 digits and dots")
    out.save_as(target, enforce_file_format=True)
    size = Dataset()
    for keyword in IMAGE_SIZE:
        if keyword in out:
            setattr(size, keyword, out[keyword].value)
    return Deidentified(ref, os.path.getsize(target), dataclasses.replace(result, dataset=size))


@functools.lru_cache(maxsize=4)
def _config(text: str) -> DeidConfig:
    return parse_config(text)
