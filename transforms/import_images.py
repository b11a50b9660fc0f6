"""Make a Secondary Capture instance of each matched JPEG or PNG image, then store it as an import
stores a file: every image ends counted, stored or a dead letter with its reason.

The instance is made where the image is read (ConvertImages) and travels as bytes to the writer,
grouped by SOP Instance UID as an import groups files, so two images that would be one instance are
written one after the other (the second `already_present` or a `conflict`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics
from pydicom.dataset import Dataset

from dicomlib import NAMESPACE
from dicomlib.failures import ItemFailed, item_failure
from dicomlib.images import MetadataError, build_instance, is_sidecar, merged, parse_metadata, sidecar_of
from dicomlib.uids import InstanceRef
from storage.objects import MatchedFile, read_bytes
from storage.staging import spool_file
from storage.store import Parsed, Written
from transforms.dead_letter import failure
from transforms.metadata_rows import RowsOfImported
from transforms.store_instances import WriteInstances

MAX_IMAGE_BYTES = 256 * 1024 * 1024  # an image is read whole, to hash and decode it


class Converted(NamedTuple):
    """An image made into an instance: where the image is, the instance's Part 10 bytes, its UIDs."""

    uri: str
    data: bytes
    ref: InstanceRef


class ConvertImages(beam.DoFn):
    """MatchedFile -> (SOP Instance UID, Converted); sidecars (`*.json`) matched by a pattern are
    counted as `sidecars`, not imported; every other failure goes to the dead letter.

    `template`: the text of --metadata (checked on the launcher), or None: then each image needs its
    own sidecar `<image>.json`. `sop_class`: a name of dicomlib.images.SOP_CLASSES."""

    def __init__(self, template: str | None, sop_class: str) -> None:
        self.template_text = template
        self.sop_class = sop_class
        self.bytes_read = Metrics.counter(NAMESPACE, "bytes_read")
        self.sidecars = Metrics.counter(NAMESPACE, "sidecars")
        self.failures = Metrics.counter(NAMESPACE, "failure")

    def setup(self) -> None:
        self.template = parse_metadata(self.template_text, template=True) if self.template_text else None

    def process(self, file: MatchedFile) -> Iterator[tuple[str, Converted] | beam.pvalue.TaggedOutput]:
        if is_sidecar(file.uri):
            self.sidecars.inc()
            return
        try:
            converted = self._convert(file)
        except BaseException as error:  # item_failure re-raises interrupts
            failed = item_failure(error, "cannot_convert")
            self.failures.inc()
            stage = "read" if failed.reason in ("read_error", "missing_metadata") else "convert"
            yield failure(file.uri, stage, failed.reason, failed.detail)
            return
        yield converted.ref.sop, converted

    def _convert(self, file: MatchedFile) -> Converted:
        if file.size > MAX_IMAGE_BYTES:
            raise ItemFailed("too_large", f"{file.size:,} bytes; images up to {MAX_IMAGE_BYTES:,} are read")
        try:
            image = _read(file.uri)
        except FileNotFoundError:  # gone since it was listed
            raise ItemFailed("read_error", f"{file.uri} is gone") from None
        self.bytes_read.inc(len(image))
        sidecar = sidecar_of(file.uri)
        try:
            own_text = _read(sidecar)
        except FileNotFoundError:
            if self.template is None:
                raise ItemFailed(
                    "missing_metadata", f"no {os.path.basename(sidecar)} beside the image, and no --metadata"
                ) from None
            own = None
        else:
            self.bytes_read.inc(len(own_text))
            try:
                own = parse_metadata(own_text)
            except MetadataError as error:
                raise ItemFailed("malformed_metadata", f"{sidecar}: {error}") from None
        try:
            built = build_instance(image, file.uri, merged(self.template, own), self.sop_class)
        except MetadataError as error:
            raise ItemFailed("malformed_metadata", str(error)) from None
        return Converted(file.uri, built.data, built.ref)


def _read(uri: str) -> bytes:
    """A whole file; its absence passes as FileNotFoundError, other I/O errors are a read_error."""
    try:
        return read_bytes(uri)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ItemFailed("read_error", f"{uri}: {type(error).__name__}: {error}") from None


class WriteImages(WriteInstances):
    """(SOP Instance UID, Converted instances) -> what WriteInstances makes of files: each instance is
    spooled to a local file, given to the store in batches, and its spool removed once written.
    Records and dead letters name the image, not the spool."""

    def start_bundle(self) -> None:
        super().start_bundle()
        self.sources: dict[str, tuple[str, contextlib.ExitStack]] = {}  # spool -> image URI, its cleanup

    def process(  # type: ignore[override]  # Converted instances in, spooled into Parsed files
        self, element: tuple[str, Iterable[Converted]], window: Any = beam.DoFn.WindowParam
    ) -> Iterator[Any]:
        sop, converted = element
        yield from super().process((sop, [self._spool(one) for one in converted]), window)

    def source_of(self, item: Parsed) -> str:
        """One instance made of several images: written in the order of the images' URIs."""
        return self.sources[item.file.uri][0]

    def _spool(self, converted: Converted) -> Parsed:
        cleanup = contextlib.ExitStack()
        path = cleanup.enter_context(spool_file())
        self.sources[path] = (converted.uri, cleanup)
        with open(path, "wb") as handle:
            handle.write(converted.data)
        return Parsed(MatchedFile(path, len(converted.data)), converted.ref)

    def _outputs(
        self, batch: list[Parsed], results: list[Written], repeated: bool = False, windows: Any = None
    ) -> Iterator[Any]:
        try:
            yield from super()._outputs(batch, results, repeated, windows)
        finally:
            for item in batch:
                _, cleanup = self.sources.pop(item.file.uri)
                cleanup.close()

    def _item_outputs(self, item: Parsed, written: Written, repeated: bool) -> Iterator[Any]:
        image, _ = self.sources[item.file.uri]
        for output in super()._item_outputs(item, written, repeated):
            record = output.value if isinstance(output, beam.pvalue.TaggedOutput) else output
            record["uri"] = image
            yield output


class RowsOfStoredImages(RowsOfImported):
    """A record of a stored image -> its instance's CREATE row, read from the store (the image is
    not the instance, and the instance's spool is gone), as export_metadata reads it."""

    def dataset(self, stored: dict[str, Any], ref: InstanceRef) -> Dataset:
        return self.store.dataset(ref)
