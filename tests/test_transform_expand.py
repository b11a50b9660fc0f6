"""ExpandPatterns alone in a TestPipeline: the files each pattern matches, a pattern that matches
nothing, and a listing that fails."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import apache_beam as beam
import pytest

from dicomlib.wildcard import parse_pattern
from tests.beam_support import SAMPLE, counters, expect_outputs, letters, matched, new_pipeline, run
from transforms.dead_letter import DEAD_LETTER
from transforms.expand import ExpandPatterns


def expand(*patterns: str) -> tuple[beam.Pipeline, beam.pvalue.DoOutputsTuple]:
    pipeline = new_pipeline()
    outputs = (
        pipeline
        | beam.Create([parse_pattern(text) for text in patterns])
        | beam.ParDo(ExpandPatterns()).with_outputs(DEAD_LETTER, main="files")
    )
    return pipeline, outputs


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    """The sample, with a file that no .dcm pattern matches."""
    root = tmp_path / "in"
    shutil.copytree(SAMPLE, root)
    return root


def test_expand_patterns_yields_every_file_each_pattern_matches_with_its_size(inbox: Path) -> None:
    every = sorted(inbox.rglob("*.dcm"))
    series = sorted(inbox.glob("ct/*/*.dcm"))
    pipeline, outputs = expand(f"{inbox}/**.dcm", f"{inbox}/ct/*/*.dcm", f"{inbox}/mr/MR_small.dcm")

    expected = [matched(path) for path in [*every, *series, inbox / "mr" / "MR_small.dcm"]]
    expect_outputs(outputs.files, letters(outputs), expected, [])
    result = run(pipeline)

    found = counters(result)
    assert found["matched"] == len(expected)
    assert found["objects_listed"] >= len(every)


def test_expand_patterns_dead_letters_a_pattern_that_matches_nothing(inbox: Path) -> None:
    """Counted as an unmatched pattern; one without wildcards is told that it names one file."""
    pipeline, outputs = expand(f"{inbox}/ct/*.txt", f"{inbox}/ct/CT_large.dcm", f"{inbox}/rt/*.dcm")

    full = outputs[DEAD_LETTER] | beam.Map(lambda r: (r["uri"], r["stage"], r["reason"], r["detail"]))
    expected = [
        (f"{inbox}/ct/*.txt", "expand", "no_match", "the pattern matched nothing"),
        (
            f"{inbox}/ct/CT_large.dcm",
            "expand",
            "no_match",
            "the pattern matched nothing (without wildcards it names one file)",
        ),
    ]
    expect_outputs(outputs.files, full, [matched(path) for path in sorted(inbox.glob("rt/*.dcm"))], expected)
    result = run(pipeline)

    assert counters(result)["unmatched_patterns"] == 2


def test_expand_patterns_stops_the_run_when_a_directory_cannot_be_listed(tmp_path: Path) -> None:
    """A listing error is no pattern's fault (a missing bucket, no permission): the run stops."""
    (tmp_path / "loop").symlink_to("loop")  # listing it fails: too many levels of symbolic links
    pattern = f"{tmp_path}/loop/*.dcm"
    pipeline, _ = expand(pattern)

    with pytest.raises(
        Exception,
        match=re.escape(f"cannot list --input {pattern}: [Errno 40] Too many levels of symbolic links"),
    ):
        run(pipeline)
