"""The command line as a user meets it, through the real entry points (`python -m pipelines.X` and
`dicom-etl X`, subprocesses of the project's interpreter): `--help`, mistakes refused before any work
(exit 2, one line on stderr, nothing on stdout, nothing written), a failed run in one line (exit 1,
with the JSON summary of what was known and an "error"), failed items in one line (exit 3)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pipelines import delete_dicom, export_dicom, export_metadata, import_dicom, import_images
from pipelines.options.base import OptionError
from pipelines.summary import failure_line, summarize
from tests.command_line import ENTRIES, SAMPLE, Place, SilentServer, interrupted_import
from tests.orthanc_server import Orthanc

PIPELINES = {
    "import_dicom": import_dicom,
    "export_dicom": export_dicom,
    "export_metadata": export_metadata,
    "delete_dicom": delete_dicom,
    "import_images": import_images,
}
MR_SERIES = sorted(str(path) for path in (SAMPLE / "mr" / "98892003").glob("*.dcm"))
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"


@pytest.fixture
def place(tmp_path: Path) -> Place:
    return Place(tmp_path)


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample, imported once into a file-layout store that the tests only read."""
    place = Place(tmp_path_factory.mktemp("sample_store"))
    result = place.run("script", "import_dicom", f"--input={SAMPLE}/**.dcm", "--store=store")
    assert result.status == 0, result.stderr
    return place.cwd / "store"


def refused(place: Place, entry: str, pipeline: str, *args: str) -> str:
    """Run a command line that must be refused before any work; its one stderr line."""
    before = place.written()
    result = place.run(entry, pipeline, *args)
    assert (result.status, result.stdout) == (2, ""), result.stderr
    [line] = result.err
    assert place.written() == before, "nothing may be written before the options are checked"
    return line


# 1. --help


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_help_lists_the_pipelines_own_options(place: Place, entry: str, pipeline: str) -> None:
    result = place.run(entry, pipeline, "--help")
    assert (result.status, result.stderr) == (0, "")
    text = " ".join(result.stdout.split())
    listed = set(re.findall(r"^ {2}(?:-h, )?(--\w+)", result.stdout, flags=re.MULTILINE))
    options = PIPELINES[pipeline].PIPELINE.options
    assert listed == {f"--{option}" for option in options} | {"--verbose", "--help"}
    for option, required in options.items():
        block = re.search(rf"^ {{2}}--{option}\b.*?(?=^ {{2}}-|\Z)", result.stdout, re.MULTILINE | re.DOTALL)
        assert block and len(block[0].split()) > 4, f"--{option} has no help text"
        assert ("Required." in block[0]) is required, option
    assert "Apache Beam and Dataflow options pass through" in text and "--runner" in text
    assert f"dicom-etl {pipeline}" in text and f"python -m pipelines.{pipeline}" in text
    assert not list(place.cwd.iterdir())


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_dicom_etl_help_lists_the_four_pipelines_one_line_each(place: Place, flag: str) -> None:
    result = place.run("script", flag)  # `dicom-etl --help`
    assert (result.status, result.stderr) == (0, "")
    for pipeline, module in PIPELINES.items():
        [line] = [line for line in result.out if line.split()[:1] == [pipeline]]
        assert module.__doc__.splitlines()[0] in line


@pytest.mark.parametrize(
    ("name", "words"),
    [("import_dcm", "unknown pipeline 'import_dcm', did you mean import_dicom?"), ("", "name a pipeline")],
)
def test_an_unknown_pipeline_is_one_line_and_exit_2(place: Place, name: str, words: str) -> None:
    result = place.run("script", name)
    assert (result.status, result.stdout) == (2, "")
    [line] = result.err
    assert line.startswith(f"error: {words}") and "import_dicom, export_dicom" in line


# 2. Anything that is neither our option nor a Beam or Dataflow option


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ["--metadata_destinaton=./meta"],
            "--metadata_destinaton: unknown option (did you mean --metadata_destination?)",
        ),
        (["--stroage_class=NEARLINE"], "--stroage_class: unknown option (did you mean --storage_class?)"),
        (["--stroage_class", "NEARLINE"], "--stroage_class: unknown option (did you mean --storage_class?)"),
        (["--filter_file=f.txt"], "--filter_file: not an option of this pipeline"),
        (["-x"], "-x: unknown option"),
        (MR_SERIES[1:], f"unexpected arguments '{MR_SERIES[1]}'"),  # `--input dir/*.dcm`, unquoted
    ],
)
def test_an_unknown_option_or_a_stray_argument_is_refused(
    place: Place, entry: str, args: list[str], words: str
) -> None:
    line = refused(place, entry, "import_dicom", "--store=store", "--input", MR_SERIES[0], *args)
    assert line.startswith(f"error: {words}")


def test_an_unquoted_pattern_gets_a_hint(place: Place) -> None:
    line = refused(place, "script", "import_dicom", "--store=store", "--input", *MR_SERIES)
    assert f"and {len(MR_SERIES) - 4} more" in line and "quote a value with wildcards" in line


def test_beam_and_dataflow_options_pass_through(place: Place) -> None:
    """A local run with Beam's options, and a Dataflow launch's command line, as parsed."""
    beam_options = ["--direct_num_workers=1", "--direct_running_mode=in_memory", "--project=my-project"]
    beam_options += ["--region=europe-west4", "--job_name=try", "--experiments=a,b", "--labels=k=v"]
    result = place.run("script", "import_dicom", f"--input={MR_SERIES[0]}", "--store=store", *beam_options)
    assert (result.status, result.err, result.summary["success"]) == (0, [], 1)
    dataflow = [
        "--runner=DataflowRunner",
        "--project=my-project",
        "--region=europe-west4",
        "--temp_location=gs://bucket/tmp",
        "--staging_location=gs://bucket/staging",
        "--template_location=gs://bucket/templates/job_object",
        "--setup_file=./setup.py",
        "--sdk_container_image=europe-west4-docker.pkg.dev/p/r/dicom-etl:latest",
        "--service_account_email=runner@my-project.iam.gserviceaccount.com",
        "--max_num_workers=10",
        "--worker_machine_type=n2-standard-4",
        "--network=default",
        "--no_use_public_ips",
        "--labels=goog-dataflow-provided-template-type=flex",
        "--dataflow_service_options=enable_prime",
    ]
    import_dicom.PIPELINE.parse([*dataflow, "--input=gs://landing/**.dcm", "--store=gs://archive/store"])
    with pytest.raises(OptionError, match="--storage_clas: unknown option"):
        import_dicom.PIPELINE.parse(
            [*dataflow, "--input=gs://l/**", "--store=gs://a/s", "--storage_clas=COLDLINE"]
        )


# 3. Values of the wrong type


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--max_columns=abc"], "error: --max_columns: 'abc' is not a whole number"),
        (["--verify_stored=maybe"], "error: --verify_stored: 'maybe' is not true or false"),
        (["--direct_running_mode=fast"], "error: --direct_running_mode: invalid choice: 'fast'"),
        (["--max_columns"], "error: --max_columns: expected one argument"),
    ],
)
def test_a_value_of_the_wrong_type_is_one_line(place: Place, entry: str, args: list[str], line: str) -> None:
    got = refused(
        place, entry, "import_dicom", f"--input={MR_SERIES[0]}", "--store=http://127.0.0.1:9/dw", *args
    )
    assert got.startswith(line)


# 4. Paths checked before any work, without the network


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(
    ("pipeline", "args", "line"),
    [
        (
            "export_dicom",
            ["--store=/nonexistent/store", "--output=out"],
            "--store: /nonexistent/store does not exist",
        ),
        ("export_metadata", ["--store=./stroe", "--destination=meta"], "--store: {cwd}/stroe does not exist"),
        ("delete_dicom", ["--store=./stroe", "--target=/studies/1.2"], "--store: {cwd}/stroe does not exist"),
        ("import_dicom", ["--input=x.dcm", "--store=FILE"], "--store: {cwd}/FILE is a file, not a directory"),
        ("import_dicom", ["--input=x.dcm", "--store=FILE/store"], "--store: {cwd}/FILE is a file, so"),
        ("export_dicom", ["--store=DIR", "--output=FILE"], "--output: {cwd}/FILE is a file, not a directory"),
        (
            "import_dicom",
            ["--input=x.dcm", "--store=s", "--metadata_destination=FILE"],
            "--metadata_destination: {cwd}/FILE is a file, not a directory",
        ),
        (
            "export_metadata",
            ["--store=DIR", "--destination=FILE"],
            "--destination: {cwd}/FILE is a file, not a directory",
        ),
        (
            "import_dicom",
            ["--input=x.dcm", "--store=s", "--dead_letter=FILE"],
            "--dead_letter: {cwd}/FILE is a file",
        ),
        ("export_dicom", ["--store=DIR", "--output=./out"], "--dead_letter: {cwd}/dead_letter is a file"),
        (
            "export_dicom",
            ["--store=DIR", "--output=gs:/bucket/x"],
            "--output: 'gs:/bucket/x' is malformed: write gs://",
        ),
        (
            "import_dicom",
            ["--input=gs:/bucket/*.dcm", "--store=s"],
            "--input: 'gs:/bucket/*.dcm' is malformed",
        ),
        (
            "export_dicom",
            ["--store=http:/host/dicom-web", "--output=out"],
            "--store: 'http:/host/dicom-web' is malformed",
        ),
        (
            "export_dicom",
            ["--store=DIR", "--output=GS://bucket/x"],
            "--output: 'GS://bucket/x' is neither a local",
        ),
    ],
)
def test_a_bad_local_path_or_malformed_location_stops_before_any_work(
    place: Place, entry: str, pipeline: str, args: list[str], line: str
) -> None:
    (place.cwd / "FILE").write_text("a file")
    (place.cwd / "DIR").mkdir()
    if "--output=./out" in args:
        (place.cwd / "dead_letter").write_text("a file where the default dead-letter directory goes")
    args = [
        arg.replace("FILE", str(place.cwd / "FILE")).replace("DIR", str(place.cwd / "DIR")) for arg in args
    ]
    got = refused(place, entry, pipeline, *args)
    assert got.startswith(f"error: {line.format(cwd=place.cwd)}")


# 6. A failed run: one line on stderr, details in the log file, the summary of what was known


def test_write_empty_on_a_table_with_rows_is_one_line_and_a_json_with_the_error(
    place: Place, sample_store: Path
) -> None:
    first = place.run("script", "export_metadata", f"--store={sample_store}", "--destination=meta")
    assert (first.status, first.err) == (0, [])
    table = sorted(path.name for path in (place.cwd / "meta").iterdir())

    result = place.run("module", "export_metadata", f"--store={sample_store}", "--destination=meta")

    assert result.status == 1
    [line] = result.err
    reason = f"the pipeline failed: {place.cwd / 'meta'} is not empty (--write_disposition=WRITE_EMPTY)"
    [log] = place.tmp.glob("dicom-etl-export_metadata-*.log")
    assert line == f"error: {reason}"
    assert "Traceback" in log.read_text() and log.stat().st_mode & 0o077 == 0
    assert result.summary["error"] == reason and result.summary["log"] == str(log)
    assert {"success", "failure"} <= set(result.summary)
    assert sorted(path.name for path in (place.cwd / "meta").iterdir()) == table

    verbose = place.run(
        "script", "export_metadata", f"--store={sample_store}", "--destination=meta", "--verbose"
    )
    assert verbose.status == 1 and "Traceback" in verbose.stderr and verbose.err[-1] == line


def test_a_refused_credential_is_one_line(place: Place, orthanc: Orthanc) -> None:
    result = place.run(
        "script",
        "import_dicom",
        f"--input={SAMPLE}/**.dcm",
        f"--store={orthanc.dicomweb}",
        DICOMWEB_USERNAME=orthanc.username,
        DICOMWEB_PASSWORD="not-the-password",
    )
    assert result.status == 1
    [line] = result.err
    assert line.startswith(f"error: the pipeline failed: the DICOMweb store {orthanc.dicomweb} refused our")
    assert "not-the-password" not in result.stderr + result.stdout
    assert result.summary["success"] == 0 and "HTTP 401" in result.summary["error"]
    assert orthanc.instance_count() == 0


@pytest.mark.parametrize("mode", ["in_memory", "multi_processing"])
def test_ctrl_c_is_one_line_and_a_json_of_what_was_counted(
    place: Place, silent_store: SilentServer, mode: str
) -> None:
    result = interrupted_import(place, silent_store, mode, after=1.0)  # workers publish twice a second

    assert result.status == 1
    assert result.err == ["error: interrupted (Ctrl-C)"]
    summary = result.summary
    assert Path(summary.pop("log", place.tmp)).exists()  # what the workers logged, if anything
    assert summary == {
        "matched": 19,
        "success": 0,
        "failure": 0,
        "unmatched_patterns": 0,
        "failure_reasons": {},
        "error": "interrupted (Ctrl-C)",
    }


def test_expected_item_failures_are_counted_not_printed(place: Place, sample_store: Path) -> None:
    """JPEG 2000 refuses the sample's small images: what the codec says goes to the log file, which a
    run that did not fail does not keep."""
    args = [f"--store={sample_store}", "--output=out", f"--transfer_syntax={JPEG_2000_LOSSLESS}"]
    result = place.run("script", "export_dicom", *args)
    assert result.status == 3
    [line] = result.err
    assert line.startswith("error: 13 of 19 instances failed (cannot_convert 13)")
    assert not [path for path in place.tmp.rglob("*") if not path.is_dir()]


# 7. Failed items: one line with how many, the main reasons and the dead letters


@pytest.mark.parametrize("entry", ENTRIES)
def test_failed_items_are_one_line_naming_count_reasons_and_dead_letters(place: Place, entry: str) -> None:
    for name in ("a.dcm", "b.dcm", "c.dcm"):
        (place.cwd / name).write_text("not dicom")
    shutil.copy(SAMPLE / "ct" / "CT_small.dcm", place.cwd / "ct.dcm")

    result = place.run(entry, "import_dicom", "--input=*.dcm", "--input=none/*.dcm", "--store=store")

    assert result.status == 3
    [line] = result.err
    dead_letter = place.cwd / "dead_letter"
    assert line == (
        "error: 3 of 4 files failed; 1 pattern matched nothing (not_dicom 3, no_match 1); "
        f"the dead letters are in {dead_letter}"
    )
    records = [
        json.loads(text) for path in dead_letter.glob("*.jsonl") for text in path.read_text().splitlines()
    ]
    assert sorted(record["reason"] for record in records) == [
        "no_match",
        "not_dicom",
        "not_dicom",
        "not_dicom",
    ]
    assert result.summary["success"] == 1


def test_a_pattern_that_matches_nothing_is_one_line(place: Place) -> None:
    result = place.run("module", "import_dicom", "--input=incoming/**.dcm", "--store=store")
    assert result.status == 3
    assert result.err == [
        f"error: 1 pattern matched nothing (no_match 1); the dead letters are in {place.cwd / 'dead_letter'}"
    ]


# A run that works


def test_a_run_prints_its_summary_last_and_nothing_on_stderr(place: Place) -> None:
    result = place.run("module", "import_dicom", f"--input={MR_SERIES[0]}", "--store=store")
    assert (result.status, result.err) == (0, [])  # also no progress line: the run takes under 10 s
    summary = result.summary
    assert summary["matched"] == summary["success"] == 1 and summary["failure"] == 0
    assert len(list((place.cwd / "store").rglob("*.dcm"))) == 1
    assert not (place.cwd / "dead_letter").exists() or not list((place.cwd / "dead_letter").iterdir())
    assert not [p for p in place.tmp.rglob("*") if not p.is_dir()], "a run that did not fail keeps no log"


def test_an_option_for_dicomweb_stores_is_refused_on_a_file_layout_store(place: Place) -> None:
    for option in ("--verify_stored", "--storage_class=NEARLINE", "--max_requests_in_flight=2"):
        line = refused(place, "script", "import_dicom", "--store=store", "--input", MR_SERIES[0], option)
        assert line.endswith("applies to DICOMweb and Cloud Healthcare API stores only"), line


def test_the_exit_3_line_counts_metadata_rows_that_could_not_be_made() -> None:
    """A stored instance whose row fails is no failed file: the line says so, with its reason."""
    counts = {"matched": 3, "success": 3, "metadata_failures": 1, "failure_read_error": 1}
    summary, failed = summarize(import_dicom.SUMMARY, counts)

    assert failed
    assert failure_line(summary, "/srv/dl") == (
        "error: 1 metadata row could not be made (read_error 1); the dead letters are in /srv/dl"
    )
