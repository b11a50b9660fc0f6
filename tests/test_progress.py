"""Progress of a local run: a line on stderr every 10 seconds of the whole run (not per stage), with
the counts so far, the current stage's rate and, once the total is known, the time left; none for a
run shorter than that."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines.progress_lines import Reporter
from tests.command_line import SAMPLE, Place, SilentServer, interrupted_import


def lines(reporter: Reporter, samples: list[tuple[float, dict[str, int]]]) -> list[str]:
    """What the reporter says at each of these times, seconds after the run started."""
    reporter.started = 0.0
    return [reporter.line(counts, now) for now, counts in samples]


def test_a_line_has_the_counts_the_current_stages_rate_and_the_time_left() -> None:
    said = lines(
        Reporter("import_dicom", interval=10),
        [
            (10, {"matched": 24_320}),
            (20, {"matched": 24_320, "parsed": 9_000}),
            (30, {"matched": 24_320, "parsed": 24_320, "success": 4_000, "failure_not_dicom": 45}),
            (40, {"matched": 24_320, "parsed": 24_320, "success": 9_000, "already_present": 300}),
        ],
    )
    assert said == [
        "import_dicom: 0:00:10 elapsed; 24,320 matched, 0 done; 2,432.0 matched/s",
        "import_dicom: 0:00:20 elapsed; 24,320 matched, 9,000 parsed, 0 done; 900.0 parsed/s, "
        "about 0:00:17 left to parse",
        "import_dicom: 0:00:30 elapsed; 24,320 matched, 24,320 parsed, 4,045 done (success 4,000, "
        "failure 45); 404.5 done/s, about 0:00:50 left",
        "import_dicom: 0:00:40 elapsed; 24,320 matched, 24,320 parsed, 9,300 done (success 9,000, "
        "already_present 300); 525.5 done/s, about 0:00:29 left",
    ]


def test_a_pattern_that_matched_nothing_is_no_item_done() -> None:
    [said] = lines(Reporter("export_dicom", interval=10), [(10, {"selected": 5, "failure_no_match": 1})])
    assert said == "export_dicom: 0:00:10 elapsed; 5 selected, 0 done; 0.5 selected/s"


@pytest.mark.parametrize("mode", ["in_memory", "multi_processing"])
def test_a_run_prints_a_progress_line_every_interval_across_its_stages(
    tmp_path: Path, silent_store: SilentServer, mode: str
) -> None:
    """An import whose store never answers: the lines go on while the run waits (1 s apart here, by
    DICOM_ETL_PROGRESS_SECONDS), with the counts of every worker process."""
    result = interrupted_import(
        Place(tmp_path), silent_store, mode, after=3.5, DICOM_ETL_PROGRESS_SECONDS="1"
    )

    *progress, last = result.stderr.splitlines()
    assert last == "error: interrupted (Ctrl-C)"
    assert len(progress) >= 3
    elapsed = [int(re.match(r"import_dicom: 0:00:(\d\d) elapsed; ", line)[1]) for line in progress]
    assert elapsed == sorted(set(elapsed)), "one line a second"
    assert progress[-1].endswith("; 19 matched, 19 parsed, 0 done; 0.0 done/s")


def test_a_run_under_ten_seconds_prints_no_progress(tmp_path: Path) -> None:
    place = Place(tmp_path)
    result = place.run("script", "import_dicom", f"--input={SAMPLE}/**.dcm", "--store=store")
    assert (result.status, result.stderr) == (0, "")
