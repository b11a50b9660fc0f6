"""Filter files: the contract's grammar, and merging lines so that each instance is selected once."""

from __future__ import annotations

import pytest

from transforms.filters import FilterError, Target, parse_filter, parse_line
from transforms.store import InstanceRef


@pytest.mark.parametrize(
    ("line", "target"),
    [
        ("/studies/1.2.3", Target("1.2.3")),
        ("  /studies/1.2.3/series/4.5\t", Target("1.2.3", "4.5")),
        ("/studies/1.2.3/series/4.5/instances/6.7.8", Target("1.2.3", "4.5", "6.7.8")),
    ],
)
def test_a_line_names_a_study_a_series_or_an_instance(line: str, target: Target) -> None:
    assert parse_line(line) == target


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("studies/1.2.3", "is not /studies/UID"),
        ("/studies/1.2.3/", "is not /studies/UID"),
        ("/studies/1.2.3/instances/4.5", "is not /studies/UID"),
        ("/studies/1.2.3/series/4.5/instances/6.7/frames/1", "is not /studies/UID"),
        ("/Studies/1.2.3", "is not /studies/UID"),
        ("/studies//series/4.5", "is not a UID"),
        ("/studies/1.2.3/series/..", "is not a UID"),
        ("/studies/1.2.abc", "is not a UID"),
        ("/studies/" + "1." * 40 + "1", "is not a UID"),
        ("gs://bucket/studies/1.2.3", "is not /studies/UID"),
    ],
)
def test_any_other_line_is_malformed_and_named_by_its_number(line: str, words: str) -> None:
    with pytest.raises(FilterError, match=rf"^filter file line 3: .*{words}"):
        parse_filter(f"/studies/1.2\n\n{line}\n/studies/1.3\n".encode())


def test_blank_lines_and_surrounding_whitespace_are_ignored() -> None:
    assert parse_filter(b"\n  /studies/1.2  \n\r\n\t\n/studies/1.3\r\n") == [Target("1.2"), Target("1.3")]


def test_overlapping_lines_select_each_instance_once() -> None:
    text = """
    /studies/1.1/series/1.1.1/instances/1.1.1.1
    /studies/1.1
    /studies/1.2/series/1.2.1/instances/1.2.1.1
    /studies/1.2/series/1.2.1
    /studies/1.2/series/1.2.1
    /studies/1.3/series/1.3.1/instances/1.3.1.1
    /studies/1.3/series/1.3.2/instances/1.3.2.1
    """
    assert parse_filter(text.encode()) == [
        Target("1.1"),
        Target("1.2", "1.2.1"),
        Target("1.3", "1.3.1", "1.3.1.1"),
        Target("1.3", "1.3.2", "1.3.2.1"),
    ]


def test_a_target_covers_its_study_series_or_instance() -> None:
    ref = InstanceRef("1.2", "1.2.3", "1.2.3.4")
    assert Target("1.2").covers(ref) and Target("1.2", "1.2.3").covers(ref)
    assert Target("1.2", "1.2.3", "1.2.3.4").covers(ref)
    assert not Target("1.2", "1.2.9").covers(ref) and not Target("1.20").covers(ref)
