"""Write FHIR Provenance resources to a FHIR server (PUT in transaction Bundles) or as NDJSON into a
local or gs:// directory, chosen by the destination's form."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from dicomlib import NAMESPACE
from dicomlib.failures import item_failure
from storage.fhir import MAX_BUNDLE, FhirClient, is_fhir_server, open_fhir
from transforms.dead_letter import DEAD_LETTER, failure


class WriteProvenance(beam.PTransform):
    """Provenance resources -> their dead letters (reason provenance_error; none for NDJSON).

    A FHIR server (http(s) base URL or projects/.../fhirStores/S): batches of at most MAX_BUNDLE
    resources, each PUT in one transaction Bundle; counts provenance_written and provenance_failures.
    Credentials refused stop the run. Otherwise `{directory}/Provenance.ndjson`.
    """

    def __init__(self, destination: str) -> None:
        super().__init__()
        self.destination = destination

    def expand(self, resources: beam.PCollection[dict[str, Any]]) -> beam.PCollection[dict[str, Any]]:
        if not is_fhir_server(self.destination):
            _ = resources | "Ndjson" >> write_ndjson(self.destination)
            return resources.pipeline | "NoDeadLetters" >> beam.Create([])
        return (
            resources
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=MAX_BUNDLE)
            | "Put" >> beam.ParDo(PutBundles(self.destination)).with_outputs(DEAD_LETTER, main="written")
        )[DEAD_LETTER]


def _ndjson_line(resource: dict[str, Any]) -> str:
    Metrics.counter(NAMESPACE, "provenance_written").inc()
    return json.dumps(resource, sort_keys=True)


def write_ndjson(directory: str) -> beam.PTransform:
    """`{directory}/Provenance.ndjson`, one resource a line (FHIR bulk-data form), written by Beam's
    own text sink so a local and a gs:// directory behave alike."""
    return beam.Map(_ndjson_line) | beam.io.WriteToText(
        f"{directory.rstrip('/')}/Provenance",
        file_name_suffix=".ndjson",
        shard_name_template="",
        num_shards=1,
    )


class PutBundles(beam.DoFn):
    """A batch of resources -> one transaction Bundle of PUTs; a failed bundle is a dead letter per
    resource, named by the instance it records (its source entity), else by its id."""

    def __init__(self, destination: str) -> None:
        self.destination = destination

    def setup(self) -> None:
        self.client: FhirClient = open_fhir(self.destination)
        self.written = Metrics.counter(NAMESPACE, "provenance_written")
        self.failed = Metrics.counter(NAMESPACE, "provenance_failures")

    def teardown(self) -> None:
        self.client.close()

    def process(self, resources: list[dict[str, Any]]) -> Iterator[Any]:
        try:
            self.client.put_bundle(resources)
        except BaseException as error:  # run failures (credentials refused) and interrupts re-raised
            failed = item_failure(error, "provenance_error")
            self.failed.inc(len(resources))
            for resource in resources:
                yield failure(_uri(resource), "provenance", "provenance_error", failed.detail)
            return
        self.written.inc(len(resources))


def _uri(resource: dict[str, Any]) -> str:
    try:
        return str(resource["entity"][0]["what"]["identifier"]["value"])
    except (KeyError, IndexError, TypeError):
        return f"{resource.get('resourceType')}/{resource.get('id')}"
