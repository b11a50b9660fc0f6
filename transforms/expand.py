"""Expand input patterns into files, listing as little as the pattern allows.

The walk goes one path segment at a time: literal segments are appended without listing, a segment
with `*` or `?` lists one directory level under its literal prefix (a delimiter listing on GCS), and
a final `**` segment lists the subtree under its literal prefix. So `gs://b/2024/*/ct/**.dcm` never
lists more than the year's top level and each `ct/` subtree.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from google.api_core.exceptions import GoogleAPIError

from dicomlib import NAMESPACE
from dicomlib.wildcard import Pattern, has_wildcard
from storage.listing import NOT_A_FILE, Lister, expand
from storage.objects import MatchedFile
from transforms.dead_letter import failure


class ExpandPatterns(beam.DoFn):
    """Pattern -> matched files; a pattern that matches nothing goes to the dead letter, and so does
    a matched local entry that is no regular file (counted as matched and failed: never read)."""

    def __init__(self) -> None:
        self.matched = Metrics.counter(NAMESPACE, "matched")
        self.unmatched = Metrics.counter(NAMESPACE, "unmatched_patterns")
        self.listed = Metrics.counter(NAMESPACE, "objects_listed")
        self.failed = Metrics.counter(NAMESPACE, "failure")

    def process(self, pattern: Pattern) -> Iterator[MatchedFile | beam.pvalue.TaggedOutput]:
        lister = Lister(pattern.bucket)
        count = 0
        try:
            for found in expand(pattern, lister):
                count += 1
                if found.size == NOT_A_FILE:
                    self.failed.inc()
                    reason = (
                        "a broken symbolic link" if os.path.islink(found.uri) else "a FIFO, socket or device"
                    )
                    yield failure(
                        found.uri, "expand", "not_a_file", f"{reason}, not a regular file: not read"
                    )
                else:
                    yield found
        except (OSError, GoogleAPIError) as error:  # a missing bucket or no permission: the run cannot work
            raise RuntimeError(f"cannot list --input {pattern.text}: {error}") from error
        self.matched.inc(count)
        self.listed.inc(lister.listed)
        if count == 0:
            self.unmatched.inc()
            hint = "" if has_wildcard(pattern.text) else " (without wildcards it names one file)"
            yield failure(pattern.text, "expand", "no_match", f"the pattern matched nothing{hint}")
