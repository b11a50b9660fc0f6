"""The Dataflow flex templates against the pipelines themselves.

Each templates/<pipeline>/metadata.json must list exactly the options of its pipeline's option groups
(`GROUPS` in the pipeline's module), required as the groups require them, with regexes that accept
the values the parser accepts on Dataflow: gs:// locations, DICOMweb URLs and Healthcare API stores.
Local paths, which the parser accepts, are refused there: a launcher's or worker's disk is gone after
the job. And the launcher's work, parse and build, must do no I/O beyond reading the filter file once.

The image (templates/Dockerfile) starts from pinned bases for linux/amd64 and holds the project, and
templates/flex.sh tags it with its commit: checked on the Dockerfile's text and by running flex.sh in a
git checkout with stand-ins for docker and gcloud that log their calls (there is no registry here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import apache_beam as beam
import pytest
from google.cloud import storage

from dicomlib.convert import MIME_TYPES, TRANSFER_SYNTAXES
from dicomlib.lossy import LOSSY_SYNTAXES
from pipelines import (
    deidentify_dicom,
    delete_dicom,
    export_dicom,
    export_metadata,
    import_dicom,
    import_images,
)
from pipelines.options.base import OptionError

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
PIPELINES: dict[str, ModuleType] = {
    "import_dicom": import_dicom,
    "export_dicom": export_dicom,
    "export_metadata": export_metadata,
    "delete_dicom": delete_dicom,
    "deidentify_dicom": deidentify_dicom,
    "import_images": import_images,
}
DATAFLOW = [
    "--runner=DataflowRunner",
    "--project=my-project",
    "--region=europe-west4",
    "--temp_location=gs://dicom-etl-temp/tmp",
]
FILTER_URI = "gs://filters/2026-11-23.txt"  # put in the GCS emulator by the `filter_in_gcs` fixture
METADATA_URI = "gs://filters/patient.json"  # and this one too
# Valid values of each pipeline's required options (delete_dicom: --target, as it needs it or a filter file).
BASE = {
    "import_dicom": {
        "input": "gs://landing/2026-11-23/**.dcm",
        "store": "projects/p/locations/europe-west4/datasets/imaging/dicomStores/main",
    },
    "export_dicom": {"store": "gs://archive/store", "output": "gs://archive/2026-11-23"},
    "export_metadata": {"store": "gs://archive/store", "destination": "bq://my-project.imaging.instances"},
    "delete_dicom": {"store": "https://dicom.example.org/dicom-web", "target": "/studies/1.2.3"},
    "deidentify_dicom": {
        "source": "gs://landing/store",
        "destination": "projects/p/locations/europe-west4/datasets/research/dicomStores/deid",
        "deid_key_secret": "projects/p/secrets/deid-key/versions/1",
    },
    "import_images": {
        "input": "gs://landing/photos/**.jpg",
        "store": "projects/p/locations/europe-west4/datasets/imaging/dicomStores/main",
        "sop_class": "secondary_capture",
    },
}
# Options that a template requires although the parser does not: they are needed only on Dataflow
# (the key), or tell the launcher which pipeline it runs (sop_class: templates/launch.py).
REQUIRED_ON_DATAFLOW = {"deid_key_secret", "sop_class"}


@dataclass
class Examples:
    """Values for one option: `valid` pass both the regex and the parser; `local` pass the parser but
    not the regex (meaningless on Dataflow); `invalid` pass neither."""

    valid: list[str]
    invalid: list[str]
    local: list[str] = field(default_factory=list)


FIVE = ",".join(f"gs://archive/metadata{i}" for i in range(4)) + ",bq://my-project.imaging.instances"
DESTINATIONS = Examples(
    valid=[
        "bq://my-project.imaging.instances",
        "bq://example.com:my-project.imaging.instances_2026",
        "gs://archive/metadata",
        "bq://my-project.d.t,gs://archive/metadata",
        "bq://my-project.d.t, gs://archive/metadata",
        FIVE,
    ],
    invalid=[
        "gs://",
        "bq://my-project.d",
        "bq://My-Project.d.t",
        "bq://p.d.t",  # a project id has 2 characters or more
        "ftp://x/metadata",
        FIVE + ",gs://archive/sixth",
    ],
    local=["./metadata", "/srv/metadata,bq://my-project.d.t"],
)
STORES = Examples(
    valid=[
        "gs://archive/store",
        "gs://archive",
        "gs://archive/store/",
        "http://localhost:8042/dicom-web",
        "https://dicom.example.org/dicom-web",
        "projects/p/locations/europe-west4/datasets/imaging/dicomStores/main",
    ],
    invalid=[
        "",
        "gs://",
        "ftp://x",
        "http://",
        "http://user:secret@host/dicom-web",
        "https://host/dicom-web?x=1",
        "https://host/dicom-web#top",
        "projects/p/locations/l/datasets/d",
        "projects/p/locations/l/datasets/d/dicomStores/s/extra",
    ],
    local=["./store", "/srv/store"],
)
EXAMPLES = {
    "input": Examples(
        valid=[
            "gs://bucket/dir/**.dcm",
            "gs://landing/2026-11-23/**.dcm",
            "gs://landing/extra/CT?.dcm",
            "gs://b/*/series-?/*.dcm",
            "gs://b/one/file.dcm",
            "gs://b/**",
            "gs://b/*",
            "gs://a/**.dcm,gs://b/x/*.dcm",
            "gs://a/**.dcm, gs://b/x/*.dcm",
        ],
        invalid=[
            "",
            "gs://",
            "gs://bucket",
            "gs://bucket/",
            "gs://b/**/x.dcm",
            "gs://b/a*/**",
            "gs://b/**.d?m",
            "gs://b/***",
            "gs://b*/x.dcm",
            "gs://a/**.dcm,gs://b/**/x.dcm",
        ],
        local=["incoming/**.dcm", "/data/landing/*.dcm", "ftp://x/y.dcm"],  # the last is a relative path
    ),
    "store": STORES,
    "source": STORES,
    "storage_class": Examples(
        valid=["STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE", "nearline"],
        invalid=["", "GLACIER", "STANDARD,NEARLINE"],
    ),
    "verify_stored": Examples(valid=["true", "false"], invalid=["yes", "1"]),
    "max_requests_in_flight": Examples(valid=["1", "16"], invalid=["0", "-2", "many", ""]),
    "dead_letter": Examples(
        valid=["gs://archive/dead_letter", "gs://archive"],
        invalid=["gs://", "ftp://x/dead_letter"],
        local=["./dead_letter"],
    ),
    "metadata_destination": DESTINATIONS,
    "destination": DESTINATIONS,
    "config": Examples(
        valid=['{"dicom": {"filterProfile": "DEIDENTIFY_TAG_CONTENTS"}}', "{}", ' {"image": {}} '],
        invalid=["gs://", '{"dicom": [', "ftp://x/config.json"],
    ),
    "sop_class": Examples(
        valid=["secondary_capture", "vl_photographic", "VL_PHOTOGRAPHIC"], invalid=["", "ct", "sc"]
    ),
    "metadata": Examples(valid=[METADATA_URI], invalid=["gs://", "gs://filters", "ftp://x/metadata.json"]),
    "deid_key_secret": Examples(
        valid=["projects/p/secrets/deid-key/versions/1", "projects/p/secrets/k_2/versions/latest"],
        invalid=["", "projects/p/secrets/deid-key", "projects/p/secrets/k/versions/0", "deid-key"],
    ),
    "provenance_destination": Examples(
        valid=[
            "gs://archive/provenance",
            "https://fhir.example.org/fhir",
            "projects/p/locations/europe-west4/datasets/research/fhirStores/provenance",
        ],
        invalid=["gs://", "ftp://x/provenance", "projects/p/locations/l/datasets/d/fhirStores"],
        local=["./provenance"],
    ),
    "max_columns": Examples(valid=["1", "10000"], invalid=["0", "-5", "abc", ""]),
    "exclude_vr": Examples(
        valid=["SQ", "sq", "SQ,PN", "SQ, PN", "OB,OW,UN"], invalid=["XX", "SQ,XX", "S", "SQPN"]
    ),
    "output": Examples(
        valid=["gs://archive/2026-11-23", "gs://archive"],
        invalid=["", "gs://", "ftp://x"],
        local=["./export"],
    ),
    "file_type": Examples(
        valid=["dicom", "octet-stream", "jpeg", "png", *MIME_TYPES],
        invalid=["", "DICOM", "tiff", "image/tiff", "application/dicom+json", "application/dicom; x=1"],
    ),
    "transfer_syntax": Examples(
        valid=["*", *TRANSFER_SYNTAXES, *LOSSY_SYNTAXES],
        invalid=[
            "1.2.840.10008.1.2.4.51",  # JPEG extended 12-bit: not offered
            "**",
            "1.2.840.10008.1.2.1.",
            "explicit-vr-little-endian",
            "1.2.840.10008.1.2.1,1.2.840.10008.1.2",
        ],
    ),
    "quality": Examples(valid=["1", "50", "90", "100"], invalid=["0", "101", "-5", "abc", "", "9.5"]),
    "write_disposition": Examples(
        valid=["WRITE_EMPTY", "WRITE_TRUNCATE", "WRITE_APPEND", "write_append"], invalid=["", "WRITE_NEVER"]
    ),
    "filter_file": Examples(valid=[FILTER_URI], invalid=["gs://", "gs://filters", "ftp://x/filter.txt"]),
    "target": Examples(
        valid=[
            "/studies/1.2.3",
            "/studies/1.2.3/series/4.5",
            "/studies/1.2.3/series/4.5/instances/6.7",
            "/studies/1.2.3,/studies/4.5",
            " /studies/1.2.3 ",
        ],
        invalid=[
            "",
            "/studies/",
            "/studies/1.2.3/",
            "/studies/1..2",
            "/studies/1.2.3/instances/4",
            "studies/1.2.3",
            "/studies/a.b",
        ],
    ),
}


def metadata(name: str) -> dict:
    return json.loads((TEMPLATES / name / "metadata.json").read_text())


def parameters(name: str) -> dict[str, dict]:
    return {parameter["name"]: parameter for parameter in metadata(name)["parameters"]}


def regex(name: str, option: str) -> re.Pattern[str]:
    return re.compile(parameters(name)[option]["regexes"][0])


def argv(name: str, **values: str) -> list[str]:
    """A Dataflow argv for `name`: its base options, changed by `values` (None drops one)."""
    options = BASE[name] | values
    if name == "delete_dicom" and "filter_file" in values:
        options.pop("target")  # one or the other
    if "quality" in values:  # valid only with a lossy syntax
        options["transfer_syntax"] = next(iter(LOSSY_SYNTAXES))
    return DATAFLOW + [f"--{key}={value}" for key, value in options.items() if value is not None]


def examples_of(name: str, option: str) -> Examples:
    return STORES if (name, option) == ("deidentify_dicom", "destination") else EXAMPLES[option]


def examples(kind: str) -> list:
    cases = []
    for name, module in PIPELINES.items():
        for option in module.PIPELINE.options:
            for value in getattr(examples_of(name, option), kind):
                cases.append(pytest.param(name, option, value, id=f"{name}-{option}-{value!r}"))
    return cases


@pytest.fixture(scope="module")
def filter_in_gcs(gcs: storage.Client) -> str:
    bucket = gcs.bucket("filters")
    if not bucket.exists():
        gcs.create_bucket("filters")
    bucket.blob("2026-11-23.txt").upload_from_string("/studies/1.2.3\n/studies/4.5/series/6.7\n")
    bucket.blob("patient.json").upload_from_string('{"PatientID": "123", "PatientName": "Doe^Jane"}')
    return FILTER_URI


@pytest.mark.parametrize("name", PIPELINES)
def test_required_options_are_required(name: str) -> None:
    module = PIPELINES[name]
    module.PIPELINE.parse(argv(name))
    for option in [option for option, required in module.PIPELINE.options.items() if required]:
        with pytest.raises(OptionError, match=f"--{option}:"):
            module.PIPELINE.parse(argv(name, **{option: None}))


def test_delete_needs_a_target_or_a_filter_file() -> None:
    with pytest.raises(OptionError, match="--target: give either"):
        delete_dicom.PIPELINE.parse(argv("delete_dicom", target=None))


@pytest.mark.parametrize("name", PIPELINES)
def test_metadata_lists_the_options_of_the_pipelines_groups(name: str) -> None:
    """A group that gains an option fails here until every template of a pipeline that takes it
    lists it."""
    options = {option.name: option for group in PIPELINES[name].GROUPS for option in group.options}
    meta = metadata(name)
    assert meta["name"] and meta["description"]
    names = [parameter["name"] for parameter in meta["parameters"]]
    assert sorted(names) == sorted(options)  # each once
    for parameter in meta["parameters"]:
        assert set(parameter) == {"name", "label", "helpText", "isOptional", "regexes"}
        assert parameter["label"].strip() and parameter["helpText"].strip()
        required = bool(options[parameter["name"]].required) or parameter["name"] in REQUIRED_ON_DATAFLOW
        assert parameter["isOptional"] is not required
        [pattern] = parameter["regexes"]
        assert pattern.startswith("^") and pattern.endswith("$")


def test_an_option_has_one_regex_in_every_template() -> None:
    """One regex per option, and per meaning: deidentify_dicom's destination is a store, not tables."""
    seen: dict[tuple[str, bool], str] = {}
    for name in PIPELINES:
        for option, parameter in parameters(name).items():
            meaning = (option, examples_of(name, option) is STORES)
            assert seen.setdefault(meaning, parameter["regexes"][0]) == parameter["regexes"][0], option


def test_every_option_has_examples() -> None:
    for module in PIPELINES.values():
        for option in module.PIPELINE.options:
            assert EXAMPLES[option].valid and EXAMPLES[option].invalid, option


@pytest.mark.parametrize(("name", "option", "value"), examples("valid"))
def test_valid_values_pass_regex_and_parser(name: str, option: str, value: str, request) -> None:
    assert regex(name, option).fullmatch(value)
    if option in ("filter_file", "metadata"):
        request.getfixturevalue("filter_in_gcs")
    PIPELINES[name].PIPELINE.parse(argv(name, **{option: value}))


@pytest.mark.parametrize(("name", "option", "value"), examples("invalid"))
def test_invalid_values_fail_regex_and_parser(name: str, option: str, value: str, request) -> None:
    assert not regex(name, option).fullmatch(value)
    if option in ("filter_file", "metadata"):
        request.getfixturevalue("filter_in_gcs")
    with pytest.raises((OptionError, SystemExit)):  # SystemExit: argparse's own refusal, also exit 2
        PIPELINES[name].PIPELINE.parse(argv(name, **{option: value}))


@pytest.mark.parametrize(("name", "option", "value"), examples("local"))
def test_local_paths_pass_only_the_parser(name: str, option: str, value: str) -> None:
    assert not regex(name, option).fullmatch(value)
    PIPELINES[name].PIPELINE.parse(argv(name, **{option: value}))


LAUNCHES = {
    "import_images": {
        "input": "gs://no-such-landing/photos/**.jpg",
        "store": "projects/p/locations/europe-west4/datasets/imaging/dicomStores/main",
        "sop_class": "vl_photographic",
        "metadata_destination": "bq://my-project.imaging.instances",
    },
    "import_dicom": {
        "input": "gs://no-such-landing/2026-11-23/**.dcm,gs://no-such-landing/extra/CT?.dcm",
        "store": "gs://no-such-archive/store",
        "metadata_destination": "bq://my-project.imaging.instances,gs://no-such-archive/metadata",
    },
    "export_dicom": {"store": "gs://no-such-archive/store", "filter_file": FILTER_URI, "file_type": "png"},
    "export_metadata": {
        "store": "projects/p/locations/europe-west4/datasets/imaging/dicomStores/main",
        "destination": "bq://my-project.imaging.instances,gs://no-such-archive/metadata",
        "filter_file": FILTER_URI,
    },
    "delete_dicom": {
        "store": "http://dicom.invalid/dicom-web",
        "filter_file": FILTER_URI,
        "metadata_destination": "bq://my-project.imaging.instances",
    },
    "deidentify_dicom": {
        "source": "projects/p/locations/europe-west4/datasets/imaging/dicomStores/main",
        "destination": "http://dicom.invalid/dicom-web",
        "filter_file": FILTER_URI,
        "config": '{"dicom": {"filterProfile": "DEIDENTIFY_TAG_CONTENTS"}}',
        "provenance_destination": "projects/p/locations/europe-west4/datasets/research/fhirStores/provenance",
        "deid_key_secret": "projects/p/secrets/deid-key/versions/1",
    },
}


class NetworkUsed(BaseException):
    """Not an Exception, so that no client library's retry loop swallows it: the test fails at once."""


@pytest.mark.parametrize("name", list(PIPELINES))
def test_launcher_builds_without_io(
    name: str, filter_in_gcs: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What a flex template launch does before submitting: parse (which reads the filter file, the one
    check the contract asks of the launcher), then build and serialize the graph, with no network: no
    listing of the patterns or stores that do not exist, no BigQuery, no credentials.

    `--dry_run=true` skips Beam's own look-up, when a Pipeline is made for Dataflow, of the temp
    bucket's soft-delete policy (a warning only); everything of ours runs as on the launcher."""
    module = PIPELINES[name]
    launch = [f"--template_location={tmp_path}/job_object", "--dry_run=true"]
    options = module.PIPELINE.parse(argv(name, **LAUNCHES[name]) + launch)
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise NetworkUsed(f"network access while the launcher builds the pipeline: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    start = time.monotonic()
    pipeline = beam.Pipeline(options=options)
    assert type(pipeline.runner).__name__ == "DataflowRunner"
    module.build(pipeline, options)
    proto = pipeline.to_runner_api()
    assert time.monotonic() - start < 30
    assert attempts == []
    assert len(proto.components.transforms) > 5


def launcher() -> ModuleType:
    """templates/launch.py, the image's FLEX_TEMPLATE_PYTHON_PY_FILE, loaded as the launcher runs it."""
    spec = importlib.util.spec_from_file_location("launch", TEMPLATES / "launch.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launcher_runs_the_launched_templates_pipeline(capsys: pytest.CaptureFixture[str]) -> None:
    """Each template's parameters, all of them or its required ones, lead to its own pipeline."""
    launch = launcher()
    # each marker is a required option of its template, and of no other pipeline but the one that
    # outranks it in launch.pipeline_for (--source over --destination, --sop_class over --input)
    shared = {
        "destination": ["export_metadata", "deidentify_dicom"],
        "input": ["import_dicom", "import_images"],
    }
    for marker, name in launch.MARKERS.items():
        assert PIPELINES[name].PIPELINE.options[marker] is True or marker in REQUIRED_ON_DATAFLOW
        takers = [other for other, module in PIPELINES.items() if marker in module.PIPELINE.options]
        assert takers == shared.get(marker, [name])
    for name, module in PIPELINES.items():
        others = [option for option in module.PIPELINE.options if option not in BASE[name]]
        everything = argv(name) + [f"--{option}=x" for option in others]
        assert launch.pipeline_for(argv(name)) == launch.pipeline_for(everything) == name
    assert launch.pipeline_for(DATAFLOW + ["--filter_file=gs://f/x.txt", "--store=gs://s"]) == "delete_dicom"
    assert launch.pipeline_for(["--destination=gs://d", "--source=gs://s"]) == "deidentify_dicom"
    assert launch.pipeline_for(["--input=gs://l/*.jpg", "--sop_class=vl_photographic"]) == "import_images"
    with pytest.raises(ValueError, match="export_dicom and import_dicom"):
        launch.pipeline_for(["--input=gs://a/*.dcm", "--output", "gs://b"])
    assert launch.main(["--input=gs://a/*.dcm", "--output=gs://b"]) == 2
    assert launch.main([*DATAFLOW, "--output=gs://archive/x"]) == 2  # export_dicom's own check: no --store
    assert capsys.readouterr().err.splitlines()[-1] == "error: --store: " + (
        "required: a directory, gs:// prefix, DICOMweb URL or Healthcare store"
    )


def test_template_launch_submits_and_exits_0(
    gcs: storage.Client, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flex template launch, as Dataflow's launcher runs templates/launch.py: the job's description
    is written to --template_location (Dataflow then starts the job), the staged files beside it, and
    the program prints the job's id and state and exits 0. Only the GCS emulator, on loopback, is used."""
    if not gcs.bucket("dicom-etl-staging").exists():
        gcs.create_bucket("dicom-etl-staging")
    job = "gs://dicom-etl-staging/staging/template_launches/2026-11-23_01_02_03-4242/job_object"
    outside: list[object] = []
    connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address: object) -> None:
        if not (isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1")):
            outside.append(address)
            raise NetworkUsed(f"connection to {address} during a launch")
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    status = launcher().main(
        [
            "--runner=DataflowRunner",
            "--project=my-project",
            "--region=europe-west4",
            "--temp_location=gs://dicom-etl-staging/tmp",
            "--staging_location=gs://dicom-etl-staging/staging",
            f"--template_location={job}",
            *(f"--{key}={value}" for key, value in LAUNCHES["import_dicom"].items()),
        ]
    )
    assert outside == []
    assert gcs.bucket("dicom-etl-staging").blob(job[len("gs://dicom-etl-staging/") :]).exists()
    assert status == 0, capsys.readouterr().err[-2000:]
    assert set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])) >= {"job_id", "state"}


DOCKERFILE = TEMPLATES / "Dockerfile"
FLEX_SH = TEMPLATES / "flex.sh"


def dockerfile_bases() -> list[str]:
    """The images the Dockerfile's stages start from, its ARG defaults substituted."""
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    froms = re.findall(r"^FROM (?:--platform=(\S+) )?(\S+)", text, re.MULTILINE)
    assert all(platform == "linux/amd64" for platform, _ in froms), froms  # Dataflow workers are x86-64
    return [re.sub(r"\$\{(\w+)\}", lambda match: args[match.group(1)], image) for _, image in froms]


def test_the_image_starts_from_pinned_bases() -> None:
    """A mutable tag (`:latest`, or none) would let a rebuild of the same commit take other code."""
    launcher, beam_sdk = dockerfile_bases()
    assert re.fullmatch(
        r"gcr\.io/dataflow-templates-base/python311-template-launcher-base:\d{8}_RC\d\d", launcher
    )
    assert re.fullmatch(r"apache/beam_python3\.11_sdk:\d+\.\d+\.\d+", beam_sdk)


def test_the_image_holds_every_package_of_the_project() -> None:
    """The Dockerfile copies, its .dockerignore lets through, and flex.sh tags the image by, every
    package pyproject.toml installs: a package left out would be missing on every worker."""
    found = tomllib.loads((TEMPLATES.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    packages = [pattern.rstrip("*") for pattern in found["find"]["include"]]
    dockerfile = DOCKERFILE.read_text()
    let_through = (TEMPLATES / "Dockerfile.dockerignore").read_text().splitlines()
    [image_files] = re.findall(r'^IMAGE_FILES="([^"]*)"', FLEX_SH.read_text(), re.MULTILINE)
    for package in packages:
        assert f"COPY {package}/ {package}/" in dockerfile, package
        assert f"!{package}" in let_through, package
        assert package in image_files.split(), package


def test_the_image_installs_the_project_once_for_launcher_and_workers() -> None:
    """As Google's sample does: the package and its dependencies are in the image, built by a pinned
    setuptools and checked by `pip check`; no FLEX_TEMPLATE_PYTHON_SETUP_FILE, so that no worker
    builds and installs it again at start."""
    text = DOCKERFILE.read_text()
    [setuptools] = re.findall(r"'setuptools==(\d+\.\d+\.\d+)'", text)
    assert tuple(map(int, setuptools.split("."))) >= (77, 0, 0)  # the SPDX license string
    assert "pip install --no-cache-dir --no-build-isolation /template" in text
    assert "&& pip check" in text
    assert "ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/template/templates/launch.py" in text
    assert not re.search(
        r"^ENV (FLEX_TEMPLATE_PYTHON_SETUP_FILE|FLEX_TEMPLATE_PYTHON_REQUIREMENTS_FILE|PIP_)",
        text,
        re.MULTILINE,
    )
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in text


# A template spec as `gcloud dataflow flex-template build` writes it (the parts flex.sh reads).
SPEC = {
    "image": "europe-west4-docker.pkg.dev/p/dicom-etl/dicom-etl:0123456789ab",
    "sdkInfo": {"language": "PYTHON"},
}
STUB = """#!/usr/bin/env bash
# {tool}, as flex.sh calls it: each call is logged; nothing is built, pushed or launched.
echo "{tool} $*" >> "$STUB_LOG"
case "$*" in
  "manifest inspect "*) [ "${{STUB_IN_REGISTRY:-}}" = yes ] ;;
  "storage cat "*) echo '{spec}' ;;
esac
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A git checkout of the files flex.sh works on, committed, with docker and gcloud stubs."""
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(TEMPLATES.parent / name, root / name)
    for name in ("pipelines", "transforms", "schemas", "templates"):
        shutil.copytree(TEMPLATES.parent / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    git = [
        "git",
        "-C",
        str(root),
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.org",
        "-c",
        "commit.gpgsign=false",
    ]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "the checkout"], check=True)
    (tmp_path / "bin").mkdir()
    for tool in ("docker", "gcloud"):
        (tmp_path / "bin" / tool).write_text(STUB.format(tool=tool, spec=json.dumps(SPEC)))
        (tmp_path / "bin" / tool).chmod(0o755)
    return root


def flex(checkout: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    log = checkout.parent / "calls.log"
    log.unlink(missing_ok=True)
    environment = dict(
        os.environ, PROJECT="p", REGION="europe-west4", BUCKET="gs://b/dicom-etl/", STUB_LOG=str(log)
    )
    environment["PATH"] = f"{checkout.parent / 'bin'}:{os.environ['PATH']}"
    environment.update(env)
    done = subprocess.run(
        ["bash", str(checkout / "templates" / "flex.sh"), *args],
        env=environment,
        capture_output=True,
        text=True,
    )
    return done, log.read_text().splitlines() if log.exists() else []


def test_flex_sh_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(FLEX_SH)], check=True)


def test_build_tags_the_image_with_its_commit_for_linux_amd64(checkout: Path) -> None:
    commit = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short=12", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    image = f"europe-west4-docker.pkg.dev/p/dicom-etl/dicom-etl:{commit}"
    done, calls = flex(checkout, "build")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == image
    assert calls[:3] == [
        f"docker manifest inspect {image}",
        f"docker build --platform linux/amd64 -f templates/Dockerfile -t {image} .",
        f"docker push {image}",
    ]
    assert calls[3:] == [
        f"gcloud dataflow flex-template build gs://b/dicom-etl/templates/{name}.json --project=p "
        f"--image={image} --sdk-language=PYTHON --metadata-file=templates/{name}/metadata.json"
        for name in PIPELINES
    ]


def test_build_does_not_rebuild_a_tag_the_registry_has(checkout: Path) -> None:
    done, calls = flex(checkout, "build", STUB_IN_REGISTRY="yes")
    assert done.returncode == 0, done.stderr
    assert "in the registry already: not rebuilt" in done.stderr
    assert not [call for call in calls if call.startswith(("docker build", "docker push"))]
    built = [call for call in calls if call.startswith("gcloud dataflow flex-template build")]
    assert len(built) == len(PIPELINES)


@pytest.mark.parametrize(
    "change", ["pipelines/import_dicom.py", "templates/Dockerfile", "transforms/new_module.py"]
)
def test_build_refuses_a_checkout_that_differs_from_its_commit(checkout: Path, change: str) -> None:
    with (checkout / change).open("a") as file:
        file.write("\n# not committed\n")
    done, calls = flex(checkout, "build")
    assert done.returncode == 1
    assert "commit them first" in done.stderr and change in done.stderr
    assert calls == []


def test_run_gives_the_workers_the_templates_own_image(checkout: Path) -> None:
    done, calls = flex(
        checkout, "run", "import_dicom", "input=gs://landing/a/**.dcm,gs://landing/b/*.dcm", "store=gs://s"
    )
    assert done.returncode == 0, done.stderr
    assert calls[0] == "gcloud storage cat gs://b/dicom-etl/templates/import_dicom.json"
    assert calls[1].startswith("gcloud dataflow flex-template run import-dicom-")
    assert calls[1].endswith(
        "--parameters=^~^sdk_container_image=europe-west4-docker.pkg.dev/p/dicom-etl/dicom-etl:0123456789ab"
        "~input=gs://landing/a/**.dcm,gs://landing/b/*.dcm~store=gs://s"
    )


def test_run_passes_flags_to_gcloud_and_the_rest_as_parameters(checkout: Path) -> None:
    done, calls = flex(
        checkout,
        "run",
        "import_dicom",
        "--max-workers=8",
        "input=gs://landing/**.dcm",
        "--worker-machine-type=n1-standard-4",
        "store=gs://s",
    )
    assert done.returncode == 0, done.stderr
    assert " --max-workers=8 --worker-machine-type=n1-standard-4 --parameters=" in calls[1]
    assert calls[1].endswith("~input=gs://landing/**.dcm~store=gs://s")
