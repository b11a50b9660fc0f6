"""An export's output files: one stored instance converted (dicomlib.convert) and written under the
export's root, whole or not at all. Runs in the isolated child process (dicomlib.isolated)."""

from __future__ import annotations

import contextlib
import posixpath

from pydicom.dataset import Dataset

from dicomlib.convert import FILE_TYPES, KEEP_SYNTAX, frame_count, frames, read_instance, transcode
from dicomlib.render import render
from storage.objects import IO_ERRORS, copy, delete_tree, failing_as_write_error, write_bytes
from storage.staging import spool_file


def convert_file(
    local: str, stem: str, file_type: str, transfer_syntax: str, quality: int, root: str
) -> list[str]:
    """Write what the instance in the local file `local` becomes, as `{stem}.{extension}` under
    `root` (an export's output): transcoded DICOM (named by the SOP Instance UID written, new when
    lossy), or one file per frame, `{stem}.{ext}` for one frame and `{stem}_{frame:04d}.{ext}`
    (counted from 1) for several. The names written, or ItemFailed with none of them left behind:
    an instance is exported whole or not at all."""
    written: list[str] = []
    try:
        with open(local, "rb") as stream:
            ds = read_instance(stream)
        if file_type == "dicom":
            written.append(_write_dicom(ds, local, stem, transfer_syntax, quality, root))
            return written
        parts = frames(ds) if file_type == "octet-stream" else render(ds, file_type)
        extension, several = FILE_TYPES[file_type], frame_count(ds) > 1
        for number, part in enumerate(parts, start=1):
            name = f"{stem}_{number:04d}.{extension}" if several else f"{stem}.{extension}"
            with failing_as_write_error():
                write_bytes(name, part, root=root)
            written.append(name)
        return written
    except BaseException:
        for name in written:
            with contextlib.suppress(*IO_ERRORS):
                delete_tree(name)
        raise


def _write_dicom(ds: Dataset, local: str, stem: str, transfer_syntax: str, quality: int, root: str) -> str:
    """`local` as `{stem}.dcm`, transcoded unless it is in `transfer_syntax` already (or that is
    `*`); a lossy transcode's new SOP Instance UID names the file instead. The name written."""
    with spool_file() as transcoded:
        source, name = local, f"{stem}.dcm"
        if transfer_syntax not in (KEEP_SYNTAX, ds.file_meta.get("TransferSyntaxUID")):
            source = transcoded
            with open(source, "wb") as out:
                new_sop = transcode(ds, transfer_syntax, out, quality)
            if new_sop is not None:
                name = f"{posixpath.dirname(stem)}/{new_sop}.dcm"
        with failing_as_write_error():
            copy(source, name, root=root)
        return name
