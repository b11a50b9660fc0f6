"""Import patterns with the Cloud Healthcare API's wildcard rules.

`*` and `?` never cross `/`; `**` crosses it, stands only at the end of the pattern (optionally
followed by a suffix without `/`) and excludes every other wildcard. Beam's FileSystems.match uses
different rules, so matching is done here, one path segment at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class PatternError(ValueError):
    """A pattern that breaks the wildcard rules."""


@dataclass(frozen=True)
class Pattern:
    """A validated input pattern: `gs://bucket/name-pattern` or a local path pattern."""

    text: str
    bucket: str | None  # None for local paths
    path: str  # the object-name pattern (GCS) or the path pattern (local)

    @property
    def is_gcs(self) -> bool:
        return self.bucket is not None

    @property
    def segments(self) -> list[str]:
        return self.path.split("/")


def has_wildcard(text: str) -> bool:
    return "*" in text or "?" in text


def literal_prefix(text: str) -> str:
    """The characters before the first wildcard."""
    match = re.search(r"[*?]", text)
    return text if match is None else text[: match.start()]


def segment_regex(text: str) -> re.Pattern[str]:
    """Translate a pattern into a regex: `**` -> any, `*` -> any but `/`, `?` -> one but `/`."""
    parts = re.split(r"(\*\*|\*|\?)", text)
    table = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(table.get(part, re.escape(part)) for part in parts), re.DOTALL)


def parse_pattern(text: str) -> Pattern:
    """Validate `text` against the wildcard rules; raise PatternError saying which rule it breaks."""
    if not text:
        raise PatternError("empty pattern")
    bucket = None
    path = text
    if text.startswith("gs://"):
        bucket, _, path = text[len("gs://") :].partition("/")
        if not bucket:
            raise PatternError(f"{text!r} has no bucket name")
        if has_wildcard(bucket):
            raise PatternError(f"{text!r}: wildcards are not allowed in the bucket name")
        if not path:
            raise PatternError(f"{text!r} has no object pattern after the bucket (use gs://{bucket}/**)")
    _check_double_star(text, path)
    return Pattern(text=text, bucket=bucket, path=path)


def _check_double_star(text: str, path: str) -> None:
    if "**" not in path:
        return
    head, _, tail = path.partition("**")
    if "/" in tail:
        raise PatternError(f"{text!r}: '**' must stand at the end of the pattern")
    if has_wildcard(head) or has_wildcard(tail):
        raise PatternError(f"{text!r}: a pattern with '**' may use no other wildcard")
