"""multipart/related bodies for DICOMweb, streamed: a STOW-RS request from files, and a WADO-RS
answer into a file, so that neither side ever holds an instance in memory.

requests sends a body that has `read` and a length block by block, and urllib3 rewinds it (`tell`,
`seek`) to send it again on a retry, so a request of 100 instances or of one 10 GB instance costs
a buffer, not its size.
"""

from __future__ import annotations

import bisect
import io
import itertools
import re
import uuid
from collections.abc import Iterator, Sequence
from typing import BinaryIO, Protocol

from storage.objects import MatchedFile, open_ranged

CHUNK = 1024 * 1024
SOURCE_BUFFER = 8 * 1024 * 1024  # reads of a source in GCS: few, large ranged requests


class SourceUnreadable(Exception):
    """A file of the body could not be read while sending it. Not an OSError, so that urllib3 does
    not take it for the connection failing (and retry it, or blame the server): `index` says which
    file, `error` what happened."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(f"file {index}: {type(error).__name__}: {error}")
        self.index = index
        self.error = error


class MultipartBody(io.RawIOBase):
    """A multipart/related body of Part 10 files, read from them as it is sent."""

    def __init__(self, files: Sequence[MatchedFile], part_type: str = "application/dicom") -> None:
        super().__init__()
        boundary = uuid.uuid4().hex
        self.content_type = f'multipart/related; type="{part_type}"; boundary={boundary}'
        self.pieces: list[bytes | tuple[int, MatchedFile]] = []
        for index, file in enumerate(files):
            self.pieces += [
                f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode(),
                (index, file),
                b"\r\n",
            ]
        self.pieces.append(f"--{boundary}--\r\n".encode())
        sizes = [len(p) if isinstance(p, bytes) else p[1].size for p in self.pieces]
        self.starts = list(itertools.accumulate(sizes, initial=0))  # of each piece, then the end
        self.position = 0
        self.source: tuple[int, BinaryIO] | None = None  # the piece being read, and its stream

    def __len__(self) -> int:
        return self.starts[-1]

    def __iter__(self) -> Iterator[bytes]:  # requests sends an iterable with a length as a stream
        while chunk := self.read(CHUNK):
            yield chunk

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: len(self)}[whence]
        self.position = max(0, base + offset)
        return self.position

    def close(self) -> None:
        self._close_source()
        super().close()

    def readinto(self, buffer) -> int:
        if self.position >= len(self):
            return 0
        number = bisect.bisect_right(self.starts, self.position) - 1
        start, end = self.starts[number], self.starts[number + 1]
        data = self._read_piece(number, self.position - start, min(len(buffer), end - self.position))
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)

    def _read_piece(self, number: int, offset: int, count: int) -> bytes:
        piece = self.pieces[number]
        if isinstance(piece, bytes):
            return piece[offset : offset + count]
        index, file = piece
        try:
            if self.source is None or self.source[0] != number:
                self._close_source()
                self.source = (number, open_ranged(file, SOURCE_BUFFER))
            stream = self.source[1]
            if stream.tell() != offset:  # a retry, or a rewind
                stream.seek(offset)
            data = stream.read(count)
            if len(data) < count:
                raise OSError(f"{file.uri} is shorter than the {file.size} bytes it had when listed")
        except Exception as error:
            self._close_source()
            raise SourceUnreadable(index, error) from error
        return data

    def _close_source(self) -> None:
        if self.source is not None:
            self.source[1].close()
            self.source = None


class PartSink(Protocol):
    """Where the parts of a multipart answer go, one after the other."""

    def begin(self) -> None:
        """A part starts; its bytes follow through `write`."""

    def write(self, data: bytes) -> None: ...

    def end(self) -> None:
        """The part is complete."""


def split_parts(chunks: Iterator[bytes], content_type: str, sink: PartSink) -> int:
    """Hand each part of a multipart answer (or a plain body, as one part) to `sink`, byte-exact,
    as it arrives: the parts' headers are skipped, and what may be the start of a delimiter held
    back until the next chunk tells. The number of parts; ValueError for an answer that is not
    multipart as it says, or ends before its closing delimiter."""
    if not content_type.lower().startswith("multipart/"):
        sink.begin()
        for chunk in chunks:
            sink.write(chunk)
        sink.end()
        return 1
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise ValueError(f"multipart answer without a boundary: {content_type}")
    delimiter = b"\r\n--" + match.group(1).encode()
    pending = b"\r\n"  # the first delimiter has no CRLF before it
    parts, in_part, closed = 0, False, False
    for chunk in chunks:
        if closed:
            continue  # the epilogue
        pending += chunk
        while True:
            if in_part:
                end = pending.find(delimiter)
                if end < 0:
                    if len(pending) >= len(delimiter):  # what is held back may start the delimiter
                        sink.write(pending[: 1 - len(delimiter)])
                        pending = pending[1 - len(delimiter) :]
                    break
                sink.write(pending[:end])
                sink.end()
                pending, in_part = pending[end:], False
            if len(pending) < len(delimiter) + 2:
                break
            if not pending.startswith(delimiter):
                raise ValueError("a part of the answer does not start with its multipart boundary")
            if pending[len(delimiter) : len(delimiter) + 2] == b"--":
                closed = True
                break
            _, separator, rest = pending.partition(b"\r\n\r\n")
            if not separator:
                break
            sink.begin()
            parts, in_part, pending = parts + 1, True, rest
    if not closed:
        raise ValueError("the multipart answer ends before its closing delimiter")
    return parts


class _OnePart:
    """A sink writing one part to a file; a second part is an error."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.parts = 0

    def begin(self) -> None:
        self.parts += 1
        if self.parts > 1:
            raise ValueError("the answer holds more than one part")

    def write(self, data: bytes) -> None:
        self.out.write(data)

    def end(self) -> None:
        pass


def save_single_part(chunks: Iterator[bytes], content_type: str, out: BinaryIO) -> None:
    """Write the one part of a multipart answer (or a plain body) to `out`, byte-exact, as it
    arrives. ValueError if the answer holds no part, or more than one."""
    if split_parts(chunks, content_type, _OnePart(out)) == 0:
        raise ValueError("the answer holds no part")
