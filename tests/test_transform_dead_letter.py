"""failure() and WriteDeadLetters alone in a TestPipeline: one JSON line per failed item, in files
of their own per run, counted by reason."""

from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from tests.beam_support import counters, new_pipeline, run
from transforms import dead_letter
from transforms.dead_letter import DEAD_LETTER, WriteDeadLetters, failure


def records_in(directory: Path) -> list[dict]:
    return [json.loads(line) for path in directory.glob("*.jsonl") for line in path.read_text().splitlines()]


def test_failure_is_a_record_on_the_dead_letter_output() -> None:
    output = failure("gs://b/x.dcm", "parse", "not_dicom", "no DICM")

    assert output.tag == DEAD_LETTER
    assert output.value == {
        "uri": "gs://b/x.dcm",
        "stage": "parse",
        "reason": "not_dicom",
        "detail": "no DICM",
    }


def test_write_dead_letters_writes_each_record_as_a_json_line_and_counts_it_by_reason(tmp_path: Path) -> None:
    """A run's own file, named for the run; an earlier run's file is kept; nothing else is left."""
    directory = tmp_path / "dead_letter"
    directory.mkdir()
    (directory / "import_dicom-earlier-0.jsonl").write_text('{"uri": "old"}\n')
    records = [
        failure("/a.dcm", "parse", "not_dicom").value,
        failure("/b.dcm", "parse", "not_dicom", "no DICM").value,
        failure("/c.dcm", "store", "conflict", "other bytes").value,
    ]
    pipeline = new_pipeline()
    paths = pipeline | beam.Create(records) | WriteDeadLetters(str(directory), "import_dicom-now")

    def one_file_of_this_run(found: list[str]) -> None:
        assert len(found) == 1 and Path(found[0]).name.startswith("import_dicom-now-"), found
        assert found[0].endswith(".jsonl") and Path(found[0]).parent == directory, found

    assert_that(paths, one_file_of_this_run)
    result = run(pipeline)

    assert counters(result) == {"failure_not_dicom": 2, "failure_conflict": 1}
    assert sorted(records_in(directory), key=lambda r: r["uri"]) == [*records, {"uri": "old"}]
    assert len(list(directory.iterdir())) == 2  # the two files, no staging directory


def test_write_dead_letters_writes_no_file_for_a_run_without_failures(tmp_path: Path) -> None:
    directory = tmp_path / "dead_letter"
    pipeline = new_pipeline()
    paths = pipeline | beam.Create([]) | WriteDeadLetters(str(directory), "import_dicom-now")

    assert_that(paths, equal_to([]))
    run(pipeline)

    assert list(directory.glob("*.jsonl")) == []


def test_write_dead_letters_starts_another_file_after_lines_per_file_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dead_letter, "LINES_PER_FILE", 3)  # LINES_PER_FILE of them: too slow a test
    directory = tmp_path / "dead_letter"
    records = [failure(f"/{n}.dcm", "parse", "truncated").value for n in range(7)]
    pipeline = new_pipeline()
    _ = pipeline | beam.Create(records) | WriteDeadLetters(str(directory), "import_dicom-now")
    result = run(pipeline)

    sizes = sorted(len(path.read_text().splitlines()) for path in directory.glob("*.jsonl"))
    assert sizes == [1, 3, 3]
    assert sorted(records_in(directory), key=lambda r: int(r["uri"][1:-4])) == records
    assert counters(result) == {"failure_truncated": 7}
