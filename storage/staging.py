"""Staging files: where a local file is written before it is renamed into place, and the spools
that hold instances on their way through. Each is named for its host and process, so that what a
killed run left behind is found and removed by a later one, while a live run's files are kept."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator

from dicomlib.failures import RunFailed

STAGING = ".dicom-etl-tmp"
STALE_AFTER = 24 * 3600  # seconds: a staging file this old is left over, even from another host
HOST = socket.gethostname().replace(".", "_")
# Its staging directory holds the spools. It is this user's own (mode 0700): spools hold patients'
# headers and pixels, and a directory shared by all users would be readable by all, and writable by
# whoever made it first.
SPOOL_ROOT = os.path.join(tempfile.gettempdir(), f"dicom-etl-{os.getuid()}")
_spool_cleaned: list[bool] = []  # whether this process has cleaned SPOOL_ROOT yet


def place(
    fill: Callable[[io.BufferedWriter], object], destination: str, root: str, create_only: bool
) -> bool:
    """Write a staging file under `root` with `fill`, then move it to `destination`."""
    _private_spool_root(destination)
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    staged = _staging_file(root)
    try:
        with open(staged, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        (os.link if create_only else os.replace)(staged, destination)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)


def _staging_file(root: str) -> str:
    """A new, empty staging file under `root`, created with the modes the umask gives (0644 under
    umask 022); its name says which host and process own it."""
    _private_spool_root(root)
    directory = os.path.join(root, STAGING)
    path = os.path.join(directory, f"{HOST}.{os.getpid()}.{uuid.uuid4().hex}")
    for attempt in range(3):  # a concurrent clean_staging may remove the empty directory between
        os.makedirs(directory, exist_ok=True)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileNotFoundError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _private_spool_root(path: str) -> None:
    """For a path under SPOOL_ROOT: SPOOL_ROOT made if missing, and refused (RunFailed) unless it is
    a directory of this user's that no one else may read or write."""
    if os.path.commonpath([os.path.abspath(path), SPOOL_ROOT]) != SPOOL_ROOT:
        return
    with contextlib.suppress(FileExistsError):
        os.mkdir(SPOOL_ROOT, 0o700)
    status = os.lstat(SPOOL_ROOT)
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid() or status.st_mode & 0o077:
        raise RunFailed(f"{SPOOL_ROOT} must be a directory of this user's that only this user may use")


def remove_empty_spool_root() -> None:
    """SPOOL_ROOT's staging directory, if empty. SPOOL_ROOT itself stays (empty): were it removed
    while another thread makes its staging directory, it would come back readable by all."""
    with contextlib.suppress(OSError):
        os.rmdir(os.path.join(SPOOL_ROOT, STAGING))


@contextlib.contextmanager
def spool_file() -> Iterator[str]:
    """A path for a local temporary copy of an instance on its way through (a download, a transcoded
    file), removed after use. It is a staging file under SPOOL_ROOT, named for this process, so
    what a killed run left there is removed by the first spool of any later process."""
    if not _spool_cleaned:
        clean_staging(SPOOL_ROOT)
        _spool_cleaned.append(True)
    path = _staging_file(SPOOL_ROOT)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        remove_empty_spool_root()  # only when empty; a writer recreates it


def clean_staging(root: str) -> int:
    """Remove the staging files (and spool directories) under a local `root` that no live writer
    owns; how many.

    A file of this host is left over when its process is gone (or is a newer process with the same
    id); one of another host, whose processes cannot be seen from here, when it is older than
    STALE_AFTER. The staging directory goes too once empty.
    """
    if root.startswith("gs://"):
        return 0
    directory = os.path.join(root, STAGING)
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for entry in entries:
        host, _, rest = entry.name.partition(".")
        pid = rest.partition(".")[0]
        with contextlib.suppress(FileNotFoundError):
            modified = entry.stat().st_mtime
            if host == HOST and pid.isdigit():
                left = not _writing(int(pid), modified)
            else:
                left = time.time() - modified > STALE_AFTER
            if left:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)  # a run's spooled rows
                else:
                    os.unlink(entry.path)
                removed += 1
    with contextlib.suppress(OSError):
        os.rmdir(directory)  # only when empty; a writer recreates it
    return removed


def _writing(pid: int, since: float) -> bool:
    """Whether process `pid` may still be writing a file last modified at `since`: it is alive and
    started before then (a pid reused by a newer process is not the writer). A file or spool can go
    unmodified for hours while its run goes on, so only a start after it counts against it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = _start_time(pid)
    return started is None or started <= since + 1


def _start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), from /proc; None if it cannot be told
    (gone meanwhile, or no /proc). The time of /proc/{pid} itself is when it was first looked at."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        with open("/proc/stat") as system:
            boot = next(int(line.split()[1]) for line in system if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")
