"""deidentify_dicom's Provenance into a real FHIR R4 server (medplum's fhir-router, in memory, on
loopback): PUT in transaction Bundles, found again by source instance, each resource valid R4 (the
fhir.resources models, R4B) except the one rule the seed's shape breaks; 503 retried, 401 stops the
run with one line; the options' checks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from fhir.resources.R4B.provenance import Provenance
from pydicom import dcmread

from storage.dicomweb_client import RequestFailed
from storage.fhir import MAX_BUNDLE, FhirClient, session_from_environment
from tests.command_line import Place, Result
from tests.fault_proxy import Fault, FaultProxy
from tests.fhir_test_server import FhirServer, serving
from tests.test_deidentify_pipeline import KEY, source_store

TOKEN = "fhir-test-token-0123"


@pytest.fixture(scope="module")
def fhir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirServer]:
    yield from serving(tmp_path_factory.mktemp("fhir") / "server.log")


@pytest.fixture(scope="module")
def fhir_with_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirServer]:
    yield from serving(tmp_path_factory.mktemp("fhir") / "server.log", TOKEN)


CONFIG: dict[str, Any] = {"dicom": {"filterProfile": "DEIDENTIFY_TAG_CONTENTS"}}


def deidentify(
    tmp_path: Path, source: Path, provenance: str, config: dict[str, Any] = CONFIG, **env: str
) -> Result:
    return Place(tmp_path).run(
        "script",
        "deidentify_dicom",
        f"--source={source}",
        f"--destination={tmp_path / 'dest'}",
        f"--config={json.dumps(config)}",
        f"--provenance_destination={provenance}",
        f"--dead_letter={tmp_path / 'dl'}",
        DEID_KEY=KEY,
        **env,
    )


def source_instances(source: Path) -> list[str]:
    """The REST paths of the source's instances, as the Provenance names them."""
    found = [dcmread(path, stop_before_pixels=True) for path in source.rglob("*.dcm")]
    return sorted(
        f"{source}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        for ds in found
    )


# Seed 004's custom search on the source instance, created on the server as the seed does.
LOOKUP_SOURCE_INSTANCE = {
    "resourceType": "SearchParameter",
    "url": "lookup-source-instance",
    "base": ["Provenance"],
    "code": "lookup-source-instance",
    "name": "look up the source DICOM instance",
    "type": "string",
    "expression": "Provenance.entity.what.identifier.value",
    "status": "active",
    "description": "A search on the source DICOM instance",
}


def by_source_instance(fhir: FhirServer, instance: str) -> list[dict[str, Any]]:
    """The Provenance of one source instance, found as the seed finds it:
    `Provenance?lookup-source-instance:contains=studies/.../instances/...`."""
    created = requests.post(f"{fhir.base}/SearchParameter", json=LOOKUP_SOURCE_INSTANCE, timeout=30)
    assert created.status_code == 201, created.text
    return fhir.provenance(**{"lookup-source-instance:contains": instance[instance.index("studies/") :]})


def valid_r4(resource: dict[str, Any]) -> None:
    """fhir.resources' R4B model of Provenance accepts it (Provenance is the same in R4 and R4B)."""
    Provenance.model_validate(resource)


def test_provenance_goes_to_a_fhir_server_one_per_instance_plus_the_operation(
    fhir: FhirServer, tmp_path: Path
) -> None:
    source = source_store(tmp_path)
    run = deidentify(tmp_path, source, fhir.base)
    assert run.status == 0, run.stderr
    assert (
        run.summary["success"],
        run.summary["provenance_written"],
        run.summary["provenance_failures"],
    ) == (
        2,
        3,
        0,
    )
    resources = fhir.provenance()
    instances = source_instances(source)
    assert len(instances) == 2
    mine = [r for instance in instances for r in by_source_instance(fhir, instance)]
    assert [r["entity"][0]["what"]["identifier"]["value"] for r in mine] == instances
    [operation] = [r for r in resources if r["entity"][0]["what"]["identifier"]["value"] == str(source)]
    assert operation["agent"][0]["who"]["identifier"]["system"] == "https://g.co/healthcare/operation"
    for resource in mine:
        assert resource["agent"][0]["who"]["reference"] == f"Provenance/{operation['id']}"
        assert any(e["url"] == "https://g.co/dicom-tags" for e in resource["entity"][0]["extension"])
    assert len(mine) + 1 == len(instances) + 1
    for resource in [*mine, operation]:
        valid_r4(resource)
    assert KEY not in json.dumps(resources)

    (tmp_path / "again").mkdir()  # another run: another operation, so three more resources
    again = deidentify(tmp_path / "again", source, fhir.base)
    assert again.status == 0, again.stderr
    assert len(fhir.provenance()) == len(resources) + 3


def test_a_server_answering_503_then_200_is_retried(fhir: FhirServer, tmp_path: Path) -> None:
    source = source_store(tmp_path)
    before = len(fhir.provenance())
    with FaultProxy(fhir.root, [Fault.status(503)], when=lambda method, path: method == "POST") as proxy:
        run = deidentify(tmp_path, source, f"{proxy.url}/fhir/R4")
        applied = [request.fault for request in proxy.requests if request.fault is not None]
    assert run.status == 0, run.stderr
    assert applied == [Fault.status(503)]
    assert run.summary["provenance_written"] == 3
    assert len(fhir.provenance()) == before + 3


def test_refused_credentials_stop_the_run_with_one_line_naming_the_server_not_the_token(
    fhir_with_token: FhirServer, tmp_path: Path
) -> None:
    source = source_store(tmp_path)
    run = deidentify(tmp_path, source, fhir_with_token.base, FHIR_TOKEN="not-the-token")
    assert run.status == 1
    [line] = run.err
    assert "refused our credentials (HTTP 401)" in line and fhir_with_token.base in line
    assert "not-the-token" not in run.stdout + run.stderr
    assert fhir_with_token.provenance(TOKEN) == []

    (tmp_path / "right").mkdir()
    right = deidentify(tmp_path / "right", source, fhir_with_token.base, FHIR_TOKEN=TOKEN)
    assert right.status == 0, right.stderr
    assert len(fhir_with_token.provenance(TOKEN)) == 3


def test_put_bundle_splits_into_bounded_transactions_and_checks_every_entry(
    fhir: FhirServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FHIR_TOKEN", raising=False)
    client = FhirClient(fhir.base, session_from_environment())
    resources = [
        {
            "resourceType": "Provenance",
            "id": f"bundle-test-{index}",
            "target": [{"identifier": {"value": f"dest/{index}"}}],
            "recorded": "2024-01-01T00:00:00+00:00",
            "agent": [{"who": {"identifier": {"value": "test"}}}],
            "entity": [{"role": "source", "what": {"identifier": {"value": f"bundle-source/{index}"}}}],
        }
        for index in range(MAX_BUNDLE + 50)
    ]
    client.put_bundle(resources)
    client.put_bundle(resources)  # PUT: updated, not duplicated
    held = [r for r in fhir.provenance() if r["id"].startswith("bundle-test-")]
    assert len(held) == MAX_BUNDLE + 50
    invalid = [{**resources[0], "id": "bundle-test-invalid", "recorded": "not a time"}]
    with pytest.raises(RequestFailed, match="HTTP 400"):
        client.put_bundle(invalid)
    client.close()


@pytest.mark.parametrize(
    ("provenance", "config", "says"),
    [
        ("http://user:secret@127.0.0.1:1/fhir", CONFIG, "FHIR_TOKEN or FHIR_USERNAME/FHIR_PASSWORD"),
        ("projects/p/locations/l/datasets/d/fhirStores", CONFIG, "fhirStores/S"),
        (
            "projects/p/locations/l/datasets/d/fhirStores/a",
            {
                "operationMetadata": {
                    "fhirOutput": {"fhirStore": "projects/p/locations/l/datasets/d/fhirStores/b"}
                }
            },
            "differs",
        ),
    ],
)
def test_bad_provenance_destinations_exit_2_before_any_work(
    provenance: str, config: dict[str, Any], says: str, tmp_path: Path
) -> None:
    source = source_store(tmp_path)
    run = deidentify(tmp_path, source, provenance, config)
    assert run.status == 2 and says in run.err[-1]
    assert "secret" not in run.stdout + run.stderr
    assert not (tmp_path / "dest").exists()
