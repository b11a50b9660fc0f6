"""The file-layout store: instances kept byte-identical at a path made of their UIDs."""

from __future__ import annotations

from transforms.dicom_header import Header
from transforms.objects import MatchedFile, copy_create_only, fingerprint, join

SUCCESS, ALREADY_PRESENT, CONFLICT = "success", "already_present", "conflict"


class FileLayoutStore:
    """`{root}/studies/{study}/series/{series}/instances/{sop}.dcm` under a directory or gs:// prefix.

    Writes are create-only, so concurrent workers storing the same instance cannot clobber each
    other: the loser finds the file present and compares bytes.
    """

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")

    def instance_uri(self, study: str, series: str, sop: str) -> str:
        """The path of an instance; the UIDs must already be validated (see valid_uid)."""
        return join(self.root, "studies", study, "series", series, "instances", f"{sop}.dcm")

    def put(self, source: MatchedFile, header: Header) -> tuple[str, str]:
        """Store `source` unchanged; return (outcome, instance uri).

        An existing instance with the same size and CRC32C is `already_present`; any other existing
        instance is a `conflict` and is left as it was. Existence is checked first so that a re-run
        copies nothing; the create-only copy still settles a race between two writers.
        """
        target = self.instance_uri(header.study_uid, header.series_uid, header.sop_uid)
        existing = fingerprint(target)
        if existing is None and copy_create_only(source.uri, target):
            return SUCCESS, target
        same = fingerprint(source.uri) == (existing or fingerprint(target))
        return (ALREADY_PRESENT if same else CONFLICT), target
