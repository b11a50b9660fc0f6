"""Count and CountFailures in a TestPipeline: elements pass on unchanged and are counted where the
launcher's progress line reads them."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.testing.util import assert_that, equal_to

from pipelines import progress_lines
from tests.beam_support import new_pipeline, run
from transforms import progress
from transforms.dead_letter import failure


def test_count_and_count_failures_pass_elements_on_and_count_them_for_the_progress_line() -> None:
    letters = [
        failure("/a.dcm", "parse", "not_dicom").value,
        failure("/b.dcm", "parse", "not_dicom").value,
        failure("/studies/1.2", "select", "no_match").value,
    ]
    with progress_lines.Reporter("test", interval=3600) as reporter:
        pipeline = new_pipeline()
        items = pipeline | "Items" >> beam.Create(["x", "y", "z"]) | progress.Count("matched")
        failures = progress.count_failures([pipeline | "Letters" >> beam.Create(letters)])
        assert_that(items, equal_to(["x", "y", "z"]))
        assert_that(failures[0], equal_to(letters), label="Failures")
        run(pipeline)
        counts = reporter.counts()

    assert counts == {"matched": 3, "failure_not_dicom": 2, "failure_no_match": 1}
    assert progress_lines.done(counts) == 2  # a line that matched nothing is no item
