"""De-identify a store's instances into another store, with FHIR R4 Provenance of every change.

    DEID_KEY=... python -m pipelines.deidentify_dicom --source gs://bucket/store \\
        --destination gs://bucket/deid --config '{"dicom": {"filterProfile": "DEIDENTIFY_TAG_CONTENTS"}}' \\
        --provenance_destination gs://bucket/provenance

What the Cloud Healthcare API's dicomStores.deidentify does, on any kind of store: each selected
instance (all, or what --target lines or a filter file name) is read from the source, de-identified
(PS3.15 Table E.1-1 profiles, keyed UIDs and date shifts, a local sensitive-text detector) and written
to the destination; the source is never changed. The key comes from env DEID_KEY, or on Dataflow from
the Secret Manager version --deid_key_secret names, and appears nowhere in output, logs or Provenance.
"""

from __future__ import annotations

import datetime
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from dicomlib.deidentify.provenance import operation_resource, provenance_id
from pipelines.options.base import EtlOptions
from pipelines.options.groups import DeadLetter, Deidentification, DeidentifyStores, SelectionOrTargets
from pipelines.run import Pipeline
from pipelines.run_log import run_name
from transforms.dead_letter import DEAD_LETTER, WriteDeadLetters
from transforms.deidentify import PROVENANCE, DeidentifyInstances
from transforms.progress import count_failures
from transforms.select import ListInstances, SelectTargets
from transforms.write_provenance import WriteProvenance

GROUPS = (DeidentifyStores, Deidentification, SelectionOrTargets, DeadLetter)


def build(pipeline: beam.Pipeline, options: PipelineOptions) -> None:
    """Construct the de-identification; no listing or other I/O happens here."""
    values = options.view_as(EtlOptions)
    source, [destination] = values.source, values.destination
    name = run_name("deidentify_dicom")
    operation_id = provenance_id("operation", name)
    targets = pipeline | "Select" >> SelectTargets(source, values.filter_file, values.target)
    selected = targets | "ListInstances" >> beam.ParDo(ListInstances(source)).with_outputs(
        DEAD_LETTER, main="instances"
    )
    done = (
        selected.instances
        | "SpreadInstances" >> beam.Reshuffle()
        | "Deidentify"
        >> beam.ParDo(
            DeidentifyInstances(source, destination, values.config, operation_id, values.deid_key_secret)
        ).with_outputs(DEAD_LETTER, PROVENANCE)
    )
    failures = [selected[DEAD_LETTER], done[DEAD_LETTER]]
    if values.provenance_destination:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        operation = operation_resource(
            operation_id, f"dicom-etl/operations/{name}", source, destination, values.config, now, now
        )
        failures.append(
            (pipeline | "Operation" >> beam.Create([operation]), done[PROVENANCE])
            | "AllProvenance" >> beam.Flatten()
            | "WriteProvenance" >> WriteProvenance(values.provenance_destination)
        )
    (
        count_failures(failures)
        | "AllFailures" >> beam.Flatten()
        | "DeadLetter" >> WriteDeadLetters(values.dead_letter, name)
    )


# selected = success + already_present + failure; the actions are counted per attribute
SUMMARY = (
    "selected",
    "success",
    "already_present",
    "failure",
    "unmatched_targets",
    "deleted",
    "reset",
    "removed",
    "regenerated_uid",
    "cleaned",
    "findings",
    "provenance_written",
    "provenance_failures",
    "objects_listed",
)
PIPELINE = Pipeline("deidentify_dicom", __doc__, GROUPS, build, SUMMARY)
main = PIPELINE.main

if __name__ == "__main__":
    sys.exit(main())
