"""1,000+ hostile variants of real files through import, export_metadata and export_dicom (png):
every file ends stored or as a dead letter with a reason, every run ends with its summary line,
and nothing is written outside the store, whatever the files contain."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pydicom
import pytest

from tests.conftest import stored_instances
from tests.mutants import MUTATIONS, make_mutants

SOURCES = 36
PER_SOURCE = 30
ROOT = Path(__file__).resolve().parents[1]


def valid_small_sources(corpus: list[Path]) -> list[Path]:
    """Corpus files under 150 KB that pydicom reads, spread over the corpus's kinds."""
    found = []
    for path in corpus:
        if path.stat().st_size > 150_000 or path.suffix not in (".dcm", ""):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID  # noqa: B018
        except Exception:
            continue
        found.append(path)
    step = max(1, len(found) // SOURCES)
    return found[::step][:SOURCES]


def pipeline(name: str, *args: str, cwd: Path) -> tuple[int, dict, str]:
    """Run a pipeline as a user does; its exit status, summary line and stderr."""
    done = subprocess.run(
        [sys.executable, "-m", f"pipelines.{name}", *args],
        cwd=cwd, capture_output=True, text=True, timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )  # fmt: skip
    lines = done.stdout.strip().splitlines()
    return done.returncode, json.loads(lines[-1]) if lines else {}, done.stderr


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, corpus: list[Path]) -> tuple[Path, list[Path]]:
    work = tmp_path_factory.mktemp("fuzz")
    sources = valid_small_sources(corpus)
    assert len(sources) >= 30
    mutants = make_mutants(sources, PER_SOURCE, work / "in")
    assert len(mutants) >= 1000
    return work, mutants


def test_every_mutant_ends_stored_or_as_a_dead_letter(fuzzed: tuple[Path, list[Path]]) -> None:
    work, mutants = fuzzed
    status, summary, stderr = pipeline("import_dicom", "--input=in/*.dcm", "--store=store", cwd=work)
    assert status == 3 and "Traceback" not in stderr and "panicked" not in stderr, stderr[-2000:]
    assert summary["matched"] == len(mutants)
    assert summary["matched"] == summary["success"] + summary["already_present"] + summary["failure"]
    dead = [json.loads(line) for f in (work / "dead_letter").glob("*.jsonl") for line in f.open()]
    assert len(dead) == summary["failure"] and all(record["reason"] for record in dead)
    failed = {record["uri"] for record in dead}
    assert len(failed) == len(dead)  # one dead letter per failed file
    stored = stored_instances(work / "store")
    assert len(stored) == summary["success"]
    sources = {digest(path) for path in mutants}
    assert all(digest(path) in sources for path in stored.values())  # byte-identical to an input
    survivors = {path.name.split("-")[2][:-4] for path in mutants if str(path) not in failed}
    assert len(stored) > len(mutants) // 5  # enough survive that export is tested too
    assert len(survivors) >= len(MUTATIONS) - 2  # a length past the end, or a cut, rarely passes
    reasons = {record["reason"] for record in dead}
    assert {"malformed", "truncated", "invalid_uid", "conflict"} <= reasons, reasons
    outside = {p.relative_to(work).parts[0] for p in work.rglob("*") if p.is_file()}
    assert outside == {"in", "store", "dead_letter"}


def test_the_fuzzed_store_exports_metadata_and_images(fuzzed: tuple[Path, list[Path]]) -> None:
    work, _ = fuzzed
    if not (work / "store").is_dir():
        pipeline("import_dicom", "--input=in/*.dcm", "--store=store", cwd=work)
    stored = len(stored_instances(work / "store"))
    status, summary, stderr = pipeline(
        "export_metadata", "--store=store", "--destination=meta", "--dead_letter=dl_meta", cwd=work
    )
    assert status in (0, 3) and "Traceback" not in stderr, stderr[-2000:]
    assert summary["selected"] == stored == summary["success"] + summary["failure"]
    status, summary, stderr = pipeline(
        "export_dicom", "--store=store", "--output=png", "--file_type=png", "--dead_letter=dl_png", cwd=work
    )
    assert status in (0, 3) and "Traceback" not in stderr and "panicked" not in stderr, stderr[-2000:]
    assert summary["selected"] == stored == summary["success"] + summary["failure"]
    assert set(summary["failure_reasons"]) <= {"cannot_convert", "no_pixel_data", "too_large"}
    images = stored - summary["failure_reasons"].get("no_pixel_data", 0)
    assert summary["success"] > images * 3 // 4  # most stored images still render
