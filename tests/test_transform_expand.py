"""ExpandPatterns alone in a TestPipeline: the files each pattern matches, a pattern that matches
nothing, and a listing that fails."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import apache_beam as beam
import pytest

from dicomlib.wildcard import parse_pattern
from tests.beam_support import (
    CT,
    MR,
    ROOT,
    SAMPLE,
    counters,
    expect_outputs,
    letters,
    matched,
    new_pipeline,
    run,
)
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


@pytest.mark.parametrize("form", ["**.dcm", "*/*.dcm", "links/*.dcm", "links/gone.dcm"])
def test_an_entry_that_is_no_regular_file_is_a_dead_letter_and_a_linked_directory_is_walked(
    tmp_path: Path, form: str
) -> None:
    """What a pattern matches is never skipped unsaid: a broken symbolic link or a FIFO (never opened:
    it would block) is a `not_a_file` dead letter, counted as matched and failed; a directory reached
    through a symbolic link is walked by `**`, once, even when a link leads back up the tree."""
    root = tmp_path / "in"
    (root / "links").mkdir(parents=True)
    (root / "elsewhere").mkdir()
    shutil.copy(CT, tmp_path / "linked.dcm")
    os.mkfifo(root / "links" / "pipe.dcm")
    (root / "links" / "gone.dcm").symlink_to(tmp_path / "deleted.dcm")
    (root / "links" / "there.dcm").symlink_to(tmp_path / "linked.dcm")
    shutil.copy(MR, tmp_path / "outside.dcm")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "MR.dcm").write_bytes(MR.read_bytes())
    (root / "elsewhere" / "series").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "elsewhere" / "up").symlink_to(root, target_is_directory=True)  # a cycle
    pipeline, outputs = expand(f"{root}/{form}")

    files = {
        "**.dcm": ["elsewhere/series/MR.dcm", "links/there.dcm"],
        "*/*.dcm": ["links/there.dcm"],
        "links/*.dcm": ["links/there.dcm"],
        "links/gone.dcm": [],
    }[form]
    bad = {"links/gone.dcm": "a broken symbolic link", "links/pipe.dcm": "a FIFO, socket or device"}
    if form == "links/gone.dcm":
        bad.pop("links/pipe.dcm")
    expected = [matched(root / name) for name in files]
    letters_expected = [(f"{root}/{name}", "expand", "not_a_file") for name in bad]
    expect_outputs(outputs.files, letters(outputs), expected, letters_expected)
    found = counters(run(pipeline))
    assert (found["matched"], found["failure"]) == (len(files) + len(bad), len(bad))


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


EXPAND = """
import apache_beam as beam
from dicomlib.wildcard import parse_pattern
from tests.beam_support import new_pipeline, run
from transforms.expand import ExpandPatterns
pipeline = new_pipeline()
patterns = pipeline | beam.Create([parse_pattern({pattern!r})])
_ = patterns | beam.ParDo(ExpandPatterns()).with_outputs("dead_letter", main="files")
run(pipeline)
"""


@pytest.mark.parametrize("pattern", ["in/**.dcm", "in/*/*.dcm"])
def test_expand_patterns_stops_the_run_when_a_directory_under_the_pattern_cannot_be_read(
    tmp_path: Path, pattern: str
) -> None:
    """An unreadable directory (run without the capabilities that let root read anything):
    `*` stops the run, as ExpandPatterns says; `**` must not silently skip it either."""
    for name, source in (("readable", MR), ("locked", CT)):
        (tmp_path / "in" / name).mkdir(parents=True)
        (tmp_path / "in" / name / source.name).write_bytes(source.read_bytes())
    (tmp_path / "in" / "locked").chmod(0)
    script = textwrap.dedent(EXPAND.format(pattern=f"{tmp_path}/{pattern}"))
    # root reads a mode-000 directory anyway, unless it gives up the capabilities that let it
    as_reader = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    done = subprocess.run(
        [*as_reader, sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    (tmp_path / "in" / "locked").chmod(0o755)
    assert done.returncode != 0 and "cannot list --input" in done.stderr, done.stderr[-2000:]
