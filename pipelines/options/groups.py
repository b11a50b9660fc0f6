"""The option groups. Each defines its options and checks their values; a pipeline lists the groups it
takes. Checks that span groups are in rules.py."""

from __future__ import annotations

import os
from typing import ClassVar

from apache_beam.options.pipeline_options import GoogleCloudOptions
from pydicom.valuerep import STANDARD_VR

from dicomlib.convert import FILE_TYPES, KEEP_SYNTAX, MIME_TYPES, TRANSFER_SYNTAXES
from dicomlib.deidentify.config import ConfigError, parse_config
from dicomlib.filters import FilterError, parse_line
from dicomlib.images import SOP_CLASSES, MetadataError, parse_metadata
from dicomlib.lossy import DEFAULT_QUALITY, LOSSY_SYNTAXES
from dicomlib.wildcard import Pattern, PatternError, parse_pattern
from pipelines.options.base import EtlOptions, Group, Option, OptionError, is_local
from pipelines.options.locations import check_directory, check_local_or_gcs, check_not_url_like, check_store
from schemas.bigquery import MAX_COLUMNS
from storage.destination import BIGQUERY_TABLE, MAX_DESTINATIONS, WRITE_DISPOSITIONS
from storage.fhir import check_fhir_location, is_fhir_server
from storage.objects import is_gcs, read_bytes, read_filter, split_gcs
from storage.secrets import SECRET_VERSION
from storage.store import STORAGE_CLASSES


class Store(Group):
    """The store a pipeline works on; a local one that is read must exist."""

    title = "store"
    options = (
        Option(
            "store",
            "A local directory or gs://bucket/prefix (file layout), a DICOMweb service root "
            "(http[s]://...), or projects/P/locations/L/datasets/D/dicomStores/S.",
            required="a directory, gs:// prefix, DICOMweb URL or Healthcare store",
        ),
    )
    must_exist: ClassVar[bool]

    @classmethod
    def check(cls, options: EtlOptions) -> None:
        options.store = check_store("store", options.store, options, cls.must_exist)


class StoreToRead(Store):
    """export_dicom, export_metadata and delete_dicom read the store: a local one must be there."""

    must_exist = True


class StoreToImport(Store):
    """import_dicom may make a local store."""

    must_exist = False


class Input(Group):
    """The files to import."""

    title = "input"
    options = (
        Option(
            "input",
            "A local or gs:// pattern with the wildcards *, ? and a final ** (repeatable).",
            required="at least one file pattern",
            repeatable=True,
        ),
    )

    @classmethod
    def check(cls, options: EtlOptions) -> None:
        options.input = [_pattern(text).text for text in options.input]


def _pattern(text: str) -> Pattern:
    """Validate a pattern; local ones are made absolute so every worker reads the same files."""
    check_not_url_like("input", text)
    try:
        pattern = parse_pattern(text)
    except PatternError as error:
        raise OptionError("input", str(error)) from None
    return pattern if pattern.is_gcs else parse_pattern(os.path.abspath(text))


class ImageMetadata(Group):
    """import_images: the attributes every image gets. The file is read and checked once on the
    launcher (a malformed one stops the run before it starts); its text travels in the options."""

    title = "images"
    options = (
        Option(
            "metadata",
            "A local or gs:// JSON file of DICOM attributes for every image (patient, study, series): "
            'the DICOM JSON model ({"00100020": {"vr": "LO", "Value": ["123"]}}) or keywords '
            '({"PatientID": "123"}). A sidecar <image>.json beside an image overrides it; without '
            "--metadata every image needs its sidecar.",
        ),
        Option(
            "sop_class",
            "secondary_capture (default: Secondary Capture Image, Modality OT) or vl_photographic "
            "(VL Photographic Image, Modality XC): what each image becomes.",
            default="secondary_capture",
        ),
    )

    @classmethod
    def check(cls, options: EtlOptions) -> None:
        options.sop_class = (options.sop_class or "").lower()
        if options.sop_class not in SOP_CLASSES:
            raise OptionError("sop_class", f"must be one of {', '.join(SOP_CLASSES)}")
        if not options.metadata:
            return
        uri = check_local_or_gcs("metadata", options.metadata)
        try:
            text = read_bytes(uri).decode("utf-8")
        except Exception as error:  # OSError, bad UTF-8, or a gs:// client's own errors
            raise OptionError("metadata", f"cannot read {uri}: {error}") from None
        try:
            parse_metadata(text, template=True)
        except MetadataError as error:
            raise OptionError("metadata", f"{uri}: {error}") from None
        options.metadata = text


class DicomwebWrites(Group):
    """How an import writes to a DICOMweb or Healthcare API store (rules.py refuses them elsewhere)."""

    title = "DICOMweb and Healthcare API stores"
    options = (
        Option(
            "storage_class",
            "STANDARD, NEARLINE, COLDLINE or ARCHIVE: the Storage-Class header sent on STOW-RS.",
        ),
        Option(
            "verify_stored",
            "DICOMweb stores: after each STOW-RS, check with QIDO-RS that every instance the server "
            "acknowledged is there (for servers that may drop what they acknowledge).",
            switch=True,
        ),
        Option(
            "max_requests_in_flight",
            "DICOMweb stores: the most requests each worker process has out at once, to keep within a "
            "per-minute quota (default: no cap beyond the writers' own).",
            type=int,
        ),
    )

    @classmethod
    def check(cls, options: EtlOptions) -> None:
        if options.storage_class is not None:
            options.storage_class = options.storage_class.upper()
            if options.storage_class not in STORAGE_CLASSES:
                raise OptionError("storage_class", f"must be one of {', '.join(STORAGE_CLASSES)}")
        if options.max_requests_in_flight is not None and options.max_requests_in_flight < 1:
            raise OptionError("max_requests_in_flight", "must be a positive number")


class Output(Group):
    """Where export_dicom writes its files, and in what form."""

    title = "output"
    options = (
        Option(
            "output",
            "A local directory or gs:// prefix; created when missing.",
            required="a local directory or gs:// prefix",
        ),
        Option(
            "file_type",
            f"One of {', '.join(FILE_TYPES)}, or their MIME types {', '.join(MIME_TYPES)}; default dicom.",
            default="dicom",
        ),
        Option(
            "transfer_syntax",
            f"With --file_type=dicom: {KEEP_SYNTAX} (the default) keeps each instance as stored; or a "
            "transfer syntax UID to transcode to, lossless or lossy (JPEG Baseline, JPEG 2000).",
            default=KEEP_SYNTAX,
        ),
        Option(
            "quality",
            f"With a lossy --transfer_syntax: 1-100, default {DEFAULT_QUALITY}. JPEG Baseline: the IJG "
            "quality; JPEG 2000: compression ratio 101 - quality.",
            type=int,
        ),
    )

    @classmethod
    def check(cls, options: EtlOptions) -> None:
        options.output = check_local_or_gcs("output", options.output)
        check_directory("output", options.output, options)
        options.file_type = MIME_TYPES.get(options.file_type, options.file_type)
        if options.file_type not in FILE_TYPES:
            names = ", ".join([*FILE_TYPES, *MIME_TYPES])
            raise OptionError("file_type", f"{options.file_type!r} is not one of {names}")
        syntax = options.transfer_syntax
        if syntax != KEEP_SYNTAX:
            if options.file_type != "dicom":
                raise OptionError("transfer_syntax", "applies to --file_type=dicom only")
            if syntax not in TRANSFER_SYNTAXES and syntax not in LOSSY_SYNTAXES:
                known = ", ".join(
                    f"{uid} ({name})" for uid, name in (TRANSFER_SYNTAXES | LOSSY_SYNTAXES).items()
                )
                raise OptionError("transfer_syntax", f"{syntax!r} is not {KEEP_SYNTAX} or one of {known}")
        if options.quality is None:
            options.quality = DEFAULT_QUALITY
        elif syntax not in LOSSY_SYNTAXES:
            lossy = ", ".join(f"{uid} ({name})" for uid, name in LOSSY_SYNTAXES.items())
            raise OptionError("quality", f"applies to a lossy --transfer_syntax only: {lossy}")
        elif not 1 <= options.quality <= 100:
            raise OptionError("quality", f"{options.quality} is not between 1 and 100")


class Selection(Group):
    """The instances an export reads: all, or those a filter file names."""

    title = "selection"
    options: ClassVar[tuple[Option, ...]] = (
        Option(
            "filter_file",
            "A local or gs:// file of /studies/UID[/series/UID[/instances/UID]] lines: only these.",
        ),
    )

    @classmethod
    def check(cls, options: EtlOptions) -> None:
        """The filter file is read once on the launcher, as the pipeline reads it: a malformed line
        must stop the run before it starts."""
        if not options.filter_file:
            return
        uri = check_local_or_gcs("filter_file", options.filter_file)
        if is_gcs(uri) and not split_gcs(uri)[1]:
            raise OptionError("filter_file", f"{uri!r} names a bucket, not a file")
        try:
            lines = sum(1 for _ in read_filter(uri))
        except FilterError as error:
            raise OptionError("filter_file", str(error)) from None
        except OSError as error:
            raise OptionError("filter_file", f"cannot read {uri}: {error.strerror or error}") from None
        if not lines:
            raise OptionError("filter_file", f"{uri} names no study, series or instance")
        options.filter_file = uri


class Targets(Selection):
    """What delete_dicom deletes: `--target` lines or a filter file, exactly one of them."""

    options = (
        Option(
            "target",
            "A study, series or instance, as a filter line: /studies/UID[/series/UID[/instances/UID]] "
            "(repeatable).",
            repeatable=True,
        ),
        *Selection.options,
    )

    @classmethod
    def check(cls, options: EtlOptions) -> None:
        if bool(options.target) == bool(options.filter_file):
            raise OptionError("target", "give either --target lines or --filter_file (one of them)")
        _check_target_lines(options.target)
        super().check(options)


class Metadata(Group):
    """Metadata tables: where the rows go, and what a row may hold."""

    title = "metadata tables"
    destination: ClassVar[Option]
    columns = (
        Option(
            "max_columns",
            "Metadata tables: the most columns a table may have, nested fields counted; "
            f"default {MAX_COLUMNS}.",
            type=int,
            default=MAX_COLUMNS,
        ),
        Option(
            "exclude_vr",
            "Metadata tables: VRs left out of rows, besides OB OD OF OL OV OW UN (repeatable).",
            repeatable=True,
        ),
    )

    @classmethod
    def check(cls, options: EtlOptions) -> None:
        """Up to five destinations: bq://project.dataset.table, or local or gs:// directories."""
        name = cls.destination.name
        destinations = []
        for text in getattr(options, name):
            if text.startswith("bq://"):
                if not BIGQUERY_TABLE.fullmatch(text):
                    raise OptionError(name, f"{text!r} is not bq://project.dataset.table")
                destinations.append(text)
            else:
                destination = check_local_or_gcs(name, text)
                check_directory(name, destination, options)
                destinations.append(destination)
        if len(destinations) > MAX_DESTINATIONS:
            raise OptionError(name, f"{len(destinations)} destinations; at most {MAX_DESTINATIONS}")
        if len(set(destinations)) != len(destinations):
            raise OptionError(name, "a destination is given twice")
        setattr(options, name, destinations)
        if options.max_columns < 1:
            raise OptionError("max_columns", "must be a positive number")
        options.exclude_vr = [vr.upper() for vr in options.exclude_vr]
        unknown = [vr for vr in options.exclude_vr if vr not in STANDARD_VR]
        if unknown:
            raise OptionError("exclude_vr", f"{', '.join(unknown)} is not a DICOM VR")


class RowsOfRun(Metadata):
    """import_dicom and delete_dicom: a row for each instance they store or delete, if asked."""

    destination = Option(
        "metadata_destination",
        "Up to 5 metadata tables (bq://project.dataset.table, or a local or gs:// directory of "
        "Parquet files) that get one row per stored or deleted instance (repeatable).",
        repeatable=True,
    )
    options = (destination, *Metadata.columns)


class Tables(Metadata):
    """export_metadata: the tables it fills."""

    destination = Option(
        "destination",
        "Up to 5 tables: bq://project.dataset.table, or a local or gs:// directory (Parquet).",
        required="bq://project.dataset.table or a directory",
        repeatable=True,
    )
    options = (destination, *Metadata.columns)


class WriteDisposition(Group):
    """What export_metadata does to a table that has rows."""

    title = "write disposition"
    options = (
        Option(
            "write_disposition",
            "WRITE_EMPTY (default: refuse a table with rows), WRITE_TRUNCATE or WRITE_APPEND.",
            default="WRITE_EMPTY",
        ),
    )

    @classmethod
    def check(cls, options: EtlOptions) -> None:
        options.write_disposition = (options.write_disposition or "").upper()
        if options.write_disposition not in WRITE_DISPOSITIONS:
            raise OptionError("write_disposition", f"must be one of {', '.join(WRITE_DISPOSITIONS)}")


class DeadLetter(Group):
    """Where failed items go. On a distributed runner a local default would be lost with the workers."""

    title = "dead letters"
    options = (
        Option(
            "dead_letter",
            "Directory (local or gs://) for failed items as JSON lines; default ./dead_letter.",
        ),
    )

    @classmethod
    def check(cls, options: EtlOptions) -> None:
        """`--dead_letter`, else ./dead_letter locally, else dead_letter/ under --temp_location."""
        if options.dead_letter:
            location = check_local_or_gcs("dead_letter", options.dead_letter)
        elif is_local(options):
            location = os.path.abspath("dead_letter")
        else:
            temp = options.view_as(GoogleCloudOptions).temp_location
            if not temp:
                raise OptionError("dead_letter", "required on a distributed runner without --temp_location")
            location = f"{temp.rstrip('/')}/dead_letter"
        check_directory("dead_letter", location, options)
        options.dead_letter = location


class DeidentifyStores(Group):
    """deidentify_dicom: the store it reads (never changed) and the store it writes the copies to."""

    title = "source and destination stores"
    options = (
        Option(
            "source",
            "The store to de-identify (never changed): a local directory or gs://bucket/prefix, a "
            "DICOMweb service root (http[s]://...), or projects/P/locations/L/datasets/D/dicomStores/S.",
            required="a directory, gs:// prefix, DICOMweb URL or Healthcare store",
        ),
        # the name export_metadata uses for its tables: a variant that parses alike (a list)
        Option(
            "destination",
            "The store that gets the de-identified copies, of any kind (as --source); local ones are made.",
            required="a directory, gs:// prefix, DICOMweb URL or Healthcare store",
            repeatable=True,
        ),
    )

    @classmethod
    def check(cls, options: EtlOptions) -> None:
        options.source = check_store("source", options.source, options, must_exist=True)
        if len(options.destination) != 1:
            raise OptionError("destination", "give one store")
        destination = check_store("destination", options.destination[0], options, must_exist=False)
        if destination == options.source:
            raise OptionError("destination", "must be another store than --source")
        options.destination = [destination]


class Deidentification(Group):
    """deidentify_dicom: what it does (the Healthcare API's DeidentifyConfig) and where its Provenance
    goes. The key comes from the environment (DEID_KEY) or, where workers do not share the launcher's
    environment (Dataflow), from a Secret Manager version the workers read: never from an option's
    value, as options are logged."""

    title = "de-identification"
    options = (
        Option(
            "config",
            "A local or gs:// JSON file, or inline JSON: the DICOM parts of the Cloud Healthcare API's "
            "DeidentifyConfig (dicom.filterProfile, dicom.keepList/removeList, dicom.skipIdRedaction, "
            "image.textRedactionMode). Default: the basic profile. The key comes from env DEID_KEY.",
        ),
        Option(
            "deid_key_secret",
            "Instead of env DEID_KEY (on Dataflow, whose workers do not see the launcher's environment): "
            "the Secret Manager version holding the key, projects/P/secrets/S/versions/V, read by each "
            "worker with its credentials. Pin a version number: another key gives other UIDs.",
        ),
        Option(
            "provenance_destination",
            "Where the FHIR R4 Provenance of the operation and of every instance goes: a FHIR base URL "
            "(http[s]://...; FHIR_TOKEN or FHIR_USERNAME/FHIR_PASSWORD), "
            "projects/P/locations/L/datasets/D/fhirStores/S, or a local or gs:// directory that gets "
            "Provenance.ndjson. The config's operationMetadata.fhirOutput.fhirStore means the same.",
        ),
    )

    @classmethod
    def check(cls, options: EtlOptions) -> None:
        if options.deid_key_secret is not None:
            if os.environ.get("DEID_KEY"):
                raise OptionError("deid_key_secret", "give the key one way: DEID_KEY is set as well")
            if not SECRET_VERSION.fullmatch(options.deid_key_secret):
                raise OptionError(
                    "deid_key_secret", f"{options.deid_key_secret!r} is not projects/P/secrets/S/versions/V"
                )
        elif not is_local(options):
            raise OptionError(
                "deid_key_secret", "required on a distributed runner, whose workers do not see env DEID_KEY"
            )
        elif not os.environ.get("DEID_KEY"):
            raise OptionError(
                None,
                "DEID_KEY: the environment variable with the de-identification key is not set "
                "(or give --deid_key_secret)",
            )
        text = options.config or ""
        if text and not text.lstrip().startswith("{"):
            location = check_local_or_gcs("config", text)
            try:
                text = read_bytes(location).decode("utf-8")
            except Exception as error:  # OSError, bad UTF-8, or a gs:// client's own errors
                raise OptionError("config", f"cannot read {location}: {error}") from None
        try:
            config = parse_config(text)
        except ConfigError as error:
            raise OptionError("config", f"{error.field}: {error.reason}") from None
        options.config = config.text
        location = options.provenance_destination
        if config.fhir_store is not None:  # operationMetadata.fhirOutput.fhirStore means the same
            if location and location.rstrip("/") != config.fhir_store:
                raise OptionError(
                    "provenance_destination",
                    f"{location} differs from the config's operationMetadata.fhirOutput.fhirStore "
                    f"{config.fhir_store}: give one, or the same",
                )
            location = config.fhir_store
        if location:
            if is_fhir_server(location) or location.startswith("projects/"):
                try:
                    location = check_fhir_location(location)
                except ValueError as error:
                    raise OptionError("provenance_destination", str(error)) from None
            else:
                location = check_local_or_gcs("provenance_destination", location)
                check_directory("provenance_destination", location, options)
            options.provenance_destination = location


class SelectionOrTargets(Selection):
    """deidentify_dicom: all instances, or those that `--target` lines or a filter file name."""

    options = (Targets.options[0], *Selection.options)

    @classmethod
    def check(cls, options: EtlOptions) -> None:
        if options.target and options.filter_file:
            raise OptionError("target", "give --target lines or --filter_file, not both")
        _check_target_lines(options.target)
        super().check(options)


class CommandLine(Group):
    """Options of the command line itself, for every pipeline; not template parameters."""

    title = "options of the command line"
    options = (
        Option(
            "verbose",
            "Show the logs of every library (warnings, tracebacks) on stderr as they come, besides the "
            "run's log file (kept, and named in the summary, only when the run fails).",
            switch=True,
        ),
    )


def _check_target_lines(lines: list[str]) -> None:
    """Each --target is one filter line."""
    for text in lines:
        try:
            parse_line(text)
        except FilterError as error:
            raise OptionError("target", str(error).replace("filter file line 1: ", "")) from None
