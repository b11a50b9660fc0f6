"""Expand input patterns into files, listing as little as the pattern allows.

The walk goes one path segment at a time: literal segments are appended without listing, a segment
with `*` or `?` lists one directory level under its literal prefix (a delimiter listing on GCS), and
a final `**` segment lists the subtree under its literal prefix. So `gs://b/2024/*/ct/**.dcm` never
lists more than the year's top level and each `ct/` subtree.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from google.api_core.exceptions import GoogleAPIError

from dicomlib import NAMESPACE
from dicomlib.wildcard import Pattern, has_wildcard, literal_prefix, segment_regex
from storage.objects import Lister, MatchedFile
from transforms.dead_letter import failure

GCS_GLOB_SPECIAL = re.compile(r"[\[\]{}\\,]")


def expand(pattern: Pattern, lister: Lister) -> Iterator[MatchedFile]:
    """Yield every file matching `pattern`, as URIs (`gs://...` or local paths), in name order."""
    segments = pattern.segments
    prefixes = [""]
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if "**" in segment:
            yield from _subtree(prefixes, segment, lister)
            return
        if not has_wildcard(segment):
            if last:
                found = (lister.file(prefix + segment) for prefix in prefixes)
                yield from (_with_uri(lister, f) for f in found if f is not None)
            prefixes = [f"{prefix}{segment}/" for prefix in prefixes]
            continue
        regex, start = segment_regex(segment), literal_prefix(segment)
        next_prefixes = []
        for prefix in prefixes:
            files, dirs = lister.children(prefix + start)
            if last:
                yield from (_with_uri(lister, f) for f in files if regex.fullmatch(f.uri[len(prefix) :]))
            else:
                next_prefixes += [d for d in dirs if regex.fullmatch(d[len(prefix) : -1])]
        prefixes = next_prefixes


def _subtree(prefixes: list[str], segment: str, lister: Lister) -> Iterator[MatchedFile]:
    regex, start = segment_regex(segment), literal_prefix(segment)
    for prefix in prefixes:
        # A server-side glob only where GCS glob syntax means exactly what our pattern means.
        glob = None if GCS_GLOB_SPECIAL.search(prefix + segment) else prefix + segment
        for found in lister.descendants(prefix + start, glob):
            if regex.fullmatch(found.uri[len(prefix) :]):
                yield _with_uri(lister, found)


def _with_uri(lister: Lister, found: MatchedFile) -> MatchedFile:
    return found._replace(uri=lister.uri(found.uri))


class ExpandPatterns(beam.DoFn):
    """Pattern -> matched files; a pattern that matches nothing goes to the dead letter."""

    def __init__(self) -> None:
        self.matched = Metrics.counter(NAMESPACE, "matched")
        self.unmatched = Metrics.counter(NAMESPACE, "unmatched_patterns")
        self.listed = Metrics.counter(NAMESPACE, "objects_listed")

    def process(self, pattern: Pattern) -> Iterator[MatchedFile | beam.pvalue.TaggedOutput]:
        lister = Lister(pattern.bucket)
        count = 0
        try:
            for found in expand(pattern, lister):
                count += 1
                yield found
        except (OSError, GoogleAPIError) as error:  # a missing bucket or no permission: the run cannot work
            raise RuntimeError(f"cannot list --input {pattern.text}: {error}") from error
        self.matched.inc(count)
        self.listed.inc(lister.listed)
        if count == 0:
            self.unmatched.inc()
            hint = "" if has_wildcard(pattern.text) else " (without wildcards it names one file)"
            yield failure(pattern.text, "expand", "no_match", f"the pattern matched nothing{hint}")
