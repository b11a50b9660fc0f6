"""The command line as a user meets it: exit codes, one-line errors, the summary as last line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.import_dicom", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.parametrize(
    ("args", "option", "words"),
    [
        ([], "--input", "required"),
        (["--input=x/**.dcm"], "--store", "required"),
        (["--input=gs://b/a/**/x.dcm", "--store=s"], "--input", "'**' must stand at the end"),
        (["--input=gs://b/a/*/**", "--store=s"], "--input", "no other wildcard"),
        (["--input=a/**", "--store=ftp://host/x"], "--store", "neither a local path nor gs://"),
        (["--input=a/**", "--store=s", "--dead_letter=gs://"], "--dead_letter", "no bucket name"),
        (["--input=a/**", "--store=https://u:pw@host/dicom-web"], "--store", "not in the URL"),
        (["--input=a/**", "--store=http:///dicom-web"], "--store", "not a DICOMweb service root"),
        (["--input=a/**", "--store=projects/p/locations/l/datasets/d"], "--store", "dicomStores/S"),
        (["--input=a/**", "--store=http://h/dw", "--storage_class=COLD"], "--storage_class", "one of"),
        (["--input=a/**", "--store=s", "--storage_class=ARCHIVE"], "--storage_class", "DICOMweb and"),
    ],
)
def test_bad_options_exit_2_with_one_line(tmp_path: Path, args: list[str], option: str, words: str) -> None:
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {option}:") and words in line
    assert "pw@" not in line
    assert not list(tmp_path.iterdir()), "nothing may be done before the options are checked"


def test_a_run_prints_its_summary_last_and_exits_0(tmp_path: Path) -> None:
    source = Path(get_testdata_file("MR_small.dcm"))
    result = cli(f"--input={source}", "--store=store", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["matched"] == summary["success"] == 1 and summary["failure"] == 0
    assert len(list((tmp_path / "store").rglob("*.dcm"))) == 1
    assert not list((tmp_path / "dead_letter").glob("*")), "no failures, no dead-letter file"


def test_failures_exit_3_and_go_to_the_default_dead_letter(tmp_path: Path) -> None:
    (tmp_path / "junk.dcm").write_text("not dicom")
    result = cli("--input=junk.dcm", "--store=store", cwd=tmp_path)
    assert result.returncode == 3
    assert json.loads(result.stdout.strip().splitlines()[-1])["failure"] == 1
    [dead] = (tmp_path / "dead_letter").glob("import_dicom-*.jsonl")
    record = json.loads(dead.read_text())
    assert record["reason"] == "not_dicom" and record["uri"] == str(tmp_path / "junk.dcm")


def test_console_script_runs_the_same_pipeline(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "dicom-etl"
    result = subprocess.run([str(script), "import_dicom"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "--input: required" in result.stderr


def test_console_script_runs_the_export_too(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "dicom-etl"
    result = subprocess.run([str(script), "export_dicom"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "--store: required" in result.stderr
