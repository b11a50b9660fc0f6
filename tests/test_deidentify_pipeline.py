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
from tests.conftest import run_pipeline
from tests.healthcare_server import running_healthcare_api
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


def test_the_key_can_come_from_a_secret_manager_version_read_by_the_workers(tmp_path: Path) -> None:
    """On Dataflow the workers do not see the launcher's environment: --deid_key_secret names the
    Secret Manager version they read (Application Default Credentials). The same key gives the same
    UIDs as DEID_KEY; the secret's name may be logged, its payload never."""
    source = source_store(tmp_path)
    place = Place(tmp_path)
    by_env = place.run(
        "script",
        "deidentify_dicom",
        f"--source={source}",
        f"--destination={tmp_path / 'by_env'}",
        DEID_KEY=KEY,
    )
    assert by_env.status == 0, by_env.stderr
    version = "projects/p1/secrets/deid-key/versions/3"
    with running_healthcare_api(tmp_path) as (api, environment):
        api.secrets[version] = KEY.encode()
        run = place.run(
            "script",
            "deidentify_dicom",
            f"--source={source}",
            f"--destination={tmp_path / 'by_secret'}",
            f"--deid_key_secret={version}",
            SECRET_MANAGER_API_ROOT=api.root,
            **environment,
        )
        assert run.status == 0, run.stderr
        assert [seen.path for seen in api.requests if seen.path.endswith(":access")]
        missing = place.run(
            "script",
            "deidentify_dicom",
            f"--source={source}",
            f"--destination={tmp_path / 'no_key'}",
            "--deid_key_secret=projects/p1/secrets/other/versions/1",
            SECRET_MANAGER_API_ROOT=api.root,
            **environment,
        )
    assert run.summary["success"] == 2 and KEY not in run.stdout + run.stderr
    relative = [
        path.relative_to(tmp_path / "by_env") for path in sorted((tmp_path / "by_env").rglob("*.dcm"))
    ]
    assert relative == [
        p.relative_to(tmp_path / "by_secret") for p in sorted((tmp_path / "by_secret").rglob("*.dcm"))
    ]
    assert missing.status != 0 and "projects/p1/secrets/other/versions/1" in missing.err[-1]
    assert missing.summary["success"] == 0


@pytest.mark.parametrize(
    ("value", "env", "message"),
    [
        ("projects/p1/secrets/deid-key", {}, "is not projects/P/secrets/S/versions/V"),
        ("projects/p1/secrets/deid-key/versions/1", {"DEID_KEY": KEY}, "give the key one way"),
    ],
)
def test_a_malformed_or_doubled_key_source_exits_2(
    value: str, env: dict[str, str], message: str, tmp_path: Path
) -> None:
    source = source_store(tmp_path)
    run = Place(tmp_path).run(
        "script",
        "deidentify_dicom",
        f"--source={source}",
        f"--destination={tmp_path / 'd'}",
        f"--deid_key_secret={value}",
        **env,
    )
    assert run.status == 2 and message in run.err[-1] and "--deid_key_secret" in run.err[-1]


def test_a_damaged_source_instance_is_a_dead_letter_with_its_reason_and_the_rest_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source file cut short, or overwritten with junk, after it was stored: each is dead-lettered with
    the reason a read gives it (read in the isolated child, where pixel codecs run), the others are
    de-identified, and the run exits 3."""
    from pipelines import deidentify_dicom

    source = source_store(tmp_path)
    first, second = sorted(source.rglob("*.dcm"))
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    junk = planted()
    junk.SOPInstanceUID = "1.2.3.4.5.6.7.8.10"
    junk.save_as(tmp_path / "junk.dcm", enforce_file_format=True)
    filled_store(source, [tmp_path / "junk.dcm"])
    [stored_junk] = [path for path in source.rglob("*.dcm") if path.stem == "1.2.3.4.5.6.7.8.10"]
    stored_junk.write_bytes(b"not DICOM at all " * 100)
    monkeypatch.setenv("DEID_KEY", KEY)
    run = run_pipeline(
        deidentify_dicom.main,
        f"--source={source}",
        f"--destination={tmp_path / 'dest'}",
        dead_letter=tmp_path / "dl",
    )
    assert run.status == 3
    assert (run.summary["selected"], run.summary["success"], run.summary["failure"]) == (3, 1, 2)
    reasons = {Path(uri).name: reason for uri, reason in run.reasons().items()}
    assert reasons == {first.stem: "truncated", "1.2.3.4.5.6.7.8.10": "not_dicom"}
    assert [path.name for path in (tmp_path / "dest").rglob("*.dcm")] != []


def test_an_empty_target_is_refused_not_read_as_the_whole_store(tmp_path: Path) -> None:
    source = source_store(tmp_path)
    run = Place(tmp_path).run(
        "module",
        "deidentify_dicom",
        f"--source={source}",
        f"--destination={tmp_path / 'd'}",
        "--target=",
        DEID_KEY=KEY,
    )
    assert run.status == 2 and run.err[-1] == "error: --target: given with no value"
    assert not (tmp_path / "d").exists()
