"""Listing files and objects: a directory or bucket prefix level by level, or a subtree; and the
expansion of a wildcard pattern into the files it matches, listing only under its literal prefix."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from dicomlib.wildcard import Pattern, has_wildcard, literal_prefix, segment_regex
from storage.objects import MatchedFile, gcs_client, is_gcs, split_gcs

# The size of a local entry that matched but is no regular file (a broken symbolic link, a FIFO, a
# socket, a device): never opened (a FIFO would block), it is the pattern's dead letter, not skipped.
NOT_A_FILE = -1


class Lister:
    """Lists one directory level or one whole subtree under a name prefix, counting what it lists."""

    def __init__(self, bucket: str | None) -> None:
        self.bucket = bucket
        self.listed = 0

    def uri(self, name: str) -> str:
        return name if self.bucket is None else f"gs://{self.bucket}/{name}"

    def children(self, prefix: str) -> tuple[list[MatchedFile], list[str]]:
        """Files and sub-directory prefixes (ending in `/`) directly under `prefix`."""
        if self.bucket is not None:
            pages = gcs_client().list_blobs(self.bucket, prefix=prefix, delimiter="/")
            files = [MatchedFile(b.name, b.size) for b in pages if not b.name.endswith("/")]
            dirs = sorted(pages.prefixes)
        else:
            files, dirs = [], []
            for path, entry in _scan(prefix):
                if entry.is_dir():
                    dirs.append(path + "/")
                else:
                    files.append(_local(path))
        self.listed += len(files) + len(dirs)
        return files, dirs

    def descendants(self, prefix: str, glob: str | None = None) -> Iterator[MatchedFile]:
        """Every file whose name starts with `prefix`, at any depth.

        `glob` narrows a GCS listing on the server; callers still filter, because emulators (and
        any server that ignores it) return everything under the prefix.
        """
        if self.bucket is not None:
            for blob in gcs_client().list_blobs(self.bucket, prefix=prefix, match_glob=glob):
                self.listed += 1
                if not blob.name.endswith("/"):
                    yield MatchedFile(blob.name, blob.size)
            return
        # a directory reached through a symbolic link is walked too, once: a link back up the tree
        # would walk for ever
        seen = {os.path.realpath(prefix.rpartition("/")[0] or ".")}
        for path, entry in _scan(prefix):
            self.listed += 1
            if not entry.is_dir():
                yield _local(path)
                continue
            if not _first_visit(path, seen):
                continue
            for top, dirs, names in os.walk(path, onerror=_raise, followlinks=True):  # nothing skipped
                dirs[:] = sorted(d for d in dirs if _first_visit(os.path.join(top, d), seen))
                for name in sorted(names):
                    self.listed += 1
                    yield _local(os.path.join(top, name))

    def file(self, name: str) -> MatchedFile | None:
        """The file with exactly this name, if there is one."""
        if self.bucket is not None:
            blob = gcs_client().bucket(self.bucket).get_blob(name)
            found = blob is not None and not name.endswith("/")
            return MatchedFile(name, blob.size) if found else None
        return _local(name) if os.path.lexists(name) and not os.path.isdir(name) else None


def _local(path: str) -> MatchedFile:
    """A local entry that is not a directory: its size, or NOT_A_FILE."""
    return MatchedFile(path, os.path.getsize(path) if os.path.isfile(path) else NOT_A_FILE)


def _first_visit(directory: str, seen: set[str]) -> bool:
    real = os.path.realpath(directory)
    if real in seen:
        return False
    seen.add(real)
    return True


def _raise(error: OSError) -> None:
    raise error


def _scan(prefix: str) -> list[tuple[str, os.DirEntry[str]]]:
    """(path, entry) for entries of the directory part of `prefix` whose names start with the rest."""
    directory, slash, start = prefix.rpartition("/")
    head = directory + slash
    try:
        with os.scandir(head or ".") as entries:
            found = [(head + e.name, e) for e in entries if e.name.startswith(start)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(found)


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


def lister_for(prefix_uri: str) -> tuple[Lister, str]:
    """A Lister for the bucket (or local disk) of a directory or gs:// prefix, and the name prefix
    inside it."""
    if is_gcs(prefix_uri):
        bucket, name = split_gcs(prefix_uri)
        return Lister(bucket), name
    return Lister(None), prefix_uri
