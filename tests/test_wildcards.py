"""The contract's wildcard rules, on a local tree and the same tree in GCS: identical matches."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dicomlib.wildcard import PatternError, parse_pattern
from storage.listing import Lister, expand
from tests.gcs_emulator import upload_tree

TREE = [
    "data/Example.dcm",
    "data/Example1.dcm",
    "data/Example01.dcm",
    "data/Example22.dcm",
    "data/a.txt",
    "data/odd name.dcm",
    "data/weird[1].dcm",
    "data/sub/Example3.dcm",
    "data/sub/deep/x.dcm",
    "data/sub/deep/y.txt",
    "data/sub2/Example4.dcm",
    "dataset/z.dcm",
    "top.dcm",
]

# pattern (relative to the tree's root) -> the files it matches
CASES = {
    # `*`: zero or more characters other than '/'
    "data/Example*.dcm": ["data/Example.dcm", "data/Example01.dcm", "data/Example1.dcm",
                          "data/Example22.dcm"],
    "data/*.txt": ["data/a.txt"],
    "data/*": ["data/Example.dcm", "data/Example01.dcm", "data/Example1.dcm", "data/Example22.dcm",
               "data/a.txt", "data/odd name.dcm", "data/weird[1].dcm"],
    "data/*/Example*.dcm": ["data/sub/Example3.dcm", "data/sub2/Example4.dcm"],
    "data/*/*/*.dcm": ["data/sub/deep/x.dcm"],
    "d*/z.dcm": ["dataset/z.dcm"],
    "*.dcm": ["top.dcm"],
    # `?`: exactly one character other than '/'
    "data/Example?.dcm": ["data/Example1.dcm"],
    "data/Example??.dcm": ["data/Example01.dcm", "data/Example22.dcm"],
    "data/s?b/*.dcm": ["data/sub/Example3.dcm"],
    "dat?/*.txt": ["data/a.txt"],
    "data/sub?Example3.dcm": [],
    # `**`: anything, '/' included, at the end, optionally with a suffix
    "data/**": ["data/Example.dcm", "data/Example01.dcm", "data/Example1.dcm", "data/Example22.dcm",
                "data/a.txt", "data/odd name.dcm", "data/sub/Example3.dcm", "data/sub/deep/x.dcm",
                "data/sub/deep/y.txt", "data/sub2/Example4.dcm", "data/weird[1].dcm"],
    "data/sub/**": ["data/sub/Example3.dcm", "data/sub/deep/x.dcm", "data/sub/deep/y.txt"],
    "data/**.txt": ["data/a.txt", "data/sub/deep/y.txt"],
    "data/sub**.dcm": ["data/sub/Example3.dcm", "data/sub/deep/x.dcm", "data/sub2/Example4.dcm"],
    "data**z.dcm": ["dataset/z.dcm"],
    "**.txt": ["data/a.txt", "data/sub/deep/y.txt"],
    "**": sorted(TREE),
    "data/weird[1]**": ["data/weird[1].dcm"],
    # no wildcard: one object, literally
    "data/Example1.dcm": ["data/Example1.dcm"],
    "data/odd name.dcm": ["data/odd name.dcm"],
    "data/weird[1].dcm": ["data/weird[1].dcm"],
    "data/missing.dcm": [],
    "data/sub": [],
}  # fmt: skip


@pytest.fixture(scope="module")
def local_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for name in TREE:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    return root


@pytest.fixture(scope="module")
def gcs_tree(gcs, local_tree: Path) -> str:
    upload_tree(gcs, local_tree, "wild-tree")
    return "gs://wild-tree"


def matches(root: str, pattern: str) -> list[str]:
    parsed = parse_pattern(f"{root}/{pattern}")
    found = [f.uri[len(root) + 1 :] for f in expand(parsed, Lister(parsed.bucket))]
    return sorted(found)


@pytest.mark.parametrize("pattern", CASES)
def test_local_matches(local_tree: Path, pattern: str) -> None:
    assert matches(str(local_tree), pattern) == sorted(CASES[pattern])


@pytest.mark.parametrize("pattern", CASES)
def test_gcs_matches_the_same(gcs_tree: str, pattern: str) -> None:
    assert matches(gcs_tree, pattern) == sorted(CASES[pattern])


def test_matched_files_carry_their_size(local_tree: Path, gcs_tree: str) -> None:
    for root in (str(local_tree), gcs_tree):
        parsed = parse_pattern(f"{root}/data/Example1.dcm")
        [found] = expand(parsed, Lister(parsed.bucket))
        assert found.size == len("data/Example1.dcm")


def test_listing_stays_under_the_literal_prefix(gcs_tree: str) -> None:
    """A narrow pattern lists one directory level, not the bucket or the subtree."""
    parsed = parse_pattern(f"{gcs_tree}/data/Example?.dcm")
    lister = Lister(parsed.bucket)
    assert [f.uri for f in expand(parsed, lister)] == [f"{gcs_tree}/data/Example1.dcm"]
    assert lister.listed == 4  # Example.dcm, Example01.dcm, Example1.dcm, Example22.dcm


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("gs://b/data/**/x.dcm", "'**' must stand at the end"),
        ("data/**/", "'**' must stand at the end"),
        ("data/*/**", "no other wildcard"),
        ("data/**?", "no other wildcard"),
        ("data/***", "no other wildcard"),
        ("gs://b*/x.dcm", "bucket name"),
        ("gs:///x.dcm", "no bucket name"),
        ("gs://bucket", "no object pattern"),
        ("", "empty"),
    ],
)
def test_patterns_that_break_the_rules(pattern: str, message: str) -> None:
    with pytest.raises(PatternError, match=re.escape(message)):
        parse_pattern(pattern)
