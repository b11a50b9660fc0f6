"""deidentify_dicom end to end through `dicom-etl deidentify_dicom` (and `python -m`): a file-layout
source with planted PHI into a file-layout destination, Provenance as NDJSON; no planted PHI in any byte
of the destination, the key nowhere in output, the source unchanged; DEID_KEY and config errors exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.beam_support import filled_store
from tests.command_line import Place
from tests.test_deidentify import PHI, planted

KEY = "a-test-key-0123456789"


def source_store(tmp_path: Path) -> Path:
    second = planted()
    second.SOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    files = []
    for index, ds in enumerate((planted(), second)):
        path = tmp_path / f"in{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    filled_store(tmp_path / "source", files)
    return tmp_path / "source"


def every_byte(root: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file())


@pytest.mark.parametrize(
    ("entry", "profile"),
    [("script", "DEIDENTIFY_TAG_CONTENTS"), ("module", "ATTRIBUTE_CONFIDENTIALITY_BASIC_PROFILE")],
)
def test_a_store_is_deidentified_into_another_with_provenance(
    entry: str, profile: str, tmp_path: Path
) -> None:
    source = source_store(tmp_path)
    before = every_byte(source)
    place = Place(tmp_path)
    config = json.dumps({"dicom": {"filterProfile": profile}})
    run = place.run(
        entry,
        "deidentify_dicom",
        f"--source={source}",
        f"--destination={tmp_path / 'dest'}",
        f"--config={config}",
        f"--provenance_destination={tmp_path / 'prov'}",
        f"--dead_letter={tmp_path / 'dl'}",
        DEID_KEY=KEY,
    )
    assert run.status == 0, run.stderr
    assert (run.summary["success"], run.summary["failure"]) == (2, 0)
    assert run.summary["regenerated_uid"] > 0
    written = sorted((tmp_path / "dest").rglob("*.dcm"))
    assert len(written) == 2
    data = every_byte(tmp_path / "dest")
    assert [phi for phi in PHI if phi.encode() in data or phi.upper().encode() in data] == []
    assert every_byte(source) == before  # the source is never changed
    studies = {dcmread(path).StudyInstanceUID for path in written}
    assert len(studies) == 1 and studies.pop().startswith("2.25.")
    lines = (tmp_path / "prov" / "Provenance.ndjson").read_text().splitlines()
    resources = [json.loads(line) for line in lines]
    assert run.summary["provenance_written"] == len(resources) == 3  # the operation's, and two instances'
    assert len(resources) == 3
    [operation] = [r for r in resources if "occurredDateTime" in r]
    assert operation["agent"][0]["who"]["identifier"]["system"] == "https://g.co/healthcare/operation"
    assert operation["entity"][0]["extension"][0]["valueString"] == config
    for resource in resources:
        assert resource["resourceType"] == "Provenance"
        if resource is not operation:
            assert resource["agent"][0]["who"]["reference"] == f"Provenance/{operation['id']}"
            urls = [extension["url"] for extension in resource["entity"][0]["extension"]]
            assert {"https://g.co/WIDTH", "https://g.co/HEIGHT", "https://g.co/DICOM_STRUCTURED_SIZE"} <= set(
                urls
            )
    everything = run.stdout + run.stderr + (tmp_path / "prov" / "Provenance.ndjson").read_text()
    assert KEY not in everything and KEY.encode() not in data


def test_without_deid_key_or_with_a_bad_config_nothing_starts(tmp_path: Path) -> None:
    source = source_store(tmp_path)
    place = Place(tmp_path)
    run = place.run("script", "deidentify_dicom", f"--source={source}", f"--destination={tmp_path / 'd'}")
    assert run.status == 2 and "DEID_KEY" in run.err[-1]
    run = place.run(
        "script",
        "deidentify_dicom",
        f"--source={source}",
        f"--destination={tmp_path / 'd'}",
        '--config={"dicom": {"filterProfile": "NO_SUCH"}}',
        DEID_KEY=KEY,
    )
    assert run.status == 2 and "dicom.filterProfile" in run.err[-1]
    assert not (tmp_path / "d").exists()
